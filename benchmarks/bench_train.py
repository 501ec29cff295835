"""Training benchmark: seconds per optimisation step and peak memory for each EMO stage. Writes json.

    python benchmarks/bench_train.py                                  # tiny models, 64 px
    python benchmarks/bench_train.py --sd15-shaped --size 256         # SD1.5's layer sizes, random weights

Every (stage, gradient checkpointing) pair runs in a fresh subprocess, so peak RSS (and peak CUDA memory on a GPU)
is that configuration's own. A step is the real training step of `emo_pipeline.training` (VAE encoding,
conditioning dropout, ReferenceNet + backbone forward, loss, backward, AdamW) on random frames.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

STAGES = {1: ["reference_net", "spatial", "face_locator"], 2: ["temporal", "audio"], 3: ["temporal", "speed"]}


def run_once(args: argparse.Namespace, stage: int, checkpointing: bool) -> dict:
    import torch
    from diffusers import DDPMScheduler

    from emo_pipeline.config import TrainConfig
    from emo_pipeline.testing import sd15_shaped_pipeline, tiny_emo_pipeline
    from emo_pipeline.training import EMOTrainingModule, select_trainable_parameters
    from emo_pipeline.training.inputs import batch_inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = (sd15_shaped_pipeline() if args.sd15_shaped else tiny_emo_pipeline()).to(device)
    config = TrainConfig(stage=stage, pretrained="", output_dir="", trainable=STAGES[stage])
    groups = select_trainable_parameters(pipe.reference_net, pipe.unet, STAGES[stage])
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.reference_net.enable_gradient_checkpointing()
    module = EMOTrainingModule(pipe.reference_net, pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), config)
    module.train()
    parameters = [p for group in groups.values() for p in group]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)

    size, f, n = args.size, args.frames, args.motion_frames
    window, layers, dim = pipe.unet.audio_proj.expected_feature_shape
    generator = torch.Generator().manual_seed(0)
    batch = {
        "reference": torch.rand(1, 3, size, size, generator=generator) * 2 - 1,
        "face_mask": torch.ones(1, 1, size, size),
    }
    if stage == 1:
        batch["target"] = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    else:
        batch["frames"] = torch.rand(1, f, 3, size, size, generator=generator) * 2 - 1
        batch["motion_frames"] = torch.rand(1, n, 3, size, size, generator=generator) * 2 - 1
        batch["audio_features"] = torch.randn(1, f, window, layers, dim, generator=generator)
        batch["speed"] = torch.rand(1, f, generator=generator)

    def step():
        inputs = batch_inputs(batch, pipe.vae, pipe.unet, config, torch.float32)
        noise = torch.randn_like(inputs["latents"])
        timesteps = torch.randint(0, 1000, (1,), device=noise.device)
        loss = module(**inputs, noise=noise, timesteps=timesteps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, kernels)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    return {
        "stage": stage,
        "gradient_checkpointing": checkpointing,
        "trainable_parameters_m": round(sum(p.numel() for p in parameters) / 1e6, 2),
        "frames_per_sample": 1 if stage == 1 else f,
        "seconds_per_step": round(seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd15-shaped", action="store_true")
    parser.add_argument("--size", type=int, help="frame side (default 64 tiny, 256 sd15-shaped)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--motion-frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/train.json")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (256 if args.sd15_shaped else 64)
    if args.child:
        print(json.dumps(run_once(args, args.child[0], bool(args.child[1]))))
        return 0

    runs = []
    for stage in args.stages:
        for checkpointing in (False, True):
            command = [
                sys.executable,
                __file__,
                "--child",
                str(stage),
                str(int(checkpointing)),
                "--size",
                str(args.size),
                "--frames",
                str(args.frames),
                "--motion-frames",
                str(args.motion_frames),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
            ]
            command += ["--sd15-shaped"] if args.sd15_shaped else []
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode:
                reason = "killed (out of memory?)" if child.returncode == -9 else f"exit code {child.returncode}"
                runs.append(
                    {
                        "stage": stage,
                        "gradient_checkpointing": checkpointing,
                        "error": f"{reason}: {child.stderr[-500:]}",
                    }
                )
            else:
                runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    import torch

    result = {
        "benchmark": "train",
        "config": {k: v for k, v in vars(args).items() if k != "child"},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

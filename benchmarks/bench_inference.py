"""Inference benchmark: speed, work per output frame and peak memory vs audio length. Writes json.

    python benchmarks/bench_inference.py                       # tiny random pipeline, 64 px
    python benchmarks/bench_inference.py --sd15-shaped --size 256 --steps 4 --seconds 1 2

Each audio length runs in a fresh subprocess (so peak RSS is that run's own) and streams clips with `iter_clips`
(as `write_video` does): peak memory should not grow with the audio length.
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


def run_once(args: argparse.Namespace, seconds: float) -> dict:
    import numpy as np
    import torch

    from emo_pipeline.testing import demo_assets, sd15_shaped_pipeline, tiny_emo_pipeline

    torch.set_num_threads(args.threads or torch.get_num_threads())
    build_start = time.perf_counter()
    pipe = sd15_shaped_pipeline() if args.sd15_shaped else tiny_emo_pipeline()
    build_seconds = time.perf_counter() - build_start
    portrait, _ = demo_assets()
    audio = (np.random.default_rng(0).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)

    counts = {"unet": 0, "unet_frames": 0, "reference_net": 0}
    vae_time = [0.0]

    def count_unet(module, args_, kwargs):
        counts["unet"] += 1
        counts["unet_frames"] += args_[0].shape[0] * args_[0].shape[2]

    pipe.unet.register_forward_pre_hook(count_unet, with_kwargs=True)
    pipe.reference_net.register_forward_pre_hook(
        lambda m, a: counts.__setitem__("reference_net", counts["reference_net"] + 1)
    )
    for name in ("encode", "decode"):
        original = getattr(pipe.vae, name)

        def timed(*a, _original=original, **k):
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                vae_time[0] += time.perf_counter() - start

        setattr(pipe.vae, name, timed)

    start = time.perf_counter()
    frames = 0
    for clip in pipe.iter_clips(
        portrait,
        audio,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        num_frames_per_clip=args.frames_per_clip,
        num_motion_frames=args.motion_frames,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(0),
    ):
        frames += len(clip)
    total = time.perf_counter() - start
    return {
        "audio_seconds": seconds,
        "output_frames": frames,
        "clips": pipe.last_plan.num_clips,
        "seconds_total": round(total, 3),
        "seconds_per_output_frame": round(total / frames, 4),
        "backbone_calls": counts["unet"],
        "backbone_calls_per_output_frame": round(counts["unet"] / frames, 3),
        "backbone_frame_evaluations_per_output_frame": round(counts["unet_frames"] / frames, 3),
        "reference_net_calls": counts["reference_net"],
        "vae_time_share": round(vae_time[0] / total, 4),
        "build_seconds": round(build_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd15-shaped", action="store_true", help="SD1.5-sized random weights instead of tiny")
    parser.add_argument("--size", type=int, help="output side (default: 64 tiny, 256 sd15-shaped)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames-per-clip", type=int, default=12)
    parser.add_argument("--motion-frames", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 8.0], help="audio lengths to compare")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/inference.json")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (256 if args.sd15_shaped else 64)

    if args.child is not None:  # one measurement, in its own process
        print(json.dumps(run_once(args, args.child)))
        return 0
    runs = []
    for seconds in args.seconds:
        command = [sys.executable, __file__, "--child", str(seconds), "--size", str(args.size)]
        command += ["--steps", str(args.steps), "--frames-per-clip", str(args.frames_per_clip)]
        command += ["--motion-frames", str(args.motion_frames), "--guidance-scale", str(args.guidance_scale)]
        command += ["--threads", str(args.threads)] + (["--sd15-shaped"] if args.sd15_shaped else [])
        child = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    import torch

    result = {
        "benchmark": "inference",
        "config": {k: v for k, v in vars(args).items() if k != "child"},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "runs": runs,
        "peak_rss_growth_mb": round(runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"], 1),
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

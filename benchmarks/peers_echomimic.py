"""Peer benchmark: EchoMimic's own pipeline against ours on the same random SD1.5-layout weights, alternated.

    python benchmarks/bench_peers.py --echomimic-src /tmp/echomimic --echomimic-python /work/venvs/echomimic/bin/python

EchoMimic (antgroup/echomimic, Apache-2.0, snapshot a53e970) needs diffusers 0.24, ours 0.42: each run is its own
process, EchoMimic's in its venv (``--echomimic-python``, set up as in tests/goldens/make_echomimic_goldens.py, with
its shims), ours in this one. Both build the networks from the same seed and the same ordered weight spec
(``tests/goldens/echomimic_weights.py``; the EchoMimic process writes the spec and the motion modules' sinusoid
tables, ours converts them with ``emo_pipeline.echomimic.convert_echomimic_state_dicts``), so they run identical
weights without a multi-GB file. Layout: SD1.5's UNet (4 levels, 2 layers per block, 8 heads, motion modules
everywhere) at ``1/--width-div`` of its channel widths (default 1/2: two float32 copies of the full-width networks
do not fit the shared 24 GB machine next to other work), whisper-tiny's encoder shape (4 blocks), SD's VAE.
Each run: EchoMimic's audio pipeline (CFG 2.5, its joint context windows; its VAE decodes 1 frame per call, ours
``--decode-chunk-size`` frames, default 1 too) or ours (``mode=parity|fast``) on a
synthetic portrait + track, ``torch.manual_seed(42)``, whisper features and decoding inside the timed region.
Reported per run: seconds per output frame, backbone frame-evaluations per output frame (counted by a hook on the
denoiser: batch x frames of every call), the resident high-water mark during the call above the resident size before
it (VmHWM reset through /proc/self/clear_refs), frames' max difference to EchoMimic's of the same audio length.
Rounds alternate EchoMimic, ours-parity, ours-fast at each audio length. Load averages are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "goldens"))
from echomimic_weights import random_state_dict  # noqa: E402

SEED, WEIGHT_SEED, FPS = 42, 1234, 24
WHISPER_DIMS = {  # whisper-tiny's encoder; the decoder shrunk (EchoMimic never runs it)
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 384,
    "n_audio_head": 6,
    "n_audio_layer": 4,
    "n_vocab": 8,
    "n_text_ctx": 4,
    "n_text_state": 384,
    "n_text_head": 6,
    "n_text_layer": 1,
}
VAE_CONFIG = {  # SD's VAE (sd-vae-ft-mse)
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def unet_config(size: int, div: int) -> dict:
    return {
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [c // div for c in (320, 640, 1280, 1280)],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": size // 8,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }


def synthetic_inputs(size: int, seconds: float):
    """A BGR portrait (2 x size square) with a face box, and a 16 kHz track."""
    side = 2 * size
    yy, xx = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side), indexing="ij")
    face = ((xx / 0.4) ** 2 + (yy / 0.5) ** 2 < 1).astype(np.float32)
    image = np.stack([0.3 + 0.5 * face + 0.2 * xx, 0.4 * face - 0.2 * yy + 0.3, 0.7 - 0.5 * face], -1)
    portrait = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    box = [0.3 * side, 0.25 * side, 0.7 * side, 0.75 * side]
    t = np.arange(int(seconds * 16000)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return portrait, box, audio


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


def _count_frames(module) -> list[int]:
    counted = [0]

    def hook(_, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        counted[0] += sample.shape[0] * sample.shape[2]

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return counted


def measure(call, counted, frames_of) -> tuple[dict, np.ndarray]:
    _reset_peak()
    start_kb = _status_kb("VmRSS")
    load = os.getloadavg()[0]
    began, cpu_began = time.perf_counter(), time.process_time()
    video = call()
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    frames = frames_of(video)
    return {
        "seconds": round(seconds, 2),
        "frames": int(frames.shape[0]),
        "s_per_frame": round(seconds / frames.shape[0], 3),
        "cpu_s_per_frame": round(cpu_seconds / frames.shape[0], 3),
        "frame_evaluations_per_frame": round(counted[0] / frames.shape[0], 2),
        "peak_above_start_mb": round((_status_kb("VmHWM") - start_kb) / 1024, 1),
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }, frames


# ------------------------------------------------------------------------------------------------ the workers


def worker_echomimic(args) -> dict:
    """EchoMimic's networks and Audio2VideoPipeline (its venv; shims of make_echomimic_goldens.py)."""
    sys.path.insert(0, str(args.echomimic_src))
    import src.models.mutual_self_attention as msa
    from diffusers import AutoencoderKL, DDIMScheduler
    from omegaconf import OmegaConf
    from PIL import Image
    from safetensors.torch import save_file
    from src.models.face_locator import FaceLocator
    from src.models.unet_2d_condition import UNet2DConditionModel
    from src.models.unet_3d_echo import EchoUNet3DConditionModel
    from src.models.whisper.audio2feature import Audio2Feature
    from src.models.whisper.whisper.model import ModelDimensions, Whisper
    from src.pipelines.pipeline_echo_mimic import Audio2VideoPipeline

    sys.path.insert(0, str(ROOT / "tests" / "goldens"))
    from make_echomimic_goldens import face_crop_and_mask, load_function

    hooks = msa.ReferenceAttentionControl.register_reference_hooks
    hooks.__defaults__ = tuple(torch.device("cpu") if isinstance(d, torch.device) else d for d in hooks.__defaults__)
    src = Path(args.echomimic_src)
    infer = OmegaConf.load(src / "configs/inference/inference_v2.yaml")
    config = unet_config(args.size, args.width_div)
    reference = UNet2DConditionModel.from_config(config)
    config3d = dict(config, _class_name="EchoUNet3DConditionModel")  # from_pretrained_2d's config (:616-631)
    config3d["down_block_types"] = ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"]
    config3d["up_block_types"] = ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3
    config3d["mid_block_type"] = "UNetMidBlock3DCrossAttn"
    denoiser = EchoUNet3DConditionModel.from_config(config3d, **OmegaConf.to_container(infer.unet_additional_kwargs))
    locator = FaceLocator(
        config["block_out_channels"][0], conditioning_channels=1, block_out_channels=(16, 32, 96, 256)
    )
    vae = AutoencoderKL.from_config(VAE_CONFIG)
    whisper = Whisper(ModelDimensions(**WHISPER_DIMS))
    models = {
        "reference_unet.": reference,
        "denoising_unet.": denoiser,
        "face_locator.": locator,
        "vae.": vae,
        "whisper.encoder.": whisper.encoder,
    }
    spec, buffers = [], {}
    for prefix, model in models.items():
        params = dict(model.named_parameters())
        for name, tensor in model.state_dict().items():
            if name in params or name == "positional_embedding":
                spec.append([prefix + name, list(tensor.shape)])
            else:
                buffers[prefix + name] = tensor.clone()
    state = random_state_dict(spec, WEIGHT_SEED)
    for prefix, model in models.items():
        model.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
        model.eval()
    del state
    work = Path(args.work)
    (work / "spec.json").write_text(json.dumps({"spec": spec, "unet_config": config}))
    save_file(
        {k: v.contiguous() for k, v in buffers.items() if k.startswith("denoising_unet.")},
        str(work / "buffers.safetensors"),
    )
    portrait, box, audio = synthetic_inputs(args.size, args.seconds)
    crop_and_pad = load_function(src, "src/utils/util.py", "crop_and_pad")
    face_img, face_mask, _ = face_crop_and_mask(src, portrait, box, [0.99], crop_and_pad, size=args.size)
    guider = Audio2Feature.__new__(Audio2Feature)
    guider.whisper_model_type, guider.model = "tiny", whisper.eval()
    scheduler = DDIMScheduler(**OmegaConf.to_container(infer.noise_scheduler_kwargs))
    pipe = Audio2VideoPipeline(
        vae=vae,
        reference_unet=reference,
        denoising_unet=denoiser,
        audio_guider=guider,
        face_locator=locator,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    counted = _count_frames(denoiser)
    mask = torch.Tensor(face_mask)[None, None, None] / 255.0

    def call():
        return pipe(
            Image.fromarray(face_img[:, :, [2, 1, 0]]),
            audio,
            mask,
            args.size,
            args.size,
            100000,
            args.steps,
            args.guidance_scale,
            generator=torch.manual_seed(SEED),
            context_frames=12,
            fps=FPS,
            context_overlap=3,
        ).videos

    result, frames = measure(call, counted, lambda v: v[0].permute(1, 0, 2, 3).float().numpy())
    np.save(work / f"frames_echomimic_{args.seconds}.npy", frames)
    return result


def worker_ours(args) -> dict:
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    from transformers import WhisperFeatureExtractor

    from emo_pipeline.echomimic import (
        build_echomimic_models,
        convert_echomimic_state_dicts,
        echomimic_scheduler,
        load_echomimic_weights,
    )
    from emo_pipeline.echomimic_conversion import build_echomimic_pipeline
    from emo_pipeline.echomimic_inputs import convert_whisper_checkpoint

    work = Path(args.work)
    saved = json.loads((work / "spec.json").read_text())
    state = random_state_dict(saved["spec"], WEIGHT_SEED)
    state.update(load_file(str(work / "buffers.safetensors")))

    def part(prefix):
        return {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}

    reference, denoiser, locator = part("reference_unet."), part("denoising_unet."), part("face_locator.")
    vae_state, whisper_state = part("vae."), part("whisper.")
    models = build_echomimic_models(saved["unet_config"], whisper_layers=WHISPER_DIMS["n_audio_layer"] + 1)
    load_echomimic_weights(models, convert_echomimic_state_dicts(reference, denoiser, locator))
    del reference, denoiser, locator
    vae = AutoencoderKL.from_config(VAE_CONFIG)
    vae.load_state_dict(vae_state)
    whisper = convert_whisper_checkpoint({"dims": WHISPER_DIMS, "model_state_dict": whisper_state})
    pipe = build_echomimic_pipeline(models, vae.eval(), whisper, WhisperFeatureExtractor(), echomimic_scheduler())
    pipe.set_progress_bar_config(disable=True)
    counted = _count_frames(pipe.unet)
    portrait, box, audio = synthetic_inputs(args.size, args.seconds)
    # modules the call imports on first use (the front end imports mediapipe, ~0.4 GB of libraries): imported
    # before the measurement, as EchoMimic's process has imported everything it runs
    import emo_pipeline.audio  # noqa: F401
    import emo_pipeline.face  # noqa: F401

    settings = {
        "height": args.size,
        "width": args.size,
        "fps": FPS,
        "face_box": box,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "generator": torch.manual_seed(SEED),
        "mode": args.worker,
        "output_type": "np",
        "watermark": False,
        "decode_chunk_size": args.decode_chunk_size,
    }

    image = portrait[:, :, ::-1].copy()

    def call():
        if not args.stream:
            return pipe(image, audio, **settings).frames
        # as a user writing the video holds it: each decoded chunk handed on and dropped (kept: one mean per frame)
        return np.concatenate([c.mean(axis=(1, 2, 3)) for c in pipe.iter_clips(image, audio, **settings)])

    if args.stream:
        result, _ = measure(call, counted, lambda v: v)
        return result
    result, frames = measure(call, counted, lambda v: np.asarray(v).transpose(0, 3, 1, 2))
    reference_frames = work / f"frames_echomimic_{args.seconds}.npy"
    if reference_frames.exists():
        theirs = np.load(reference_frames)
        result["max_abs_diff_to_echomimic"] = float(np.abs(frames - theirs).max())
    return result


# ------------------------------------------------------------------------------------------------ the driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--echomimic-src", type=Path, required=True)
    parser.add_argument("--echomimic-python", default="/work/venvs/echomimic/bin/python")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width-div", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=2.5)
    parser.add_argument("--audio-seconds", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-chunk-size", type=int, default=1)
    parser.add_argument(
        "--sides", nargs="+", choices=["echomimic", "parity", "fast"], default=["echomimic", "parity", "fast"]
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="ours streams the decoded frames (iter_clips) as writing a video does, for the memory comparison "
        "(no frame difference then)",
    )
    parser.add_argument("--work", default="/tmp/peers_echomimic")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/peers_echomimic.json")
    parser.add_argument("--worker", choices=["echomimic", "parity", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(1)
        result = worker_echomimic(args) if args.worker == "echomimic" else worker_ours(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    Path(args.work).mkdir(parents=True, exist_ok=True)
    common = [
        "--echomimic-src",
        str(args.echomimic_src),
        "--size",
        str(args.size),
        "--width-div",
        str(args.width_div),
        "--steps",
        str(args.steps),
        "--guidance-scale",
        str(args.guidance_scale),
        "--decode-chunk-size",
        str(args.decode_chunk_size),
        *(["--stream"] if args.stream else []),
        "--work",
        args.work,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    runs = []
    for repeat in range(args.repeats):
        for seconds in args.audio_seconds:
            for side in args.sides:
                python = args.echomimic_python if side == "echomimic" else sys.executable
                command = [python, __file__, *common, "--worker", side, "--seconds", str(seconds)]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                run = {"side": side, "audio_seconds": seconds, "repeat": repeat, **json.loads(line[0][7:])}
                print(json.dumps(run), flush=True)
                runs.append(run)
    summary = {}
    for seconds in args.audio_seconds:
        by_side = {}
        for side in args.sides:
            chosen = [r for r in runs if r["side"] == side and r["audio_seconds"] == seconds]
            by_side[side] = {
                "s_per_frame": round(float(np.mean([r["s_per_frame"] for r in chosen])), 3),
                "cpu_s_per_frame": round(float(np.mean([r["cpu_s_per_frame"] for r in chosen])), 3),
                "frame_evaluations_per_frame": chosen[0]["frame_evaluations_per_frame"],
                "peak_above_start_mb": max(r["peak_above_start_mb"] for r in chosen),
                "max_abs_diff_to_echomimic": max(r.get("max_abs_diff_to_echomimic", 0.0) for r in chosen),
            }
        for side in [side for side in args.sides if side != "echomimic"]:
            for key, ratio in (("s_per_frame", "time_ratio"), ("cpu_s_per_frame", "cpu_time_ratio")):
                by_side[side][f"{ratio}_to_echomimic"] = round(by_side[side][key] / by_side["echomimic"][key], 3)
        summary[str(seconds)] = by_side
    lo, hi = (str(s) for s in (min(args.audio_seconds), max(args.audio_seconds)))
    growth = {
        side: round(summary[hi][side]["peak_above_start_mb"] - summary[lo][side]["peak_above_start_mb"], 1)
        for side in args.sides
    }
    if "echomimic" in growth and growth["echomimic"] > 0:
        shares = {
            f"{k}_share_of_echomimic": round(v / growth["echomimic"], 3) for k, v in growth.items() if k != "echomimic"
        }
        growth.update(shares)
    result = {
        "what": __doc__.split("\n\n")[0],
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker", "seconds")
        },
        "machine": {
            "cpu": next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")
                ),
                platform.processor(),
            ),
            "cpus": os.cpu_count(),
            "torch_threads": 1,
            "platform": platform.platform(),
        },
        "runs": runs,
        "summary": summary,
        "peak_growth_mb_from_shortest_to_longest_audio": growth,
        "note": "acc weights (6 steps, CFG 1) evaluate 6 x windows x 12 / frames backbone frames per output frame "
        "(about 8); Hallo: 40 steps x 2 branches = 80",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

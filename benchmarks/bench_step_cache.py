"""Step-caching benchmark (DeepCache, `step_cache=N`): speed-up and frame difference vs the uncached run. Writes json.

    python benchmarks/bench_step_cache.py                             # SD1.5-shaped, 128 px, 8 steps, N = 2, 3
    python benchmarks/bench_step_cache.py --tiny --intervals 2 3 4    # tiny random pipeline (quick check)

One process, one pipeline (the same weights for every run), the same seed: the uncached run first, then each
interval. Time is split into backbone time (denoising) and the rest (ReferenceNet, audio, VAE decode). The frame
difference is on the decoded frames in [0, 1] (no watermark). Random weights: the speed-up carries over to trained
weights, the size of the difference need not (trained deep features change more smoothly between steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def generate(pipe, portrait, audio, args, step_cache):
    import torch

    backbone_seconds = [0.0]
    started = []
    handles = [
        pipe.unet.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())),
        pipe.unet.register_forward_hook(
            lambda *_: backbone_seconds.__setitem__(0, backbone_seconds[0] + time.perf_counter() - started.pop())
        ),
    ]
    start = time.perf_counter()
    try:
        frames = pipe(
            portrait,
            audio,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            num_frames_per_clip=args.frames_per_clip,
            num_motion_frames=args.motion_frames,
            guidance_scale=args.guidance_scale,
            watermark=False,
            step_cache=step_cache,
            generator=torch.Generator().manual_seed(0),
        ).frames
    finally:
        for handle in handles:
            handle.remove()
    return frames, time.perf_counter() - start, backbone_seconds[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random pipeline instead of SD1.5-shaped")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--clips", type=int, default=1)
    parser.add_argument("--frames-per-clip", type=int, default=16)
    parser.add_argument("--motion-frames", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="json path (default results/step_cache_<model>_<size>.json)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from emo_pipeline.testing import demo_assets, sd15_shaped_pipeline, tiny_emo_pipeline

    torch.set_num_threads(args.threads or torch.get_num_threads())
    pipe = tiny_emo_pipeline() if args.tiny else sd15_shaped_pipeline()
    portrait, _ = demo_assets()
    seconds = args.clips * args.frames_per_clip / 25
    audio = (np.random.default_rng(0).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)

    load_before = os.getloadavg()
    reference, total, backbone = generate(pipe, portrait, audio, args, None)
    runs = [{"step_cache": None, "seconds_total": round(total, 2), "seconds_backbone": round(backbone, 2)}]
    for interval in args.intervals:
        frames, total, backbone = generate(pipe, portrait, audio, args, interval)
        difference = np.abs(frames - reference)
        mse = float((difference**2).mean())
        runs.append(
            {
                "step_cache": interval,
                "seconds_total": round(total, 2),
                "seconds_backbone": round(backbone, 2),
                "speedup_total": round(runs[0]["seconds_total"] / total, 3),
                "speedup_backbone": round(runs[0]["seconds_backbone"] / backbone, 3),
                "max_abs_difference": round(float(difference.max()), 4),
                "mean_abs_difference": round(float(difference.mean()), 5),
                "psnr_db_vs_uncached": round(10 * np.log10(1 / mse), 2) if mse > 0 else None,
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    result = {
        "model": "tiny" if args.tiny else "sd15-shaped (random weights)",
        "size": args.size,
        "steps": args.steps,
        "frames": int(reference.shape[0]),
        "frames_per_clip": args.frames_per_clip,
        "motion_frames": args.motion_frames,
        "guidance_scale": args.guidance_scale,
        "runs": runs,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
    }
    name = f"step_cache_{'tiny' if args.tiny else 'sd15'}_{args.size}.json"
    out = Path(args.out or Path(__file__).parent / "results" / name)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

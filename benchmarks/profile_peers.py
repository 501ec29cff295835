"""Where the time goes: torch.profiler over one clip of Hallo's own loop and of ours, same weights, same inputs.

    python benchmarks/profile_peers.py --hallo-src /tmp/hallo-src --extra-path /tmp/hallo-deps            # fp32
    python benchmarks/profile_peers.py --hallo-src /tmp/hallo-src --extra-path /tmp/hallo-deps --dtype bf16 \\
        --size 64 --frames-per-clip 4 --sides hallo,ours-parity --output /tmp/profile_bf16.json

Both sides are built by ``bench_peers.py`` (Hallo's classes, random SD1.5-shaped weights, ours on the same tensors,
``--dtype`` applied to both as there). Each side runs one clip of ``--steps`` steps (after an untimed warm-up of the
same size unless ``--no-warmup``) under ``torch.profiler`` with input shapes recorded. The json lists, per side, the
ops with the most self CPU time (share of the side's total) and the (op, input shapes) pairs with the most: a profile
is a ratio inside one run, so it stays readable on a loaded machine where wall-clock ratios between runs do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers  # noqa: E402


def top_ops(profile, total_us: float, limit: int, by_shape: bool) -> list[dict]:
    rows = []
    for event in profile.key_averages(group_by_input_shape=by_shape):
        rows.append(
            {
                "op": event.key,
                **({"input_shapes": str(event.input_shapes)} if by_shape else {}),
                "calls": event.count,
                "self_cpu_s": round(event.self_cpu_time_total / 1e6, 3),
                "self_cpu_share": round(event.self_cpu_time_total / total_us, 4),
            }
        )
    rows.sort(key=lambda r: -r["self_cpu_s"])
    return rows[:limit]


def profile_side(label: str, fn, limit: int) -> dict:
    activities = [torch.profiler.ProfilerActivity.CPU]
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities, record_shapes=True) as profile, torch.no_grad():
        fn()
    seconds = time.perf_counter() - start
    total_us = sum(e.self_cpu_time_total for e in profile.key_averages())
    return {
        "side": label,
        "seconds_under_profiler": round(seconds, 2),
        "self_cpu_s_total": round(total_us / 1e6, 2),
        "top_ops": top_ops(profile, total_us, limit, by_shape=False),
        "top_ops_by_input_shape": top_ops(profile, total_us, limit, by_shape=True),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hallo-src", type=Path, required=True)
    parser.add_argument("--extra-path", type=Path, action="append", default=[])
    parser.add_argument("--dtype", choices=sorted(bench_peers.DTYPES), default="fp32")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames-per-clip", type=int, default=16)
    parser.add_argument("--motion-frames", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--sides", default="hallo,ours-parity", help="hallo, ours-parity, ours-fast")
    parser.add_argument("--no-warmup", action="store_true", help="profile the first run (e.g. a slow bf16 path)")
    parser.add_argument("--limit", type=int, default=25, help="rows per table")
    parser.add_argument("--output", type=Path, default=Path("profile_peers.json"))
    args = parser.parse_args()
    args.tiny, args.decode_chunk_size, args.device = False, 8, "cpu"
    args.hallo_src = args.hallo_src.resolve()
    for path in args.extra_path:
        sys.path.insert(0, str(path.resolve()))
    torch.set_grad_enabled(False)
    goldens = bench_peers.load_goldens_module()
    goldens.install_shims()
    sys.path.insert(0, str(args.hallo_src))
    from emo_pipeline import hallo_conversion

    with tempfile.TemporaryDirectory(prefix="profile-peers-") as work:
        hallo = bench_peers.build_hallo(args, goldens, Path(work))
        models, _ = bench_peers.load_ours(hallo)
    pipe = hallo_conversion.build_hallo_pipeline(models, hallo["vae"])
    pipe.set_progress_bar_config(disable=True)
    ours = {"models": models, "pipeline": pipe}
    inputs = bench_peers.make_inputs(args.size, args.frames_per_clip, hallo["audio_layers"], hallo["audio_dim"])
    runs = {
        "hallo": lambda: bench_peers.run_hallo(hallo, inputs, args, 1, args.steps),
        "ours-parity": lambda: bench_peers.run_ours("parity", "pipeline", ours, hallo, inputs, args, 1, args.steps),
        "ours-fast": lambda: bench_peers.run_ours("fast", "pipeline", ours, hallo, inputs, args, 1, args.steps),
    }
    result = {
        "benchmark": "profile_peers",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "extra_path"},
        "hallo_precision_shims": hallo["shims"],
        "machine": {**bench_peers.machine_info(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "sides": [],
    }
    for label in args.sides.split(","):
        if not args.no_warmup:
            with torch.no_grad():
                runs[label]()
        result["sides"].append(profile_side(label, runs[label], args.limit))
        print(json.dumps(result["sides"][-1]["top_ops"][:12], indent=1), flush=True)
        bench_peers.write(result, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

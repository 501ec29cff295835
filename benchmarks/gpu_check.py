"""Every speed switch in one go: seconds per frame, cold start, peak memory and frame difference to fp32. Writes json.

    python benchmarks/gpu_check.py                                  # GPU: SD1.5-shaped, 512 px, f=16, 40 steps
    python benchmarks/gpu_check.py --tiny --device cpu              # CPU smoke: tiny pipeline, a few steps
    python benchmarks/gpu_check.py --device cpu --size 128 --frames 4 --steps 2 --rows fp32 fp32-regional \\
        fp32-whole --out benchmarks/results/compile_sd15_128.json    # the CPU compile bench (README)
    python benchmarks/gpu_check.py --device cpu --size 128 --frames 4 --steps 2 --clips 1 --threads 2 \\
        --timeout 480 --rows fp32-whole --out benchmarks/results/compile_whole_sd15_128.json   # whole-model row

Rows (`--rows`, default: all that apply): precision (fp32 reference, fp16, bf16), each attention backend that can
run here (diffusers' registry, checked with its own requirement check), regional and whole-model compilation,
model and group offload, the step cache, torchao int8 / fp8 weight-only quantization. Each row runs in its own
process (fresh compile caches and memory peak) on the same random SD1.5-shaped weights (same seed): one 1-clip video
(cold start: its time, compilation included, is the time to the first frames), then a `--clips`-clip video (warm
seconds per frame). `max/mean_abs_difference` compare the warm video's frames in [0, 1] with the fp32 row's.
Peak memory: `torch.cuda.max_memory_allocated` on a GPU, the process's peak RSS on a CPU.

Against Hallo at the same precision (GPU only): `--hallo-src DIR` (a checkout of fudan-generative-vision/hallo;
`--hallo-extra-path` for einops) adds, per `--hallo-dtypes` (fp16 bf16), one `bench_peers.py --dtype D --device cuda`
process at this size / frames / steps / clips: Hallo's own loop, ours-parity and ours-fast alternated on the same
weights cast to D (Hallo through its `weight_dtype`, its bank in D: the one shim), rows `peers-D-<side>` with seconds
per output frame, the ratio to Hallo's, frame evaluations per output frame (steps x 2: both sides batch the two
guidance branches) and the frame difference to Hallo's. On a CPU, `bench_peers.py --dtype` does this.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKENDS = ("native", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn", "flex", "xformers",
            "sage", "flash", "_flash_3")  # fmt: skip


def all_rows(device: str) -> dict[str, dict]:
    half = "fp32" if device == "cpu" else "fp16"
    rows = {"fp32": {"dtype": "fp32"}, "fp16": {"dtype": "fp16"}, "bf16": {"dtype": "bf16"}}
    for backend in BACKENDS:
        rows[f"{half}-{backend}"] = {"dtype": half, "attention_backend": backend}
    for dtype in ("fp32", half):
        rows[f"{dtype}-regional"] = {"dtype": dtype, "compile": "regional"}
        rows[f"{dtype}-whole"] = {"dtype": dtype, "compile": "whole"}
    rows[f"{half}-model-offload"] = {"dtype": half, "offload": "model"}
    rows[f"{half}-group-offload"] = {"dtype": half, "offload": "group"}
    rows[f"{half}-step-cache-2"] = {"dtype": half, "step_cache": 2}
    rows[f"{half}-step-cache-2-regional"] = {"dtype": half, "step_cache": 2, "compile": "regional"}
    rows[f"{half}-int8"] = {"dtype": half, "quantize": "int8"}
    rows[f"{half}-fp8"] = {"dtype": half, "quantize": "fp8"}
    rows[f"{half}-bnb-8bit"] = {"dtype": half, "quantize": "bnb-8bit"}  # GPU: diffusers' bitsandbytes loader
    rows[f"{half}-bnb-4bit"] = {"dtype": half, "quantize": "bnb-4bit"}  # refuses a CPU (README, Speed switches)
    if device == "cpu":
        rows = {name: row for name, row in rows.items() if not any(k in name for k in ("fp16", "fp8", "bnb"))}
    return rows


def peak_memory(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weight_bytes(model) -> int:
    """Bytes the weights really occupy: a torchao quantized tensor counts its inner tensors (int8 data and scales),
    not its logical float size (what `get_memory_footprint` reports for weights quantized in place)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch_tensor_types()):
            names, _ = tensor.__tensor_flatten__()
            total += sum(getattr(tensor, name).nbytes for name in names)
        else:
            total += tensor.nbytes
    return total


def torch_tensor_types() -> tuple:
    import torch

    return (torch.Tensor, torch.nn.Parameter)


def run_row(spec: dict, args: argparse.Namespace, frames_path: str) -> dict:
    """One row in this process: build the pipeline, apply the switches, time the two videos."""
    import numpy as np
    import torch

    from emo_pipeline.cli._common import DTYPES, SpeedOptions
    from emo_pipeline.testing import demo_assets, sd15_shaped_pipeline, tiny_emo_pipeline

    torch.set_num_threads(args.threads or torch.get_num_threads())
    speed = SpeedOptions(**{k: v for k, v in spec.items() if k != "dtype"})
    speed.check()  # an attention backend that cannot run here is reported, not measured
    pipe = tiny_emo_pipeline() if args.tiny else sd15_shaped_pipeline()
    dtype = getattr(torch, DTYPES[spec.get("dtype", "fp32")])
    pipe.to(dtype=dtype)
    if speed.quantize and not speed.quantize.startswith("bnb"):
        from emo_pipeline.cli._common import _quantize_in_place

        _quantize_in_place(pipe, speed.quantize)
    compile_mode, speed.compile = speed.compile, "off"
    pipe = speed.apply(pipe, args.device)
    if speed.quantize and speed.quantize.startswith("bnb"):  # the loader's layers, quantized on the device
        from emo_pipeline.quantization import replace_linear_with_bitsandbytes

        for model in (pipe.unet, pipe.reference_net):
            replace_linear_with_bitsandbytes(model, speed.quantize)
    if compile_mode != "off":
        pipe.compile(
            regional=compile_mode == "regional",
            components=("unet", "reference_net"),
            **({"backend": args.compile_backend} if args.compile_backend else {}),
        )
    portrait, _ = demo_assets()
    fpc = args.frames

    def video(clips: int):
        audio = (np.random.default_rng(0).standard_normal(int(clips * fpc / 25 * 16000)) * 0.1).astype(np.float32)
        start = time.perf_counter()
        frames = pipe(
            portrait,
            audio,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            num_frames_per_clip=fpc,
            num_motion_frames=args.motion_frames,
            watermark=False,
            generator=torch.Generator().manual_seed(0),
        ).frames
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return frames, time.perf_counter() - start

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        _, cold = video(1)
        frames, warm = video(args.clips)
    np.save(frames_path, frames)
    return {
        "cold_start_seconds": round(cold, 2),
        "warm_seconds_per_frame": round(warm / len(frames), 3),
        "frame_evaluations_per_output_frame": args.steps * (2 if args.guidance else 1),
        "peak_memory_bytes": peak_memory(args.device),
        "unet_weight_bytes": weight_bytes(pipe.unet),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random pipeline (CPU smoke)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16, help="frames per clip f")
    parser.add_argument("--motion-frames", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--clips", type=int, default=2, help="clips of the warm video")
    parser.add_argument("--rows", nargs="+", help="row names (default: all that apply to the device)")
    parser.add_argument("--compile-backend", help="torch.compile backend (default: inductor; 'eager' for a smoke)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    parser.add_argument("--out", default=None, help="json path (default results/gpu_check_<model>_<size>.json)")
    parser.add_argument("--hallo-src", type=Path, help="Hallo checkout: add the like-for-like peer rows (GPU only)")
    parser.add_argument("--hallo-extra-path", type=Path, help="put on Hallo's sys.path (einops)")
    parser.add_argument("--hallo-dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--frames-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.guidance = True  # the pipeline's default guidance batches both branches: 2 evaluations per step
    if args.run_one:
        print("RESULT " + json.dumps(run_row(json.loads(args.run_one), args, args.frames_path)), flush=True)
        return

    if args.hallo_src is not None and not args.device.startswith("cuda"):
        parser.error("--hallo-src rows are GPU rows; on a CPU run benchmarks/bench_peers.py --dtype ...")

    import numpy as np

    rows = all_rows(args.device)
    names = args.rows or list(rows)
    unknown = set(names) - set(rows)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {sorted(rows)}")
    if "fp32" not in names:
        names = ["fp32", *names]
    model = "tiny" if args.tiny else "sd15"
    out = Path(args.out or HERE / "results" / f"gpu_check_{model}_{args.size}.json")
    result = {
        "model": "tiny random" if args.tiny else "sd15-shaped (random weights)",
        "device": args.device,
        "size": args.size,
        "frames_per_clip": args.frames,
        "steps": args.steps,
        "warm_clips": args.clips,
        "compile_backend": args.compile_backend or "inductor",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {_cpu_model()}",
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "rows": {},
    }
    if args.device.startswith("cuda"):
        import torch

        result["gpu"] = torch.cuda.get_device_name()
    frames_dir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    reference = None
    passthrough = ["--device", args.device, "--size", str(args.size), "--frames", str(args.frames)]
    passthrough += ["--steps", str(args.steps), "--clips", str(args.clips), "--motion-frames", str(args.motion_frames)]
    passthrough += ["--tiny"] if args.tiny else []
    passthrough += ["--compile-backend", args.compile_backend] if args.compile_backend else []
    passthrough += ["--threads", str(args.threads)] if args.threads else []
    for name in names:
        frames_path = str(frames_dir / f"{name}.npy")
        command = [sys.executable, __file__, *passthrough, "--run-one", json.dumps(rows[name]), "--frames-path",
                   frames_path]  # fmt: skip
        row = {"settings": rows[name]}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if lines:
                row.update(json.loads(lines[-1][7:]))
                frames = np.load(frames_path)
                if name == "fp32":
                    reference = frames
                elif reference is not None:
                    row["max_abs_difference_to_fp32"] = round(float(np.abs(frames - reference).max()), 5)
                    row["mean_abs_difference_to_fp32"] = round(float(np.abs(frames - reference).mean()), 6)
            else:
                row["error"] = (done.stderr.strip().splitlines() or ["no output"])[-1][:500]
        except subprocess.TimeoutExpired:
            row["error"] = f"did not finish in {args.timeout:g} s"
        row["loadavg_after_row"] = [round(x, 2) for x in os.getloadavg()]  # rows of one file may see other loads
        result["rows"][name] = row
        print(name, json.dumps(row), flush=True)
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every row: a cut-short run keeps its rows
    for dtype in args.hallo_dtypes if args.hallo_src is not None else ():
        result["rows"].update(peer_rows(dtype, args, frames_dir))
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        out.write_text(json.dumps(result, indent=2) + "\n")


def peer_rows(dtype: str, args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """`bench_peers.py --dtype dtype` on this device: Hallo's loop and ours at the same precision, alternated."""
    out = work / f"peers_{dtype}.json"
    command = [sys.executable, str(HERE / "bench_peers.py"), "--hallo-src", str(args.hallo_src), "--dtype", dtype,
               "--device", args.device, "--size", str(args.size), "--frames-per-clip", str(args.frames),
               "--motion-frames", str(args.motion_frames), "--steps", str(args.steps), "--clips", str(args.clips),
               "--repeats", "1", "--audio-seconds", "--modes", "parity,fast", "--output", str(out)]  # fmt: skip
    command += ["--extra-path", str(args.hallo_extra_path)] if args.hallo_extra_path else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {f"peers-{dtype}": {"error": f"did not finish in {args.timeout:g} s"}}
    if not out.is_file():
        return {f"peers-{dtype}": {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:500]}}
    peers = json.loads(out.read_text())
    rows = {}
    for side, summary in peers["summary"].items():
        if "seconds_per_output_frame" not in summary:
            continue
        runs = [r for r in peers["runs"] if r["side"] == side and r["phase"] == "timed"]
        rows[f"peers-{dtype}-{side}"] = {
            "settings": {
                "dtype": dtype,
                "side": side,
                "hallo_precision_shims": peers["config"]["hallo_precision_shims"],
            },
            "warm_seconds_per_frame": summary["seconds_per_output_frame"],
            "ratio_to_hallo": summary.get("ratio_to_hallo", 1.0),
            "frame_evaluations_per_output_frame": args.steps * 2,
            "peak_memory_bytes": max(r.get("gpu_peak_mb", 0) for r in runs) * 2**20 if runs else None,
            "max_abs_difference_to_hallo": summary.get("max_abs_diff_to_hallo", 0.0),
        }
    return rows


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()

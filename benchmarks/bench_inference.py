"""Inference benchmark: speed, work per output frame and peak memory vs audio length or precision mode. Writes json.

    python benchmarks/bench_inference.py                       # tiny random pipeline, 64 px
    python benchmarks/bench_inference.py --sd15-shaped --size 256 --steps 4 --seconds 1 2
    python benchmarks/bench_inference.py --sd15-shaped --size 128 --steps 2 --frames-per-clip 16 \
        --motion-frames 2 --clips 2 --modes fp32,bf16,compile,bf16+compile

Each audio length or mode runs in a fresh subprocess (so peak memory is that run's own) and streams clips with
`iter_clips` (as `write_video` does): peak memory should not grow with the audio length.

`--modes` compares ways of running the same pipeline (same random weights, seed, inputs; watermark off). A mode is
`+`-joined parts: `fp32` (the reference, nothing changed), `bf16` (`pipe.to(torch.bfloat16)`), `compile`
(`pipe.compile()`: backbone, ReferenceNet and VAE decoder), `vaecompile` (`pipe.compile(components=("vae",))`), `cl`
(the VAE in channels-last memory format), `tiny` (`decoder="tiny"`, TAESD's architecture with random weights: its
speed is real, its frames are not). Each mode first runs a one-clip, one-step warm-up (the compile modes compile
there; reported as `warmup_seconds`), then the timed run. Frames are compared with the fp32 mode's: `max_abs_diff` /
`mean_abs_diff` in [0, 1] pixel units.
Memory: `loop_peak_rss_mb` is the highest RSS a
sampling thread (every 20 ms) saw during the timed run, `construction_peak_rss_mb` the process peak before it
(building the random-weight pipeline holds three UNet copies at once), `loop_above_models_mb` the loop's peak
minus the RSS just before the loop (activations, caches, decoded frames).
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


MODE_PARTS = ("fp32", "bf16", "compile", "vaecompile", "cl", "tiny")


def parse_mode(mode: str) -> set[str]:
    parts = set(mode.split("+"))
    unknown = parts - set(MODE_PARTS)
    if unknown or not mode:
        raise SystemExit(f"unknown mode part(s) {sorted(unknown)} in {mode!r}; parts: {MODE_PARTS}")
    return parts


class PeakRSS:
    """Highest resident set size seen by a background thread sampling every `interval` seconds (bytes)."""

    def __init__(self, interval: float = 0.02):
        import threading

        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.process.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def run_mode(args: argparse.Namespace, mode: str, frames_path: str) -> dict:
    """One mode in this process: build, convert, warm up, then time `args.clips` clips; frames saved as .npy."""
    import numpy as np
    import psutil
    import torch

    from emo_pipeline.testing import demo_assets, sd15_shaped_pipeline, tiny_emo_pipeline, tiny_taesd

    parts = parse_mode(mode)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    load_before = os.getloadavg()
    build_start = time.perf_counter()
    if args.pipeline_folder:  # saved once by the parent: every mode loads the same weights, one copy at a time
        from emo_pipeline import EMOPipeline

        pipe = EMOPipeline.from_pretrained(args.pipeline_folder)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = sd15_shaped_pipeline() if args.sd15_shaped else tiny_emo_pipeline()  # same seed: same weights
    if "tiny" in parts:
        if args.sd15_shaped:
            from diffusers import AutoencoderTiny

            torch.manual_seed(4)
            pipe.tiny_decoder = AutoencoderTiny().eval()  # TAESD's own layer sizes, random weights
        else:
            pipe.tiny_decoder = tiny_taesd()
    if "bf16" in parts:
        pipe.to(torch.bfloat16)
    if "cl" in parts:
        pipe.vae.to(memory_format=torch.channels_last)
    if "compile" in parts:
        pipe.compile()  # backbone, ReferenceNet and VAE decoder
    elif "vaecompile" in parts:
        pipe.compile(components=("vae",))
    build_seconds = time.perf_counter() - build_start
    portrait, _ = demo_assets()
    f = args.frames_per_clip
    audio = (np.random.default_rng(0).standard_normal(round(args.clips * f / 25 * 16000)) * 0.1).astype(np.float32)
    call = {
        "height": args.size,
        "width": args.size,
        "num_frames_per_clip": f,
        "num_motion_frames": args.motion_frames,
        "guidance_scale": args.guidance_scale,
        "watermark": False,
        "decoder": "tiny" if "tiny" in parts else "vae",
    }

    warmup_start = time.perf_counter()  # one clip, one step: every shape the timed run uses (compiles here)
    for _ in pipe.iter_clips(portrait, audio[: round(f / 25 * 16000)], num_inference_steps=1, **call):
        pass
    warmup_seconds = time.perf_counter() - warmup_start

    vae_time = [0.0]
    decoder = pipe.tiny_decoder if "tiny" in parts else pipe.vae
    original = decoder.decode

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            vae_time[0] += time.perf_counter() - start

    decoder.decode = timed
    construction_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before_loop = psutil.Process().memory_info().rss / 2**20
    clips = []
    with PeakRSS() as peak:
        start = time.perf_counter()
        for clip in pipe.iter_clips(
            portrait, audio, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), **call
        ):
            clips.append(clip)
        total = time.perf_counter() - start
    frames = np.concatenate(clips)
    np.save(frames_path, frames)
    return {
        "mode": mode,
        "output_frames": len(frames),
        "clips": pipe.last_plan.num_clips,
        "seconds_total": round(total, 2),
        "seconds_per_output_frame": round(total / len(frames), 4),
        "decode_time_share": round(vae_time[0] / total, 4),
        "warmup_seconds": round(warmup_seconds, 1),
        "build_seconds": round(build_seconds, 1),
        "construction_peak_rss_mb": round(construction_peak, 1),
        "rss_before_loop_mb": round(before_loop, 1),
        "loop_peak_rss_mb": round(peak.peak / 2**20, 1),
        "loop_above_models_mb": round(peak.peak / 2**20 - before_loop, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def compare_modes(args: argparse.Namespace, on_run=None) -> dict:
    """Run each of `args.modes` in a fresh subprocess; frame differences against the first mode (fp32)."""
    import tempfile

    import numpy as np

    modes = args.modes.split(",")
    for mode in modes:
        parse_mode(mode)
    if modes[0] != "fp32":
        raise SystemExit("--modes must start with fp32, the reference the others are compared with")
    runs, reference = [], None
    with tempfile.TemporaryDirectory() as folder:
        pipeline_folder = None
        if args.sd15_shaped:  # built once (its construction holds three UNet copies), loaded by every mode
            pipeline_folder = os.path.join(folder, "pipeline")
            build = "import sys; from emo_pipeline.testing import sd15_shaped_pipeline as p; "
            build += "p().save_pretrained(sys.argv[1])"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", build, pipeline_folder], check=True)
            print(f"built and saved the SD1.5-shaped pipeline in {time.perf_counter() - start:.0f} s", flush=True)
        for mode in modes:
            frames_path = os.path.join(folder, f"{mode}.npy")
            command = [sys.executable, __file__, "--child-mode", mode, "--frames-path", frames_path]
            command += ["--size", str(args.size), "--steps", str(args.steps), "--clips", str(args.clips)]
            command += ["--frames-per-clip", str(args.frames_per_clip), "--motion-frames", str(args.motion_frames)]
            command += ["--guidance-scale", str(args.guidance_scale), "--threads", str(args.threads)]
            command += ["--sd15-shaped", "--pipeline-folder", pipeline_folder] if args.sd15_shaped else []
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode:
                runs.append({"mode": mode, "error": child.stderr.strip().splitlines()[-1:]})
                print(json.dumps(runs[-1]), flush=True)
                continue
            run = json.loads(child.stdout.strip().splitlines()[-1])
            frames = np.load(frames_path)
            if reference is None:
                reference = frames
            difference = np.abs(frames.astype(np.float64) - reference)
            run["max_abs_diff"] = round(float(difference.max()), 5)
            run["mean_abs_diff"] = round(float(difference.mean()), 6)
            runs.append(run)
            print(json.dumps(run), flush=True)
            if on_run is not None:
                on_run(runs)
    return {"runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd15-shaped", action="store_true", help="SD1.5-sized random weights instead of tiny")
    parser.add_argument("--size", type=int, help="output side (default: 64 tiny, 256 sd15-shaped)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames-per-clip", type=int, default=12)
    parser.add_argument("--motion-frames", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 8.0], help="audio lengths to compare")
    parser.add_argument("--modes", help="comma-separated modes to compare, fp32 first (see the module docstring)")
    parser.add_argument("--clips", type=int, default=2, help="clips per run with --modes")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/inference.json")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    parser.add_argument("--frames-path", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (256 if args.sd15_shaped else 64)

    if args.child is not None:  # one measurement, in its own process
        print(json.dumps(run_once(args, args.child)))
        return 0
    if args.child_mode is not None:
        print(json.dumps(run_mode(args, args.child_mode, args.frames_path)))
        return 0
    if args.modes:
        import torch

        hidden = ("child", "child_mode", "frames_path", "pipeline_folder")
        result = {
            "benchmark": "inference_modes",
            "config": {k: v for k, v in vars(args).items() if k not in hidden},
            "machine": machine_info(torch),
        }
        # Written after every mode, so a long run that is stopped keeps the modes it measured.
        result.update(compare_modes(args, lambda runs: write({**result, "runs": runs}, args.output)))
        write({**result, "machine": machine_info(torch)}, args.output)
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
        "machine": machine_info(torch),
        "runs": runs,
        "peak_rss_growth_mb": round(runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"], 1),
    }
    write(result, args.output)
    return 0


def machine_info(torch) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

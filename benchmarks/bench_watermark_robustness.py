"""Watermark robustness: bit accuracy and detection after what platforms and people do to a video, and the false-
positive rate on clean clips. Writes json (benchmarks/results/watermark_robustness.json) and prints a table.

    nice -n 10 python benchmarks/bench_watermark_robustness.py --size 256 --seconds 2 --clean-clips 1000

The watermarked video is the bundled portrait drifting like a talking head (as tests/test_watermark.py), written by
`VideoWriter` (libx264 crf 18, what the pipeline writes), then transformed with FFmpeg-equivalent operations
(PyAV + OpenCV) and re-encoded at crf 18 unless the transform is the encode itself. Each transformed file goes
through `detect_watermark_in_file` (the same call as `emo-watermark detect`). The false-positive rate is measured
with `detect_watermark` on `--clean-clips` unwatermarked clips (random crops, scales, flips and tints of the
portrait, smooth gradients and noise; `--clean-size` px, `--clean-frames` frames), each at the same threshold.
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

import av
import cv2
import numpy as np
import PIL.Image

from emo_pipeline.media import VideoWriter
from emo_pipeline.testing import demo_assets
from emo_pipeline.watermark import detect_watermark, detect_watermark_in_file, embed_watermark


def talking_head(size: int, num_frames: int) -> np.ndarray:
    portrait = np.asarray(PIL.Image.open(demo_assets()[0]).convert("RGB"))
    big = cv2.resize(portrait, (size + 16, size + 16), interpolation=cv2.INTER_AREA)
    frames = []
    for i in range(num_frames):
        dy, dx = round(4 + 2 * np.cos(i / 5)), round(4 + 3 * np.sin(i / 4))
        frames.append(big[dy : dy + size, dx : dx + size])
    return np.stack(frames)


def read_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def write(path: Path, frames: np.ndarray, fps: float = 25, crf: int = 18) -> Path:
    even = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    with VideoWriter(path, fps=fps, crf=crf, preset="veryfast") as writer:
        writer.write(np.ascontiguousarray(even))
    return path


def resize(frames: np.ndarray, scale: float) -> np.ndarray:
    h, w = frames.shape[1:3]
    size = (max(2, round(w * scale)), max(2, round(h * scale)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


def centre_crop(frames: np.ndarray, fraction: float) -> np.ndarray:
    """Remove `fraction` of each side's length in total (half on each side): 10% of a 256 frame keeps 230."""
    h, w = frames.shape[1:3]
    ch, cw = round(h * (1 - fraction)), round(w * (1 - fraction))
    y, x = (h - ch) // 2, (w - cw) // 2
    return frames[:, y : y + ch, x : x + cw]


def screen_recording(frames: np.ndarray, seed: int = 0) -> np.ndarray:
    """Stand-in for filming a screen / screen capture: shown at 1.5x, slight blur, sensor noise, captured back at
    0.75x of the shown size, re-encoded at crf 23."""
    rng = np.random.default_rng(seed)
    shown = resize(frames, 1.5)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 1.0) for f in shown])
    noisy = np.clip(blurred + rng.normal(0, 3.0, blurred.shape), 0, 255).astype(np.uint8)
    return resize(noisy, 0.75)


def attacks(marked: Path, work: Path) -> dict[str, Path]:
    frames = read_frames(marked)
    grey = (frames @ np.array([0.299, 0.587, 0.114])).round().clip(0, 255).astype(np.uint8)
    out = {"none (crf 18 as written)": marked}
    for crf in (18, 28, 35):
        out[f"h264 crf {crf} re-encode"] = write(work / f"crf{crf}.mp4", frames, crf=crf)
    out["downscale 0.5x"] = write(work / "half.mp4", resize(frames, 0.5))
    out["downscale 0.25x"] = write(work / "quarter.mp4", resize(frames, 0.25))
    out["centre crop 10%"] = write(work / "crop10.mp4", centre_crop(frames, 0.10))
    out["centre crop 25%"] = write(work / "crop25.mp4", centre_crop(frames, 0.25))
    keep = [round(i * 25 / 15) for i in range(len(frames) * 15 // 25)]  # nearest source frame of each 15 fps tick
    out["15 fps resample"] = write(work / "fps15.mp4", frames[keep], fps=15)
    out["horizontal flip"] = write(work / "flip.mp4", frames[:, :, ::-1])
    out["grey-scale"] = write(work / "grey.mp4", np.repeat(grey[..., None], 3, axis=-1))
    out["brightness +20"] = write(work / "bright.mp4", np.clip(frames.astype(np.int16) + 20, 0, 255).astype(np.uint8))
    contrast = np.clip((frames.astype(np.float32) - 128) * 1.2 + 128, 0, 255).round().astype(np.uint8)
    out["contrast x1.2"] = write(work / "contrast.mp4", contrast)
    out["screen recording stand-in"] = write(work / "screen.mp4", screen_recording(frames), crf=23)
    return out


def clean_clips(count: int, size: int, num_frames: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    portrait = np.asarray(PIL.Image.open(demo_assets()[0]).convert("RGB"))
    for index in range(count):
        kind = index % 3
        if kind == 0:  # a random crop of the portrait at a random scale, maybe flipped and tinted
            scale = rng.uniform(size / 512, 1.0)
            side = round(512 * scale)
            y, x = rng.integers(0, 512 - side + 1, size=2)
            crop = cv2.resize(portrait[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = np.clip(crop * rng.uniform(0.7, 1.3, size=3), 0, 255).astype(np.uint8)
            clip = np.stack([np.roll(crop, (i, i), axis=(0, 1)) for i in range(num_frames)])
        elif kind == 1:  # smooth moving gradients
            yy, xx = np.mgrid[0:size, 0:size] / size
            f = rng.uniform(0.5, 4, size=3)
            clip = (
                np.stack(
                    [
                        np.stack(
                            [128 + 100 * np.sin(2 * np.pi * (f[c] * (xx + yy * c / 3) + t / 10)) for c in range(3)], -1
                        )
                        for t in range(num_frames)
                    ]
                )
                .clip(0, 255)
                .astype(np.uint8)
            )
        else:  # noise, smoothed by a random amount
            noise = rng.integers(0, 256, size=(num_frames, size, size, 3), dtype=np.uint8)
            sigma = rng.uniform(0.1, 3.0)
            clip = np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in noise])
        yield clip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--clean-clips", type=int, default=1000)
    parser.add_argument("--clean-size", type=int, default=96)
    parser.add_argument("--clean-frames", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/watermark_robustness.json")
    args = parser.parse_args()

    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        frames = embed_watermark(talking_head(args.size, round(25 * args.seconds)))
        marked = write(work / "marked.mp4", frames)
        for name, path in attacks(marked, work).items():
            t0 = time.perf_counter()
            result = detect_watermark_in_file(path)
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                shape = f"{stream.width}x{stream.height}"
            rows.append(
                {
                    "transform": name,
                    "size": shape,
                    "bit_accuracy": round(result.bit_accuracy, 3),
                    "found": bool(result.found),
                    "resync": result.resync,
                    "inverted": bool(result.inverted),
                    "detect_seconds": round(time.perf_counter() - t0, 2),
                }
            )
            print(f"{name:32s} {shape:>9s}  bit accuracy {result.bit_accuracy:.3f}  found {result.found}", flush=True)
    false_positives = 0
    accuracies = []
    t0 = time.perf_counter()
    for clip in clean_clips(args.clean_clips, args.clean_size, args.clean_frames):
        result = detect_watermark(clip)
        false_positives += bool(result.found)
        accuracies.append(result.bit_accuracy)
    fp_seconds = time.perf_counter() - t0
    detected = sum(r["found"] for r in rows)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    result = {
        "video": f"bundled portrait drifting, {args.size}x{args.size}, {round(25 * args.seconds)} frames at 25 fps, "
        "watermarked, libx264 crf 18",
        "transforms": rows,
        "detection_rate": f"{detected}/{len(rows)}",
        "clean_clips": {
            "count": args.clean_clips,
            "size": args.clean_size,
            "frames": args.clean_frames,
            "false_positives": false_positives,
            "false_positive_rate": false_positives / max(1, args.clean_clips),
            "bit_accuracy_mean": round(float(np.mean(accuracies)), 4),
            "bit_accuracy_std": round(float(np.std(accuracies)), 4),
            "seconds": round(fp_seconds, 1),
        },
        "cpu": model,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - start, 1),
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["clean_clips"]), f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""emo-preprocess benchmark: frames per second per worker on a synthetic talking-head video. Writes json.

    python benchmarks/bench_preprocess.py                                  # 10 s, 256 px source, 64 px crops
    python benchmarks/bench_preprocess.py --source-size 1280 720 --size 512 --workers 1 2 --audio-encoder PATH

Two measurements:

* `in_process`: `process_video` on one video in this process (no worker start-up), with the time split into
  stages: decode + scene histograms ("decode_and_other"), face detection, cropping, H.264 encoding, face mesh and
  wav2vec2 features (the tiny seeded wav2vec2 unless `--audio-encoder` names a real one).
* `pool`: `preprocess_videos` with N spawn workers on `videos_per_worker * N` copies of the video, wall time
  including the workers' start-up (imports, model loading), so frames/s/worker here is what a short run sees.

"Frames" are output frames at the target fps (the resampled source frames that were analysed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _timed(owner, name: str, totals: dict, key: str):
    """Accumulate the time spent in `owner.name` into `totals[key]` while the context is open."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def bench_in_process(video: Path, work: Path, args: argparse.Namespace, encoder_path: str | None) -> dict:
    import emo_pipeline.audio as audio_module
    import emo_pipeline.data.clips as clips_module
    import emo_pipeline.face as face_module
    from emo_pipeline.data.preprocess import PreprocessConfig, _load_audio_encoder, process_video
    from emo_pipeline.media import VideoWriter

    config = PreprocessConfig(
        size=args.size,
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
        min_face=args.min_face,
        audio_encoder=encoder_path,
        frame_cache_mb=args.frame_cache_mb,
    )
    encoder = _load_audio_encoder(encoder_path, "cpu")
    totals = dict.fromkeys(("detect", "crop", "encode", "mesh_with_crop_and_encode", "features"), 0.0)
    output = work / "in_process"
    (output / "clips").mkdir(parents=True)
    with (
        _timed(face_module, "detect_faces", totals, "detect"),
        _timed(clips_module, "crop_frames", totals, "crop"),
        _timed(VideoWriter, "write", totals, "encode"),
        _timed(face_module, "estimate_head_poses", totals, "mesh_with_crop_and_encode"),
        _timed(audio_module, "extract_audio_features", totals, "features"),
    ):
        start = time.perf_counter()
        result = process_video(video, video.name, output, config, encoder)
        seconds = time.perf_counter() - start
    if result.status != "done":
        raise RuntimeError(f"the benchmark video failed: {result.reason}: {result.message}")
    mesh = totals.pop("mesh_with_crop_and_encode") - totals["crop"] - totals["encode"]
    stages = {**totals, "mesh": mesh}
    stages["decode_and_other"] = seconds - sum(stages.values())
    return {
        "frames": result.frames,
        "clips": len(result.clips),
        "seconds": round(seconds, 3),
        "frames_per_second": round(result.frames / seconds, 2),
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "stage_ms_per_frame": {k: round(1000 * v / result.frames, 3) for k, v in stages.items()},
    }


def bench_pool(video: Path, work: Path, args: argparse.Namespace, encoder_path: str | None, workers: int) -> dict:
    from emo_pipeline.data.preprocess import preprocess_videos

    sources = work / f"sources_{workers}"
    sources.mkdir()
    count = args.videos_per_worker * workers
    for index in range(count):
        shutil.copy(video, sources / f"copy{index:03d}.mp4")
    start = time.perf_counter()
    summary = preprocess_videos(
        sources,
        work / f"out_{workers}",
        size=args.size,
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
        min_face=args.min_face,
        audio_encoder=encoder_path,
        workers=workers,
        frame_cache_mb=args.frame_cache_mb,
        progress=False,
    )
    seconds = time.perf_counter() - start
    if summary.failed:
        raise RuntimeError(f"{summary.failed} benchmark videos failed: {summary.failures}")
    states = [json.loads(p.read_text()) for p in (work / f"out_{workers}" / ".state").glob("*.json")]
    frames = sum(state["frames"] for state in states)
    busy = sum(state["timings"]["total"] for state in states)  # seconds the workers spent inside process_video
    return {
        "workers": workers,
        "videos": count,
        "frames": frames,
        "seconds": round(seconds, 3),
        "frames_per_second": round(frames / seconds, 2),
        "frames_per_second_per_worker": round(frames / seconds / workers, 2),
        # Without the workers' start-up: the rate of a long run.
        "busy_frames_per_second_per_worker": round(frames / busy, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the synthetic source video")
    parser.add_argument("--source-size", type=int, nargs="+", default=[256], help="side, or width height")
    parser.add_argument("--size", type=int, default=64, help="output crop side")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=5.0)
    parser.add_argument("--min-face", type=float, default=20.0)
    parser.add_argument("--frame-cache-mb", type=float, default=1024.0)
    parser.add_argument("--audio-encoder", help="wav2vec2 folder or hub id (default: the tiny seeded test model)")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="pool sizes to run (none: skip)")
    parser.add_argument("--videos-per-worker", type=int, default=2)
    parser.add_argument("--output", help="json file (default: stdout)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if args.audio_encoder is None else "0")

    from emo_pipeline.data.synthetic import write_synthetic_video
    from emo_pipeline.testing import tiny_wav2vec2

    size = args.source_size[0] if len(args.source_size) == 1 else tuple(args.source_size[:2])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        encoder_path = args.audio_encoder
        if encoder_path is None:
            encoder_path = os.fspath(work / "tiny_wav2vec2")
            model, extractor = tiny_wav2vec2()
            model.save_pretrained(encoder_path)
            extractor.save_pretrained(encoder_path)
        video = work / "talk.mp4"
        half = args.seconds / 2  # two shots (a scene cut in the middle), the head turning at two speeds
        write_synthetic_video(video, shots=((half, 0.3), (args.seconds - half, 0.8)), fps=args.fps, size=size)
        report = {
            "benchmark": "emo-preprocess",
            "source": {"seconds": args.seconds, "size": size, "fps": args.fps},
            "output_size": args.size,
            "audio_encoder": args.audio_encoder or "tiny seeded wav2vec2 (emo_pipeline.testing)",
            "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
            "in_process": bench_in_process(video, work, args, encoder_path),
            "pool": [bench_pool(video, work, args, encoder_path, workers) for workers in args.workers],
        }
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

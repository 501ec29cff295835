"""emo-preprocess: a folder of raw talking-head videos -> an EMO training dataset (clips, manifest, statistics).

    emo-preprocess INPUT_DIR OUTPUT_DIR [--fps 25] [--size 512] [--min-seconds 3] [--max-seconds 12] [--workers N]

Every video under INPUT_DIR (mp4/mov/mkv/webm/avi/m4v, in subfolders too) is cut at scene changes into clips of one
face, cropped square around it, and written with its audio, wav2vec2 features, face boxes/mask and head speed to
OUTPUT_DIR/clips/; OUTPUT_DIR/manifest.jsonl lists the clips, failures.jsonl the videos that gave none (and why),
stats.json and speed_buckets.yaml describe the dataset. Re-running resumes: finished videos and clips are skipped,
failed videos are retried only with --retry-failed. Exit codes: 0 done (even if some videos failed: they are in
failures.jsonl), 2 bad arguments or input (the message names it), 130 interrupted (finished clips are kept and
listed; re-run to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys

from emo_pipeline.errors import EMOInputError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `emo-preprocess`, every option's default in its help."""
    from emo_pipeline.data.clips import REJECTION_REASONS
    from emo_pipeline.data.preprocess import DEFAULT_AUDIO_ENCODER, PreprocessConfig

    d = PreprocessConfig()
    reasons = "\n".join(f"  {name:<17}{text}" for name, text in REJECTION_REASONS.items())
    parser = argparse.ArgumentParser(
        prog="emo-preprocess",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "example:\n  emo-preprocess raw_videos/ data/my_dataset --workers 4 --fps 25 --size 512\n\n"
            "why a clip is rejected (counted in stats.json; a video with no clip is in failures.jsonl):\n"
            f"{reasons}\n\n"
            "exit codes:\n  0    done (videos that gave no clip are listed in failures.jsonl)\n"
            "  2    bad arguments or input (the message names it)\n"
            "  130  interrupted: finished clips are kept; re-run the same command to resume"
        ),
    )
    parser.add_argument("input_dir", help="folder of source videos: mp4/mov/mkv/webm/avi/m4v, searched recursively")
    parser.add_argument("output_dir", help="dataset folder to create, or to resume")
    parser.add_argument("--fps", type=float, default=d.fps, help=f"frame rate of the clips (default: {d.fps:g})")
    parser.add_argument("--size", type=int, default=d.size, help=f"side of the square crops in px (default: {d.size})")
    parser.add_argument(
        "--min-seconds", type=float, default=d.min_seconds, help=f"shortest clip (default: {d.min_seconds:g})"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=d.max_seconds, help=f"longest clip (default: {d.max_seconds:g})"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (default: 1, this process)")
    parser.add_argument("--retry-failed", action="store_true", help="reprocess the videos listed in failures.jsonl")
    parser.add_argument(
        "--audio-encoder",
        default=DEFAULT_AUDIO_ENCODER,
        help=f"wav2vec2 Hub id or local folder; 'none' writes no features (default: {DEFAULT_AUDIO_ENCODER})",
    )
    parser.add_argument(
        "--features-fp16", action="store_true", help="store the audio features as float16 (default: float32)"
    )
    parser.add_argument(
        "--crop-scale",
        type=float,
        default=d.crop_scale,
        help=f"crop side / side of the clip's union face box, as at inference (default: {d.crop_scale:g})",
    )
    parser.add_argument(
        "--min-face",
        type=float,
        default=d.min_face,
        help=f"reject clips whose median face is smaller, in source pixels (default: {d.min_face:g})",
    )
    parser.add_argument(
        "--max-jump",
        type=float,
        default=d.max_jump,
        help=f"reject clips whose face box moves/resizes more than this many face sizes in one frame "
        f"(default: {d.max_jump:g})",
    )
    parser.add_argument(
        "--max-bad-frames",
        type=float,
        default=d.max_bad_frame_fraction,
        help="fraction of a clip's frames allowed without a face (and, separately, with two) "
        f"(default: {d.max_bad_frame_fraction:g})",
    )
    parser.add_argument(
        "--scene-threshold",
        type=float,
        default=d.scene_threshold,
        help=f"histogram distance (0-1) between consecutive frames that counts as a scene cut "
        f"(default: {d.scene_threshold:g})",
    )
    parser.add_argument(
        "--crf", type=int, default=d.crf, help=f"H.264 quality of the clip videos, lower is better (default: {d.crf})"
    )
    parser.add_argument(
        "--speed-buckets",
        type=int,
        default=d.speed_buckets,
        help=f"number of speed buckets to suggest in speed_buckets.yaml (default: {d.speed_buckets})",
    )
    parser.add_argument(
        "--frame-cache-mb",
        type=float,
        default=d.frame_cache_mb,
        help=f"decoded frames kept per process; beyond it frames are decoded twice (default: {d.frame_cache_mb:g})",
    )
    parser.add_argument(
        "--device", default=d.device, help=f"device for wav2vec2: cpu, cuda, cuda:1, ... (default: {d.device})"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every rejected clip")
    return parser


def main(argv: list[str] | None = None) -> int:
    # mediapipe/TFLite/absl start-up lines are kept off stderr where the graphs start (emo_pipeline._native_log);
    # GLOG_minloglevel / TF_CPP_MIN_LOG_LEVEL have no effect on mediapipe 0.10.21.
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    from emo_pipeline.data.preprocess import preprocess_videos

    audio_encoder = None if args.audio_encoder.lower() == "none" else args.audio_encoder
    try:
        summary = preprocess_videos(
            args.input_dir,
            args.output_dir,
            fps=args.fps,
            size=args.size,
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
            crop_scale=args.crop_scale,
            min_face=args.min_face,
            max_jump=args.max_jump,
            max_bad_frame_fraction=args.max_bad_frames,
            scene_threshold=args.scene_threshold,
            audio_encoder=audio_encoder,
            features_fp16=args.features_fp16,
            crf=args.crf,
            speed_buckets=args.speed_buckets,
            frame_cache_mb=args.frame_cache_mb,
            device=args.device,
            workers=args.workers,
            retry_failed=args.retry_failed,
            progress=not args.no_progress,
        )
    except EMOInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished clips are kept and listed in manifest.jsonl; re-run to resume", file=sys.stderr)
        return 130
    print(summary.describe())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

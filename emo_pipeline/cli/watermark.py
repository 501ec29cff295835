"""`emo-watermark`: check a video for the emo-pipeline provenance watermark and its AI-generated tag.

    emo-watermark detect FILE [--max-frames N]

Prints the verdict ("watermark: found" / "watermark: not found"), the bit accuracy, the number of frames examined
and the AI-generated container tag if present. Exit status: 0 found, 1 not found, 2 bad input (unreadable file,
no video stream, bad arguments; the message on stderr names the input).
"""

import argparse
import sys

from emo_pipeline.errors import EMOInputError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `emo-watermark` (one sub-command, `detect`)."""
    parser = argparse.ArgumentParser(
        prog="emo-watermark", description="Check videos for the emo-pipeline invisible provenance watermark."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser(
        "detect",
        help="look for the watermark in a video file",
        description="Exit status: 0 watermark found, 1 not found, 2 bad input.",
    )
    detect.add_argument("file", help="video file (mp4 or anything FFmpeg reads), at its written resolution")
    detect.add_argument(
        "--max-frames",
        type=_positive_int,
        default=250,
        help="examine at most this many frames from the start (default: 250, 10 s at 25 fps)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `emo-watermark` on `argv` (default: sys.argv[1:]); return the exit status: 0 found, 1 not, 2 bad input."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # argparse exits 2 on bad usage and 0 on --help; return it instead
        return int(exit_request.code or 0)

    # Imported here so that `--help` and usage errors stay fast (no numpy/PyAV import).
    from emo_pipeline.watermark import (
        DEFAULT_PAYLOAD,
        detect_watermark_in_file,
        detection_threshold,
        read_ai_metadata,
    )

    try:
        result = detect_watermark_in_file(args.file, max_frames=args.max_frames)
        tags = read_ai_metadata(args.file)
    except EMOInputError as error:
        print(f"emo-watermark: error: {error}", file=sys.stderr)
        return 2

    num_bits = len(DEFAULT_PAYLOAD)
    print(f"watermark: {'found' if result.found else 'not found'}")
    print(
        f"bit accuracy: {result.bit_accuracy:.3f} "
        f"(found at >= {detection_threshold(num_bits):.3f} of the {num_bits}-bit payload; ~0.5 when absent)"
    )
    print(f"frames examined: {result.num_frames}")
    if tags:
        for key, value in tags.items():
            print(f"ai-generated metadata: {key}: {value}")
    else:
        print("ai-generated metadata: none")
    return 0 if result.found else 1


if __name__ == "__main__":
    sys.exit(main())

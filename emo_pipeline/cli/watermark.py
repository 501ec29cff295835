"""`emo-watermark`: check a video for the emo-pipeline provenance signals.

    emo-watermark detect FILE [--max-frames N] [--key SECRET]
    emo-watermark verify FILE [--max-frames N] [--key SECRET] [--trust-anchors ROOTS.pem] [--json]

`detect` prints the watermark verdict ("watermark: found" / "watermark: not found"), the bit accuracy, the number
of frames examined and the AI-generated container tag if present. Exit status: 0 found, 1 not found, 2 bad input
(unreadable file, no video stream, bad arguments; the message on stderr names the input).

`verify` reports both signals in one place: the C2PA content credentials (trusted / valid / invalid / absent, who
signed, what the manifest claims; needs `pip install 'emo-pipeline[c2pa]'`) and the watermark (found, bit
accuracy). Exit status, for scripts:

    0  credentials valid (or trusted) and watermark found
    1  neither: no credentials and no watermark
    2  bad input (unreadable file, bad arguments)
    3  credentials INVALID: the file was changed after signing, or the signature is broken
    4  watermark only: no credentials (unsigned output, or credentials stripped by a re-encode)
    5  credentials only (valid): no watermark found (made with --no-watermark, or degraded past detection)
"""

import argparse
import sys

from emo_pipeline.errors import EMOInputError

VERIFY_EXIT_CODES = {"both": 0, "none": 1, "bad input": 2, "invalid": 3, "watermark only": 4, "credentials only": 5}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `emo-watermark` (sub-commands `detect` and `verify`)."""
    parser = argparse.ArgumentParser(
        prog="emo-watermark",
        description="Check videos for the emo-pipeline provenance signals: the invisible watermark and the signed "
        "C2PA content credentials.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser(
        "detect",
        help="look for the watermark in a video file",
        description="Exit status: 0 watermark found, 1 not found, 2 bad input.",
    )
    verify = commands.add_parser(
        "verify",
        help="check the C2PA content credentials and the watermark together",
        description="Exit status: 0 credentials valid and watermark found, 1 neither, 2 bad input, 3 credentials "
        "invalid (changed after signing), 4 watermark only (no credentials), 5 credentials only (no watermark).",
    )
    for command in (detect, verify):
        command.add_argument("file", help="video file (mp4 or anything FFmpeg reads), at its written resolution")
        command.add_argument(
            "--max-frames",
            type=_positive_int,
            default=250,
            help="examine at most this many frames from the start (default: 250, 10 s at 25 fps)",
        )
        command.add_argument(
            "--key",
            help="the deployer's secret watermark key (default: $EMO_WATERMARK_KEY, else the public key)",
        )
    verify.add_argument(
        "--trust-anchors", metavar="PEM", help="root certificates to trust: a valid signature from them is 'trusted'"
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def _watermark_lines(result, tags) -> list[str]:
    from emo_pipeline.watermark import DEFAULT_PAYLOAD, detection_threshold

    num_bits = len(DEFAULT_PAYLOAD)
    lines = [
        f"watermark: {'found' if result.found else 'not found'}",
        f"bit accuracy: {result.bit_accuracy:.3f} "
        f"(found at >= {detection_threshold(num_bits):.3f} of the {num_bits}-bit payload; ~0.5 when absent)",
        f"frames examined: {result.num_frames}",
    ]
    if tags:
        lines += [f"ai-generated metadata: {key}: {value}" for key, value in tags.items()]
    else:
        lines.append("ai-generated metadata: none")
    return lines


def verdict(credentials_state: str, watermark_found: bool) -> str:
    """The `VERIFY_EXIT_CODES` key for a credentials state ("trusted"/"valid"/"invalid"/"absent"/"unavailable")
    and a watermark verdict."""
    if credentials_state == "invalid":
        return "invalid"
    signed = credentials_state in ("valid", "trusted")
    if signed:
        return "both" if watermark_found else "credentials only"
    return "watermark only" if watermark_found else "none"


def _verify(args: argparse.Namespace) -> int:
    import json

    from emo_pipeline.provenance import ContentCredentials, read_content_credentials
    from emo_pipeline.watermark import detect_watermark_in_file, read_ai_metadata

    result = detect_watermark_in_file(args.file, max_frames=args.max_frames, key=args.key)
    tags = read_ai_metadata(args.file)
    try:
        credentials = read_content_credentials(args.file, trust_anchors=args.trust_anchors)
        note = ""
    except EMOInputError as error:
        if "c2pa-python" not in str(error):
            raise
        credentials, note = (
            ContentCredentials("unavailable"),
            " (c2pa-python not installed: pip install 'emo-pipeline[c2pa]')",
        )
    outcome = verdict(credentials.state, result.found)
    if args.json:
        report = {
            "verdict": outcome,
            "exit_code": VERIFY_EXIT_CODES[outcome],
            "credentials": {
                "state": credentials.state,
                "signer": credentials.signer,
                "claims": credentials.claims,
                "failures": credentials.failures,
            },
            "watermark": {
                "found": result.found,
                "bit_accuracy": result.bit_accuracy,
                "frames": result.num_frames,
            },
            "ai_generated_metadata": tags,
        }
        print(json.dumps(report, indent=2))
        return VERIFY_EXIT_CODES[outcome]
    print(f"content credentials: {credentials.state}{note}")
    if credentials.signer:
        print(f"  signed by: {credentials.signer}")
    for failure in credentials.failures:
        print(f"  failure: {failure}")
    for action in credentials.claims.get("actions", []):
        agent = action.get("softwareAgent") or {}
        print(
            f"  action: {action.get('action')} ({action.get('digitalSourceType', '').rsplit('/', 1)[-1]})"
            f" by {agent.get('name', '?')} {agent.get('version', '')}".rstrip()
        )
        model = (action.get("parameters") or {}).get("model")
        if model:
            print("  model: " + ", ".join(f"{key} {value}" for key, value in model.items()))
    for role, item in (credentials.claims.get("inputs") or {}).items():
        print(f"  input {role}: {item.get('title')} sha256 {item.get('sha256')}")
    for line in _watermark_lines(result, tags):
        print(line)
    print(f"verdict: {outcome}")
    return VERIFY_EXIT_CODES[outcome]


def main(argv: list[str] | None = None) -> int:
    """Run `emo-watermark` on `argv` (default: sys.argv[1:]); return the exit status (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # argparse exits 2 on bad usage and 0 on --help; return it instead
        return int(exit_request.code or 0)

    # Imported here so that `--help` and usage errors stay fast (no numpy/PyAV import).
    from emo_pipeline.watermark import detect_watermark_in_file, read_ai_metadata

    try:
        if args.command == "verify":
            return _verify(args)
        result = detect_watermark_in_file(args.file, max_frames=args.max_frames, key=args.key)
        tags = read_ai_metadata(args.file)
    except EMOInputError as error:
        print(f"emo-watermark: error: {error}", file=sys.stderr)
        return 2
    for line in _watermark_lines(result, tags):
        print(line)
    return 0 if result.found else 1


if __name__ == "__main__":
    sys.exit(main())

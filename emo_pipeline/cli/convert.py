"""`emo-convert`: Stable Diffusion 1.5 + wav2vec2 (+ AnimateDiff) -> an untrained EMOPipeline folder, or Hallo's /
Hallo2's released weights -> a trained one.

    emo-convert --sd15 stable-diffusion-v1-5/stable-diffusion-v1-5 --wav2vec2 facebook/wav2vec2-base-960h \\
        --motion-adapter guoyww/animatediff-motion-adapter-v1-5-2 --output emo-untrained
    emo-convert --hallo pretrained_models --output hallo-emo                       # Hallo
    emo-convert --hallo pretrained_models --net hallo2/net.pth --output hallo2-emo  # Hallo2

Each source is a local path or a Hub id. `--sd15` may be a single-file checkpoint (.safetensors/.ckpt); offline,
pass `--sd15-config` = a local diffusers SD1.5 folder whose configs and tokenizer are used. The folder is written
atomically (to `OUTPUT.partial-<pid>`, then renamed): an error or Ctrl-C leaves nothing at OUTPUT. Exit status:
0 written, 1 written but the Hub upload failed, 2 bad input (the message on stderr names the input).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from emo_pipeline.errors import EMOInputError

DTYPES = ("fp32", "fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `emo-convert`."""
    parser = argparse.ArgumentParser(
        prog="emo-convert",
        description="Build an untrained EMOPipeline folder from SD1.5 + wav2vec2 (+ an AnimateDiff motion module), "
        "or convert Hallo's / Hallo2's released weights (--hallo).",
    )
    parser.add_argument("--sd15", metavar="PATH_OR_ID", help="SD1.5 diffusers folder, hub id or file")
    parser.add_argument("--wav2vec2", metavar="PATH_OR_ID", help="wav2vec2 folder or hub id")
    parser.add_argument(
        "--hallo",
        metavar="DIR",
        help="instead of --sd15/--wav2vec2: Hallo's (or Hallo2's) downloaded pretrained_models/ folder; converts its "
        "trained weights (see README: Use Hallo / Hallo2 weights)",
    )
    parser.add_argument(
        "--net", metavar="PATH", help="with --hallo: net.pth to load (default hallo/net.pth; Hallo2: hallo2/net.pth)"
    )
    parser.add_argument(
        "--motion-adapter",
        metavar="PATH_OR_ID",
        help="AnimateDiff motion module: MotionAdapter folder / hub id or original checkpoint (mm_sd_v15_v2.ckpt); "
        "default: none (temporal layers start at zero output)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write the pipeline to")
    parser.add_argument(
        "--sd15-config", metavar="DIR", help="local diffusers SD folder with the configs for a single-file --sd15"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype (default: fp32)")
    parser.add_argument("--scheduler", default="ddim", help="ddim (default, as the paper), dpm++, euler, unipc or lcm")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists and is not empty")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub repo")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `emo-convert` on `argv` (default: sys.argv[1:]); return the exit status (0 ok, 1 upload failed, 2 bad
    input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # argparse exits 2 on bad usage and 0 on --help; return it instead
        return int(exit_request.code or 0)

    hallo = args.hallo is not None
    if hallo == (args.sd15 is not None or args.wav2vec2 is not None) or (
        not hallo and (args.sd15 is None or args.wav2vec2 is None)
    ):
        print("emo-convert: error: pass either --hallo DIR, or both --sd15 and --wav2vec2", file=sys.stderr)
        return 2
    if args.net is not None and not hallo:
        print("emo-convert: error: --net goes with --hallo", file=sys.stderr)
        return 2
    if hallo and (args.motion_adapter is not None or args.sd15_config is not None):
        print(
            "emo-convert: error: --motion-adapter/--sd15-config do not apply to --hallo (net.pth holds the trained "
            "motion modules)",
            file=sys.stderr,
        )
        return 2
    output = Path(args.output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        kind = "folder is not empty" if output.is_dir() else "path is a file"
        print(f"emo-convert: error: --output {output}: the {kind} (pass --overwrite to replace it)", file=sys.stderr)
        return 2

    # Imported here so that `--help` and usage errors stay fast (no torch/diffusers import).
    import torch

    from emo_pipeline.conversion import build_emo_pipeline

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    try:
        if hallo:
            from emo_pipeline.hallo_conversion import load_hallo_pipeline

            pipe = load_hallo_pipeline(args.hallo, args.net, torch_dtype=dtype)
            if args.scheduler != "ddim":
                pipe.set_scheduler(args.scheduler)
            write_atomically(pipe, output)
            print(f"wrote {output}")
            print(
                f"note: converted {pipe.emo_metadata['family']}'s trained weights ({pipe.emo_metadata['source']}); "
                "their terms of use are upstream's (the code is MIT)"
            )
            return _push(args, output)
        pipe = build_emo_pipeline(
            args.sd15,
            args.wav2vec2,
            args.motion_adapter,
            torch_dtype=dtype,
            sd15_config=args.sd15_config,
            scheduler=args.scheduler,
        )
        write_atomically(pipe, output)
    except EMOInputError as error:
        print(f"emo-convert: error: {error}", file=sys.stderr)
        return 2

    print(f"wrote {output}")
    print(
        "note: the weights are untrained (SD1.5 / wav2vec2 / AnimateDiff initialisation); they produce noise until "
        "trained with training/train.py (stages 1-3)"
    )
    return _push(args, output)


def _push(args: argparse.Namespace, output: Path) -> int:
    """`--push-to-hub`: upload the written folder; 0 done or not asked, 1 upload failed."""
    if args.push_to_hub:
        from emo_pipeline.hub import push_folder_to_hub

        try:
            url = push_folder_to_hub(output, args.push_to_hub, commit_message="Upload EMOPipeline")
        except Exception as error:  # noqa: BLE001 - network/auth errors of any kind: the folder is still written
            print(f"emo-convert: error: --push-to-hub {args.push_to_hub}: upload failed: {error}", file=sys.stderr)
            return 1
        print(f"uploaded to {url}")
    return 0


def write_atomically(pipe, output: Path) -> None:
    """`pipe.save_pretrained` into `output.partial-<pid>`, then rename it to `output` (replacing what was there)."""
    partial = output.with_name(f"{output.name}.partial-{os.getpid()}")
    previous = output.with_name(f"{output.name}.old-{os.getpid()}")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        pipe.save_pretrained(partial, safe_serialization=True)
        if output.is_dir() and any(output.iterdir()):
            output.rename(previous)  # only reached with --overwrite
        elif output.is_dir():
            output.rmdir()
        elif output.exists():
            output.unlink()
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if previous.exists() and not output.exists():
            previous.rename(output)  # put the old folder back
        raise
    shutil.rmtree(previous, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

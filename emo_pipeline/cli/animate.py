"""emo-animate: portrait + audio -> talking-head mp4, streamed clip by clip.

    emo-animate --image portrait.png --audio speech.wav --output out.mp4 --model path/or/hub-id

Without `--model` it runs a seeded tiny *random* pipeline (emo_pipeline.testing): the whole path (face detection,
audio features, clip chaining, decoding, watermark, mp4 muxing) runs in seconds on a CPU, and the video is noise.
Exit codes: 0 ok, 2 bad input (the message names it), 130 interrupted (no output file is left).
"""

from __future__ import annotations

import argparse
import sys
import time

from emo_pipeline.errors import EMOInputError

__all__ = ["main"]

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--face-box must be x0,y0,x1,y1 in pixels, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from emo_pipeline.pipeline_emo import SCHEDULERS

    parser = argparse.ArgumentParser(prog="emo-animate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="portrait image (any format PIL reads)")
    parser.add_argument("--audio", required=True, help="speech or singing (any format PyAV reads, or a video)")
    parser.add_argument("--output", required=True, help="mp4 to write (appears only when complete)")
    parser.add_argument("--model", help="EMOPipeline folder or Hub id; omit for the tiny random demo pipeline")
    parser.add_argument("--height", type=int, help="output size in pixels (square; default 512, demo 64)")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--steps", type=int, help="denoising steps per clip (default 40, demo 4)")
    parser.add_argument("--guidance-scale", type=float, default=3.5, help="audio guidance; <= 1 disables it")
    parser.add_argument("--frames-per-clip", type=int, default=12)
    parser.add_argument("--motion-frames", type=int, default=4)
    parser.add_argument("--speed", type=float, help="head rotation speed in rad/s (default: no speed conditioning)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: the model's own (DDIM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--face-box", type=_box, help="x0,y0,x1,y1 of the face in the image (skips detection)")
    parser.add_argument("--face-index", type=int, help="which detected face to use (0 = largest)")
    parser.add_argument("--no-watermark", action="store_true", help="do not embed the invisible watermark")
    parser.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better; 18 looks lossless)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    parser.add_argument("--max-audio-seconds", type=float, default=3600.0)
    return parser


def _load_pipeline(args: argparse.Namespace):
    import torch

    from emo_pipeline.pipeline_emo import EMOPipeline
    from emo_pipeline.testing import tiny_emo_pipeline

    dtype = getattr(torch, _DTYPES[args.dtype])
    if args.model is None:
        print(
            "WARNING: no --model given: running a tiny pipeline with RANDOM weights. It exercises the whole path\n"
            "WARNING: (face crop, audio features, clip chaining, decoding, mp4), but the video will be NOISE.\n"
            "WARNING: Pass --model <EMOPipeline folder or Hub id> for real results.",
            file=sys.stderr,
        )
        pipe = tiny_emo_pipeline()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=False)
    else:
        try:
            pipe = EMOPipeline.from_pretrained(args.model, torch_dtype=dtype)
        except (OSError, ValueError) as error:
            raise EMOInputError(f"cannot load --model {args.model!r}: {error}") from error
    return pipe.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    demo = args.model is None
    try:
        pipe = _load_pipeline(args)
        if args.scheduler:
            pipe.set_scheduler(args.scheduler)
        import torch

        size = args.height or (64 if demo else 512)
        start = time.perf_counter()
        path = pipe.write_video(
            args.output,
            args.image,
            args.audio,
            crf=args.crf,
            height=size,
            width=size,
            fps=args.fps,
            num_frames_per_clip=args.frames_per_clip,
            num_motion_frames=args.motion_frames,
            num_inference_steps=args.steps if args.steps is not None else (4 if demo else 40),
            guidance_scale=args.guidance_scale,
            speed=args.speed,
            face_box=args.face_box,
            face_index=args.face_index,
            watermark=not args.no_watermark,
            generator=torch.Generator().manual_seed(args.seed),
            max_audio_seconds=args.max_audio_seconds,
        )
    except EMOInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    plan = pipe.last_plan
    print(
        f"wrote {path} ({plan.num_frames} frames, {plan.num_frames / args.fps:.2f} s at {args.fps:g} fps, "
        f"{plan.num_clips} clips) in {time.perf_counter() - start:.1f} s"
        + (" -- random demo weights: the video is noise" if demo else "")
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

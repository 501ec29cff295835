"""emo-animate: portrait + audio -> talking-head mp4, streamed clip by clip; or many jobs at once (--jobs).

    emo-animate --image portrait.png --audio speech.wav --output out.mp4 --model path/or/hub-id

Without `--model` it runs a seeded tiny *random* pipeline (emo_pipeline.testing): the whole path (face detection,
audio features, clip chaining, decoding, watermark, mp4 muxing) runs in seconds on a CPU, and the video is noise.
The inputs and the output folder are checked before any model is loaded. Exit codes: 0 ok, 2 bad input (the
message names it), 130 interrupted (no output file is left). With --jobs: 0 all jobs done, 1 some failed (see
failures.jsonl), 2 the job file itself is bad.

This module imports no torch/diffusers until it runs a model, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from emo_pipeline.cli._common import DTYPES, SCHEDULER_NAMES, SpeedOptions, add_speed_arguments
from emo_pipeline.errors import EMOInputError
from emo_pipeline.provenance import add_c2pa_arguments, c2pa_signer_from_args

__all__ = ["SCHEDULER_NAMES", "build_parser", "main"]

_EPILOG = """\
examples:
  emo-animate --image portrait.png --audio speech.wav --output out.mp4 --model path/or/hub-id
  emo-animate --image emo_pipeline/assets/portrait.png --audio emo_pipeline/assets/speech.wav --output demo.mp4
  emo-animate --jobs jobs.csv --model path/or/hub-id          # many videos; resumable
  accelerate launch --num_processes 4 -m emo_pipeline.cli.animate --jobs jobs.csv --model path/or/hub-id

job files (--jobs): .csv with a header, or .jsonl; columns image, audio, output (relative to the job file's
folder) and optional per-job settings: seed, steps, guidance_scale, height, fps, speed, scheduler,
frames_per_clip, motion_frames, face_index, crf (an empty cell takes the command line's value).

exit codes:
  0    done (with --jobs: every job written or already there)
  1    --jobs: some jobs failed; each is in failures.jsonl with its reason
  2    bad input or arguments (the message names it and says what to do); --jobs: the job file is bad
  130  interrupted (Ctrl-C): no half-written video is left
"""


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--face-box must be x0,y0,x1,y1 in pixels, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `emo-animate` (imports nothing heavy)."""
    parser = argparse.ArgumentParser(
        prog="emo-animate",
        description=__doc__.split("\n\n")[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = parser.add_argument_group("inputs and output (one video)")
    io.add_argument("--image", help="portrait image (any format PIL reads); cropped square around the face")
    io.add_argument("--audio", help="speech or singing (any format PyAV reads, or a video's sound track)")
    io.add_argument("--output", help="mp4 to write; its folder must exist; the file appears only when complete")
    batch = parser.add_argument_group("many videos")
    batch.add_argument("--jobs", metavar="FILE", help="a .csv or .jsonl job file instead of --image/--audio/--output")
    batch.add_argument(
        "--failures", metavar="FILE", help="where failed jobs are listed (default: failures.jsonl beside the job file)"
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", help="EMOPipeline folder or Hub id (default: the tiny random demo pipeline; its video is noise)"
    )
    model.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available, else cpu)")
    model.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' precision (default: fp32)")
    model.add_argument(
        "--scheduler", choices=SCHEDULER_NAMES, help="sampler (default: the model's own, DDIM for EMO models)"
    )
    add_speed_arguments(parser.add_argument_group("speed (README, 'Speed switches')"))
    gen = parser.add_argument_group("generation")
    gen.add_argument("--height", type=int, help="output size in pixels, square (default: 512; demo model: 64)")
    gen.add_argument("--steps", type=int, help="denoising steps per clip (default: 40; demo model: 4)")
    gen.add_argument(
        "--guidance-scale", type=float, default=3.5, help="audio guidance; <= 1 turns it off (default: 3.5)"
    )
    gen.add_argument("--seed", type=int, default=0, help="random seed; same seed, same video (default: 0)")
    gen.add_argument("--fps", type=float, default=25.0, help="frames per second; length follows audio (default: 25)")
    gen.add_argument(
        "--speed", type=float, help="head rotation speed in rad/s, e.g. 0.3 (default: none, no speed conditioning)"
    )
    gen.add_argument(
        "--frames-per-clip",
        type=int,
        help="frames denoised together per clip (default: the model's: EMO 12, Hallo 16)",
    )
    gen.add_argument(
        "--motion-frames",
        type=int,
        help="frames of the previous clip each clip continues from (default: the model's; EMO 4, Hallo 2)",
    )
    gen.add_argument("--face-box", type=_box, help="x0,y0,x1,y1 of the face in the image in pixels (skips detection)")
    gen.add_argument(
        "--face-index", type=int, help="which detected face to animate, 0 = largest (default: the largest)"
    )
    hallo = parser.add_argument_group("Hallo / Hallo2 models (converted with emo-convert --hallo)")
    hallo.add_argument(
        "--mode", choices=("fast", "parity"), help="fast (default) or parity: Hallo's own loop exactly, slower"
    )
    hallo.add_argument(
        "--face-embedding",
        metavar="NPY",
        help="the portrait's 512-d insightface embedding as a .npy file (one video only; default: computed with "
        "the insightface models of --face-analysis-dir)",
    )
    hallo.add_argument(
        "--face-analysis-dir",
        metavar="DIR",
        help="Hallo's insightface models (pretrained_models/face_analysis, with models/scrfd_10g_bnkps.onnx and "
        "models/glintr100.onnx) to compute the face embedding; needs pip install 'emo-pipeline[hallo]'",
    )
    hallo.add_argument(
        "--vocal-separation",
        metavar="MODEL",
        help="keep only the vocals before wav2vec2, with this audio-separator model file (Hallo: "
        "pretrained_models/audio_separator/Kim_Vocal_2.onnx; separated at the track's own rate); default: off",
    )
    echomimic = parser.add_argument_group("EchoMimic models (converted with emo-convert --echomimic)")
    echomimic.add_argument(
        "--pose-video",
        metavar="PATH",
        help="the pose variants' driving video (--variant pose|pose_acc): its face's landmarks drive each frame; it "
        "must cover the whole track with a face in every frame (one video; job files: a pose_video column)",
    )
    out = parser.add_argument_group("output file")
    out.add_argument("--crf", type=int, default=18, help="H.264 quality, lower is better (default: 18, ~lossless)")
    out.add_argument("--no-watermark", action="store_true", help="do not embed the invisible watermark (please don't)")
    out.add_argument(
        "--max-audio-seconds", type=float, default=3600.0, help="refuse longer audio (default: 3600, one hour)"
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_c2pa_arguments(parser)
    return parser


def _defaults(args: argparse.Namespace) -> dict:
    """Command-line settings under the job-file column names (`emo_pipeline.batch.JOB_SETTINGS`)."""
    return {
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "fps": args.fps,
        "speed": args.speed,
        "scheduler": args.scheduler,
        "frames_per_clip": args.frames_per_clip,
        "motion_frames": args.motion_frames,
        "face_index": args.face_index,
        "crf": args.crf,
    }


def _hallo_options(args: argparse.Namespace) -> dict:
    """--mode / --face-embedding / --face-analysis-dir / --vocal-separation as pipeline arguments (only when given:
    EMO models refuse them)."""
    options = {}
    if args.mode is not None:
        options["mode"] = args.mode
    if args.face_analysis_dir is not None:
        options["face_analysis_dir"] = args.face_analysis_dir
    if args.vocal_separation is not None:
        options["vocal_separation"] = args.vocal_separation
    if args.face_embedding is not None:
        import numpy as np

        try:
            options["face_embedding"] = np.load(args.face_embedding)
        except (OSError, ValueError) as error:
            raise EMOInputError(
                f"--face-embedding {args.face_embedding}: not a readable .npy file ({error})"
            ) from None
    return options


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # set by torchrun/accelerate launch before any process group exists


def _run_jobs(args: argparse.Namespace) -> int:
    from emo_pipeline.batch import read_jobs, run_batch

    try:
        jobs = read_jobs(args.jobs, scheduler_names=SCHEDULER_NAMES)
        speed = SpeedOptions.from_args(args)
    except EMOInputError as error:
        if _is_main_process():
            print(f"error: {error}", file=sys.stderr)
        return 2
    failures = args.failures or os.path.join(os.path.dirname(os.path.abspath(args.jobs)), "failures.jsonl")
    try:
        signer = c2pa_signer_from_args(args, notice=_is_main_process())
        summary = run_batch(
            jobs,
            _defaults(args),
            model=args.model,
            failures_path=failures,
            device=args.device,
            dtype=args.dtype,
            speed=speed,
            watermark=not args.no_watermark,
            max_audio_seconds=args.max_audio_seconds,
            progress=not args.no_progress,
            family_settings=_hallo_options(args),
            c2pa_signer=signer,
        )
    except EMOInputError as error:  # the model itself cannot be loaded: no job can run
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished videos are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    if _is_main_process():
        print(summary.describe() + (f"\nfailures: {failures}" if summary.failures else ""))
    return 1 if summary.failures else 0


def _run_one(args: argparse.Namespace) -> int:
    from emo_pipeline.cli._common import StepProgress, clip_lengths, demo_defaults, load_pipeline, preflight

    demo = args.model is None
    defaults = demo_defaults(demo)
    size = args.height or defaults["size"]
    steps = args.steps if args.steps is not None else defaults["steps"]
    progress = None
    try:
        speed = SpeedOptions.from_args(args)
        signer = c2pa_signer_from_args(args)
        if args.pose_video is not None and not os.path.isfile(args.pose_video):
            raise EMOInputError(f"--pose-video {args.pose_video}: no such file")
        preflight(
            args.image,
            args.audio,
            args.output,
            size=size,
            fps=args.fps,
            face_index=args.face_index,
            face_box=args.face_box,
            max_audio_seconds=args.max_audio_seconds,
        )
        pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, speed=speed)
        if args.scheduler:
            pipe.set_scheduler(args.scheduler)
        import torch

        progress = StepProgress(steps, disable=args.no_progress)
        start = time.perf_counter()
        path = pipe.write_video(
            args.output,
            args.image,
            args.audio,
            crf=args.crf,
            c2pa_signer=signer or False,
            height=size,
            width=size,
            fps=args.fps,
            num_inference_steps=steps,
            guidance_scale=args.guidance_scale,
            speed=args.speed,
            face_box=args.face_box,
            face_index=args.face_index,
            watermark=not args.no_watermark,
            generator=torch.Generator().manual_seed(args.seed),
            max_audio_seconds=args.max_audio_seconds,
            callback_on_step_end=progress,
            **clip_lengths(args.frames_per_clip, args.motion_frames),
            **_hallo_options(args),
            **({"pose_video": args.pose_video} if args.pose_video is not None else {}),
        )
    except EMOInputError as error:
        if progress is not None:
            progress.close()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        print("\ninterrupted: no output written", file=sys.stderr)
        return 130
    progress.close()
    plan = pipe.last_plan
    print(
        f"wrote {path} ({plan.num_frames} frames, {plan.num_frames / args.fps:.2f} s at {args.fps:g} fps, "
        f"{plan.num_clips} clips) in {time.perf_counter() - start:.1f} s"
        + (" -- random demo weights: the video is noise" if demo else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `emo-animate` on `argv` (default: sys.argv[1:]); return the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs:
        given = [f"--{name}" for name in ("image", "audio", "output") if getattr(args, name)]
        if given:
            parser.error(f"--jobs takes the inputs from the job file; drop {' '.join(given)}")
        if args.face_box:
            parser.error("--face-box is per image; it cannot apply to a whole job file")
        if args.pose_video:
            parser.error("--pose-video drives one video; give each job its own in a pose_video column")
        if args.face_embedding:
            parser.error(
                "--face-embedding is one portrait's identity; it cannot apply to a whole job file (give "
                "--face-analysis-dir to compute each job's)"
            )
        return _run_jobs(args)
    missing = [f"--{name}" for name in ("image", "audio", "output") if not getattr(args, name)]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --jobs FILE)")
    return _run_one(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""emo-app: a web page (Gradio Blocks) to animate a portrait with speech or singing, clip by clip.

    pip install -e ".[app]"
    emo-app --model path/or/hub-id            # http://127.0.0.1:7860
    emo-app                                   # the tiny random demo pipeline (the video is noise)

The page takes a portrait (upload or webcam) and audio (upload or microphone), the main settings, and shows a
progress bar over clips and steps, each clip as soon as it is decoded, then the whole mp4 to watch and download.
One pipeline is loaded per process and jobs wait in a queue, one running at a time. Bad input is shown
on the page as the `EMOInputError` text; a stopped job leaves no file. Every video carries the invisible
watermark and the AI-generated tag.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emo_pipeline.app_safety import (
    DEFAULT_MAX_SECONDS,
    DEFAULT_MAX_UPLOAD_MB,
    GenerationGate,
    JobStopped,
    check_upload,
    is_local_address,
    read_auth,
)
from emo_pipeline.cli._common import (
    DTYPES,
    SCHEDULER_NAMES,
    SpeedOptions,
    add_speed_arguments,
    demo_defaults,
    load_pipeline,
    preflight,
)
from emo_pipeline.errors import EMOInputError
from emo_pipeline.provenance import add_c2pa_arguments, c2pa_signer_from_args

__all__ = ["PipelineHolder", "build_demo", "generate", "main"]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MODEL_DEFAULT_SCHEDULER = "model default"

DEMO_MARKDOWN = (
    "⚠️ **No model given: this page runs a tiny pipeline with RANDOM weights.** It exercises the whole path (face "
    "crop, audio features, clip chaining, decoding, mp4), but **the video will be NOISE**. Start `emo-app --model "
    "<EMOPipeline folder or Hub id>`, or enter one in the Model box, for real results."
)

NOTICE_MARKDOWN = (
    "**Responsible use.** Animate only people who gave their consent, and say that the video is synthetic. "
    "Every frame carries an invisible watermark and the mp4 is tagged *AI-generated* "
    "(check a file with `emo-watermark detect FILE`). Do not use this for impersonation or fraud."
)


class PipelineHolder:
    """The one pipeline of this process, loaded on first use and replaced when another model is asked for."""

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str = "fp32", speed: Any = None):
        self.model, self.device, self.dtype, self.speed = model, device, dtype, speed
        self.pipe: Any = None
        self.loaded_model: str | None = None
        self.lock = threading.Lock()
        self.gate = GenerationGate()  # one generation at a time on this pipeline; Stop stops it within a step

    def get(self, model: str | None) -> Any:
        """The pipeline for `model` (None or "": the tiny demo pipeline), loading it if it is not the loaded one."""
        model = (model or "").strip() or None
        with self.lock:
            if self.pipe is None or model != self.loaded_model:
                self.pipe = None  # free the old one before loading the next
                self.pipe = load_pipeline(model, device=self.device, dtype=self.dtype, speed=self.speed)
                self.loaded_model = model
                self.default_scheduler = self.pipe.scheduler
            return self.pipe


def _write_clip_preview(
    path: Path, frames: Any, audio: Any, fps: float, first_frame: int, signer: Any = None, manifest: Any = None
) -> None:
    """One clip as a small mp4 with its stretch of the audio, for the page to show while the rest is generated
    (signed like the final video when a C2PA signer is configured: the page offers it for download too)."""
    from emo_pipeline.media import VideoWriter

    start = round(first_frame * SAMPLE_RATE / fps)
    stop = round((first_frame + len(frames)) * SAMPLE_RATE / fps)
    if manifest is not None:
        manifest = {**manifest, "title": path.name}
    with VideoWriter(
        path,
        fps=fps,
        audio=audio[start:stop],
        sample_rate=SAMPLE_RATE,
        preset="veryfast",
        c2pa_signer=signer,
        c2pa_manifest=manifest,
    ) as writer:
        writer.write(frames)


def generate(
    holder: PipelineHolder,
    workdir: Path,
    image: str | None,
    audio: str | None,
    model: str | None,
    steps: int,
    guidance_scale: float,
    seed: int,
    size: int,
    speed: float,
    scheduler: str,
    progress: Any = None,
    face_analysis_dir: str | None = None,
    *,
    session: str | None = None,
    max_upload_mb: float | None = DEFAULT_MAX_UPLOAD_MB,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    c2pa_signer: Any = None,
) -> Iterator[tuple[str | None, str | None, str | None, str]]:
    """Generate one video; yields `(latest clip mp4, final mp4, final mp4 for download, status text)` after every
    clip and once at the end. Raises `EMOInputError` for bad input (the page shows it), checked before the model
    is touched: uploads over `max_upload_mb` or audio declaring more than `max_seconds` are refused before they are
    decoded. Generations on one holder run one at a time (`holder.gate`); `holder.gate.request_stop(session)` makes
    this one raise `JobStopped` at its next step. If stopped (or the caller closes the iteration), nothing is
    left in `workdir`. `face_analysis_dir`: Hallo weights' insightface models (the page's field; empty: none, EMO
    weights need none). `c2pa_signer`: sign the final mp4's C2PA content credentials."""
    if not image:
        raise EMOInputError("no portrait given: upload a photo of one face (or take one with the webcam)")
    if not audio:
        raise EMOInputError("no audio given: upload speech or singing (or record it with the microphone)")
    steps, size, seed = int(steps), int(size), int(seed)
    speed_value = float(speed) if speed else None
    fps = 25.0
    max_bytes = None if max_upload_mb is None else max_upload_mb * 1e6
    check_upload(image, "portrait", max_bytes=max_bytes)
    check_upload(audio, "audio", max_bytes=max_bytes, max_seconds=max_seconds)
    preflight(image, audio, None, size=size, fps=fps, max_audio_seconds=max_seconds)  # before any model is loaded
    stop = holder.gate.enter(session, holder)  # waits while another generation still runs on this pipeline
    outcome = "failed"
    try:
        import torch

        from emo_pipeline.media import VideoWriter
        from emo_pipeline.provenance import ingredient, manifest_definition, model_claim
        from emo_pipeline.watermark import AI_GENERATED_METADATA

        pipe = holder.get(model)
        pipe.scheduler = holder.default_scheduler
        if scheduler and scheduler != MODEL_DEFAULT_SCHEDULER:
            pipe.set_scheduler(scheduler)

        def on_step(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            if stop.is_set():
                raise JobStopped(f"stopped at clip {pipe.clip_index + 1}, step {step + 1}")
            if progress is not None:
                num_clips = pipe.last_plan.num_clips
                done = pipe.clip_index * steps + step + 1
                progress(
                    (done, num_clips * steps), desc=f"clip {pipe.clip_index + 1}/{num_clips}, step {step + 1}/{steps}"
                )
            return {}

        job = Path(tempfile.mkdtemp(prefix="job-", dir=workdir))
        completed = False
        try:
            clips = pipe.iter_clips(
                image,
                audio,
                height=size,
                width=size,
                fps=fps,
                num_inference_steps=steps,
                guidance_scale=float(guidance_scale),
                speed=speed_value,
                generator=torch.Generator().manual_seed(seed),
                callback_on_step_end=on_step,
                **(
                    {"face_analysis_dir": face_analysis_dir.strip()}
                    if face_analysis_dir and face_analysis_dir.strip()
                    else {}
                ),
            )
            plan = pipe.last_plan
            final = job / "emo.mp4"
            preview = None
            written = 0
            manifest = None
            if c2pa_signer is not None:
                manifest = manifest_definition(
                    final.name,
                    model=model_claim(getattr(pipe, "emo_metadata", None)),
                    ingredients=[
                        ingredient(image, "portrait", Path(image).name),
                        ingredient(audio, "audio", Path(audio).name),
                    ],
                )
            with VideoWriter(
                final,
                fps=fps,
                audio=plan.audio,
                sample_rate=SAMPLE_RATE,
                metadata=AI_GENERATED_METADATA,
                c2pa_signer=c2pa_signer,
                c2pa_manifest=manifest,
            ) as writer:
                for index, frames in enumerate(clips):
                    if stop.is_set():  # stopped while the clip was decoded: write nothing more
                        raise JobStopped(f"stopped after clip {index + 1}")
                    writer.write(frames)
                    preview = job / f"clip-{index + 1:04d}.mp4"
                    _write_clip_preview(preview, frames, plan.audio, fps, written, c2pa_signer, manifest)
                    written += len(frames)
                    yield str(preview), None, None, f"Clip {index + 1} of {plan.num_clips} done ({written} frames)."
            completed = True
            status = (
                f"Done: {plan.num_frames} frames, {plan.num_frames / fps:.2f} s at {fps:g} fps, "
                f"{plan.num_clips} clips. The video carries an invisible watermark and an AI-generated tag."
            )
            if holder.loaded_model is None:
                status += " Random demo weights: the video is noise."
            yield str(preview), str(final), str(final), status
        finally:
            # Gradio has copied what it shows into its own cache by now; a stopped job leaves nothing behind.
            shutil.rmtree(job, ignore_errors=True)
            if not completed:
                logger.info("job did not finish (stopped or failed): its files were removed")
        outcome = "finished"
    except (JobStopped, GeneratorExit):
        outcome = "stopped"
        raise
    finally:
        holder.gate.leave(session, outcome)


def _user_paths(message: str, *uploads: str | None) -> str:
    """Name uploads by their file names, as the user knows them, not by Gradio's cache paths."""
    for upload in uploads:
        if upload:
            message = message.replace(str(upload), Path(upload).name)
    return message


def build_demo(
    model: str | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    workdir: str | Path | None = None,
    model_editable: bool = True,
    face_analysis_dir: str | None = None,
    speed: SpeedOptions | None = None,
    *,
    max_upload_mb: float | None = DEFAULT_MAX_UPLOAD_MB,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    c2pa_signer: Any = None,
) -> Any:
    """The Gradio Blocks page. `model`: the EMOPipeline folder or Hub id shown (and loaded) by default; None for
    the tiny random demo pipeline. `workdir`: where jobs write (default: a new temporary folder).
    `model_editable`: whether visitors may pick another model (a folder of the server or any Hub id) and the face
    analysis folder. `face_analysis_dir`: the insightface models Hallo weights need (the field's default).
    `speed`: the speed switches applied to every model it loads (`SpeedOptions`).
    `max_upload_mb`, `max_seconds`: the upload bounds (see `generate`). `c2pa_signer`: sign every video's C2PA
    content credentials (`emo_pipeline.provenance`)."""
    import gradio as gr

    holder = PipelineHolder(model, device, dtype, speed)
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="emo-app-"))
    work.mkdir(parents=True, exist_ok=True)
    defaults = demo_defaults(model is None)

    def run(
        image,
        audio,
        model_id,
        steps,
        guidance_scale,
        seed,
        size,
        speed,
        scheduler,
        face_dir,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008
    ):
        # Hand Gradio the running generator at once: Stop closes the generator Gradio holds, and Gradio holds it
        # only after its first value. Without this, Stop during the first clip would orphan the job.
        yield None, None, None, "Checking the inputs…"
        try:
            yield from generate(
                holder,
                work,
                image,
                audio,
                model_id if model_editable else model,
                steps,
                guidance_scale,
                seed,
                size,
                speed,
                scheduler,
                progress,
                face_analysis_dir=face_dir if model_editable else face_analysis_dir,
                session=getattr(request, "session_hash", None),
                max_upload_mb=max_upload_mb,
                max_seconds=max_seconds,
                c2pa_signer=c2pa_signer,
            )
        except JobStopped:
            return
        except EMOInputError as error:
            raise gr.Error(_user_paths(str(error), image, audio), duration=None, print_exception=False) from None
        except Exception as error:  # noqa: BLE001 - shown on the page; the traceback stays in the server log
            logger.exception("generation failed")
            message = _user_paths(f"generation failed: {type(error).__name__}: {error}", image, audio)
            raise gr.Error(message, duration=None, print_exception=False) from None

    def stop_job(request: gr.Request):
        holder.gate.request_stop(getattr(request, "session_hash", None))

    # No usage reports or version checks (calls to Gradio's servers) unless GRADIO_ANALYTICS_ENABLED=True.
    analytics = os.environ.get("GRADIO_ANALYTICS_ENABLED", "False").lower() == "true"
    with gr.Blocks(title="EMO talking head", delete_cache=(3600, 3600), analytics_enabled=analytics) as demo:
        gr.Markdown(
            "# EMO: portrait + audio → talking-head video\n"
            "Upload a portrait with one face and speech or singing; the video follows the audio's length and "
            "appears clip by clip."
        )
        if model is None:
            gr.Markdown(DEMO_MARKDOWN, elem_id="demo-notice")
        gr.Markdown(NOTICE_MARKDOWN, elem_id="notice")
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    label="Portrait", sources=["upload", "webcam"], type="filepath", elem_id="portrait", height=260
                )
                audio = gr.Audio(
                    label="Speech or singing", sources=["upload", "microphone"], type="filepath", elem_id="audio"
                )
                model_box = gr.Textbox(
                    label="Model (EMOPipeline folder or Hub id; empty = tiny random demo model)",
                    value=model or "",
                    elem_id="model",
                    interactive=model_editable,
                )
                with gr.Accordion("Settings", open=False):
                    steps = gr.Slider(
                        1, 100, value=defaults["steps"], step=1, label="Denoising steps per clip", elem_id="steps"
                    )
                    guidance = gr.Slider(0, 10, value=3.5, step=0.1, label="Audio guidance (<= 1: off)")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    size = gr.Slider(64, 1024, value=defaults["size"], step=64, label="Size (px, square)")
                    speed = gr.Number(value=0, label="Head speed, rad/s (0: no speed conditioning)")
                    scheduler = gr.Dropdown(
                        [MODEL_DEFAULT_SCHEDULER, *SCHEDULER_NAMES], value=MODEL_DEFAULT_SCHEDULER, label="Sampler"
                    )
                    face_dir = gr.Textbox(
                        label="Face analysis folder (Hallo weights: insightface models, e.g. "
                        "pretrained_models/face_analysis)",
                        value=face_analysis_dir or "",
                        elem_id="face-analysis-dir",
                        interactive=model_editable,
                    )
                with gr.Row():
                    start = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
            with gr.Column():
                status = gr.Markdown("", elem_id="status")
                latest = gr.Video(label="Latest clip", autoplay=True, elem_id="latest", height=260)
                final = gr.Video(label="Video", elem_id="final", height=260)
                download = gr.File(label="Download mp4", elem_id="download")
        event = start.click(
            run,
            [image, audio, model_box, steps, guidance, seed, size, speed, scheduler, face_dir],
            [latest, final, download, status],
            # One job at a time: the one pipeline keeps per-run state (last_plan, clip_index); others queue.
            concurrency_limit=1,
        )
        # Stop: the running job's worker stops within a step (and the next job waits for it); a queued job leaves
        # the queue.
        stop.click(stop_job, None, None, cancels=[event], queue=False)
    demo.emo_holder = holder  # for tests and callers that want the loaded pipeline
    demo.emo_workdir = work
    return demo


def app_theme() -> Any:
    """Gradio's default look with system fonts: the default theme makes every visitor's browser fetch its fonts
    from an outside server."""
    import gradio as gr

    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emo-app",
        description="A web page for EMO: portrait + audio -> talking-head video (Gradio; pip install '.[app]').",
        epilog="example:\n  emo-app --model path/or/hub-id --port 7860\n\nexit codes: 0 stopped, 2 bad arguments",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="EMOPipeline folder or Hub id (default: the tiny random demo pipeline)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (default: off)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' precision (default: fp32)")
    parser.add_argument(
        "--face-analysis-dir",
        metavar="DIR",
        help="Hallo weights: insightface models (pretrained_models/face_analysis) for the page's default",
    )
    parser.add_argument(
        "--no-preload", action="store_true", help="load the model on the first job, not at start (default: at start)"
    )
    add_speed_arguments(parser)
    access = parser.add_argument_group("sharing the page")
    access.add_argument("--auth", metavar="USER:PASSWORD", help="require this login (default: none)")
    access.add_argument("--auth-file", metavar="FILE", help="require a login from this file, one user:password a line")
    access.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest upload accepted, MB (default: {DEFAULT_MAX_UPLOAD_MB:g})",
    )
    access.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help=f"longest audio animated, refused before decoding (default: {DEFAULT_MAX_SECONDS:g})",
    )
    add_c2pa_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `emo-app` until interrupted."""
    args = build_parser().parse_args(argv)
    try:
        speed = SpeedOptions.from_args(args)
    except EMOInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: emo-app needs Gradio: pip install 'emo-pipeline[app]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    # Only a page served to this machine alone lets its visitor load another model (any folder of the server).
    private = is_local_address(args.host) and not args.share
    try:
        auth = read_auth(args.auth, args.auth_file)
        signer = c2pa_signer_from_args(args)
    except EMOInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not private and auth is None:
        logger.warning(
            "the page is reachable from other machines (--host %s%s) and has no login: anyone who reaches it can "
            "use this GPU. Add --auth USER:PASSWORD or --auth-file FILE.",
            args.host,
            ", --share" if args.share else "",
        )
    demo = build_demo(
        args.model,
        args.device,
        args.dtype,
        model_editable=private,
        face_analysis_dir=args.face_analysis_dir,
        speed=speed,
        max_upload_mb=args.max_upload_mb,
        max_seconds=args.max_seconds,
        c2pa_signer=signer,
    )
    if not args.no_preload:
        try:
            demo.emo_holder.get(args.model)
        except EMOInputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        allowed_paths=[str(demo.emo_workdir)],  # besides Gradio's own upload cache, only the job folders are served
        auth=auth,
        auth_message="emo-app: log in to generate videos" if auth else None,
        max_file_size=f"{args.max_upload_mb:g}mb",
        show_error=True,
        theme=app_theme(),
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

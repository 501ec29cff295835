"""What `emo-animate`, its batch mode and `emo-app` share: early input checks, loading the pipeline once, and a
labelled progress bar.

Nothing here imports torch, diffusers or mediapipe at import time, so `emo-animate --help` stays fast.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from emo_pipeline.errors import EMOInputError

if TYPE_CHECKING:  # pragma: no cover
    from emo_pipeline.pipeline_emo import EMOPipeline

__all__ = [
    "DEMO_NOTICE",
    "DTYPES",
    "SCHEDULER_NAMES",
    "Preflight",
    "StepProgress",
    "demo_defaults",
    "load_pipeline",
    "preflight",
]

#: `emo_pipeline.pipeline_emo.SCHEDULERS`' keys, repeated here so that building the argument parser does not import
#: torch and diffusers (tests/test_cli.py checks that the two stay equal).
SCHEDULER_NAMES = ("ddim", "dpm++", "euler", "lcm", "unipc")

#: --dtype choices -> torch dtype names.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

#: Said loudly whenever the tiny random pipeline stands in for a real model.
DEMO_NOTICE = (
    "WARNING: no model given: running a tiny pipeline with RANDOM weights. It exercises the whole path\n"
    "WARNING: (face crop, audio features, clip chaining, decoding, mp4), but the video will be NOISE.\n"
    "WARNING: Pass --model <EMOPipeline folder or Hub id> for real results."
)

SAMPLE_RATE = 16000  # wav2vec2's rate; the pipeline loads audio at this rate


def demo_defaults(demo: bool) -> dict[str, int]:
    """Output size (px) and denoising steps: the paper's 512 px / 40 steps, or 64 px / 4 steps for the demo model."""
    return {"size": 64, "steps": 4} if demo else {"size": 512, "steps": 40}


@dataclass
class Preflight:
    """What `preflight` learned: the audio's length and the video's frame count."""

    audio_seconds: float
    num_frames: int


def preflight(
    image: Any,
    audio: Any,
    output: str | os.PathLike | None,
    *,
    size: int = 512,
    fps: float = 25.0,
    face_index: int | None = None,
    face_box: Any = None,
    max_audio_seconds: float | None = 3600.0,
) -> Preflight:
    """Check one job's inputs before any model is loaded: the output folder, the audio, then the portrait and
    its face (mediapipe, about a second). Each failure is an `EMOInputError` naming the input.

    Args:
        image: portrait path (or anything `load_image` takes). audio: path (or anything `load_audio` takes).
        output: mp4 path to be written (its folder must exist and be writable), or None to skip that check.
        size: output side in pixels (the crop size). fps: frames per second of the video.
        face_index, face_box: as `EMOPipeline.iter_clips`.
        max_audio_seconds: longer audio is refused.
    """
    if output is not None:
        path = Path(output).expanduser().absolute()
        if path.is_dir():
            raise EMOInputError(f"output {str(output)!r} is a directory; give the path of an .mp4 file to write")
        if not path.parent.is_dir():
            raise EMOInputError(
                f"output folder {str(path.parent)!r} does not exist; create it first (mkdir -p {path.parent})"
            )
        if not os.access(path.parent, os.W_OK):
            raise EMOInputError(f"output folder {str(path.parent)!r} is not writable")
    from emo_pipeline.audio import load_audio, num_video_frames

    samples = load_audio(audio, SAMPLE_RATE, max_duration=max_audio_seconds)
    from emo_pipeline.face import prepare_portrait

    prepare_portrait(image, size=size, face_index=face_index, face_box=face_box)
    return Preflight(
        audio_seconds=len(samples) / SAMPLE_RATE, num_frames=num_video_frames(len(samples), SAMPLE_RATE, fps)
    )


def load_pipeline(
    model: str | None, device: str | None = None, dtype: str = "fp32", notice: bool = True
) -> EMOPipeline:
    """Load an EMOPipeline folder or Hub id onto `device` (default: cuda when available), or the tiny random demo
    pipeline when `model` is None (printing `DEMO_NOTICE` to stderr when `notice`). Its own progress bar is
    switched off: callers label theirs (`StepProgress`). An unloadable model is an `EMOInputError`."""
    import torch

    from emo_pipeline.pipeline_emo import EMOPipeline
    from emo_pipeline.testing import tiny_emo_pipeline

    torch_dtype = getattr(torch, DTYPES[dtype])
    if model is None:
        if notice:
            print(DEMO_NOTICE, file=sys.stderr, flush=True)
        pipe = tiny_emo_pipeline()
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
    else:
        try:
            pipe = EMOPipeline.from_pretrained(model, torch_dtype=torch_dtype)
        except (OSError, ValueError) as error:
            raise EMOInputError(f"cannot load model {model!r}: {error}") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class StepProgress:
    """A `callback_on_step_end` that drives a labelled tqdm bar: "clip 3/8 step 2/4", steps done, elapsed and ETA.

    The clip count comes from `pipe.last_plan` (set before the first step), the clip from `pipe.clip_index`.
    """

    def __init__(self, num_inference_steps: int, label: str = "", file: TextIO | None = None, disable: bool = False):
        self.steps, self.label, self.file, self.disable = num_inference_steps, label, file, disable
        self.bar: Any = None
        self.started = time.perf_counter()

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        num_clips = pipe.last_plan.num_clips
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=num_clips * self.steps,
                desc=f"{self.label}clip 1/{num_clips} step 1/{self.steps}",
                unit="step",
                file=self.file,
                disable=self.disable,
                dynamic_ncols=True,
                bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining} ETA, {rate_fmt}]",
            )
        self.bar.set_description_str(
            f"{self.label}clip {pipe.clip_index + 1}/{num_clips} step {step + 1}/{self.steps}", refresh=False
        )
        self.bar.update()
        return {}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def clip_lengths(frames_per_clip: int | None, motion_frames: int | None) -> dict:
    """The clip-length arguments a user set (None: the model's own default, 12/4 for EMO, 16/2 for Hallo)."""
    lengths = {"num_frames_per_clip": frames_per_clip, "num_motion_frames": motion_frames}
    return {name: value for name, value in lengths.items() if value is not None}

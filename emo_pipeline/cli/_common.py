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
    "SpeedOptions",
    "StepProgress",
    "demo_defaults",
    "load_pipeline",
    "preflight",
    "add_speed_arguments",
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

#: --compile choices: off, diffusers' regional compilation of the UNets' blocks, or each UNet whole.
COMPILE_MODES = ("off", "regional", "whole")
#: --offload choices: diffusers' model / sequential CPU offload, block-level group offload.
OFFLOAD_MODES = ("none", "model", "sequential", "group")
#: --quantize choices (`emo_pipeline.quantization.QUANTIZATION_RECIPES`; tests/test_cli.py checks they stay equal).
QUANTIZE_NAMES = ("int8", "fp8", "int4", "bnb-8bit", "bnb-4bit")


def _step_cache_interval(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1 (full backbone runs every N steps), got {text!r}")
    return value


def add_speed_arguments(parser: Any) -> None:
    """The speed switches of `emo-animate`, its batch mode and `emo-app` (--dtype is each tool's own)."""
    parser.add_argument(
        "--attention-backend",
        metavar="NAME",
        help="diffusers attention backend for every attention layer: native, _native_math, flex, xformers, sage, "
        "flash, ... (default: native SDPA; README, 'Speed switches')",
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="off",
        help="torch.compile the UNets: regional (their transformer blocks, short cold start) or whole (default: off)",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_NAMES,
        help="quantize the UNets' weights at load (int8: torchao, CPU or GPU; fp8, int4, bnb-*: GPU) (default: off)",
    )
    parser.add_argument(
        "--step-cache",
        type=_step_cache_interval,
        metavar="N",
        help="DeepCache: run the backbone's deep blocks every N steps, approximate (default: off)",
    )
    parser.add_argument(
        "--offload",
        choices=OFFLOAD_MODES,
        default="none",
        help="CPU offload to save GPU memory: model, sequential (least memory, slowest) or group (default: none)",
    )


@dataclass
class SpeedOptions:
    """The speed switches, checked (`check`) before any model loads and applied by `load_pipeline`."""

    attention_backend: str | None = None
    compile: str = "off"
    quantize: str | None = None
    step_cache: int | None = None
    offload: str = "none"

    @classmethod
    def from_args(cls, args: Any) -> SpeedOptions:
        """From parsed arguments (`add_speed_arguments`), checked; an `EMOInputError` names the bad one."""
        options = cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)})
        options.check()
        return options

    def check(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise EMOInputError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.offload not in OFFLOAD_MODES:
            raise EMOInputError(f"offload must be one of {OFFLOAD_MODES}, got {self.offload!r}")
        if self.step_cache is not None and self.compile == "whole":
            raise EMOInputError("--step-cache needs a hookable backbone: use --compile regional (or off), not whole")
        from emo_pipeline.quantization import check_quantization

        check_quantization(self.quantize)
        if self.attention_backend is not None:
            from diffusers.models.attention_dispatch import (
                AttentionBackendName,
                _AttentionBackendRegistry,
                _check_attention_backend_requirements,
            )

            names = sorted(b.value for b in AttentionBackendName)
            backend = self.attention_backend
            if backend not in names or backend not in _AttentionBackendRegistry._backends:
                raise EMOInputError(
                    f"attention backend {self.attention_backend!r} is not one of diffusers' backends: {names}"
                )
            try:
                _check_attention_backend_requirements(AttentionBackendName(self.attention_backend))
            except (RuntimeError, ImportError) as error:
                raise EMOInputError(f"attention backend {backend!r} cannot run here: {error}") from error

    def apply(self, pipe: Any, device: str) -> Any:
        """Attention backend, step-cache default, offload (or `.to(device)`) and compilation on a loaded `pipe`."""
        import torch

        if self.attention_backend is not None:
            for model in (pipe.unet, pipe.reference_net):
                model.set_attention_backend(self.attention_backend)
        if self.step_cache is not None:
            if pipe.is_hallo:
                raise EMOInputError("--step-cache is for EMO models; Hallo models do not take it")
            pipe.emo_metadata.setdefault("generation_defaults", {})["step_cache"] = self.step_cache
        if self.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif self.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        elif self.offload == "group":
            pipe.enable_group_offload(
                onload_device=torch.device(device), offload_type="block_level", num_blocks_per_group=1
            )
        else:
            pipe = pipe.to(device)
        if self.compile != "off":
            pipe.compile(regional=self.compile == "regional")
        return pipe


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
    model: str | None,
    device: str | None = None,
    dtype: str = "fp32",
    notice: bool = True,
    speed: SpeedOptions | None = None,
) -> EMOPipeline:
    """Load an EMOPipeline folder or Hub id onto `device` (default: cuda when available), or the tiny random demo
    pipeline when `model` is None (printing `DEMO_NOTICE` to stderr when `notice`), with the `speed` switches
    applied (quantized at load). Its own progress bar is switched off: callers label theirs (`StepProgress`). An
    unloadable model is an `EMOInputError`."""
    import torch

    from emo_pipeline.pipeline_emo import EMOPipeline
    from emo_pipeline.testing import tiny_emo_pipeline

    speed = speed or SpeedOptions()
    speed.check()
    torch_dtype = getattr(torch, DTYPES[dtype])
    if model is None:
        if notice:
            print(DEMO_NOTICE, file=sys.stderr, flush=True)
        pipe = tiny_emo_pipeline()
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
        if speed.quantize is not None:
            _quantize_in_place(pipe, speed.quantize)
    else:
        kwargs = {}
        if speed.quantize is not None:
            from emo_pipeline.quantization import quantization_config

            kwargs["quantization_config"] = quantization_config(speed.quantize)
        try:
            pipe = EMOPipeline.from_pretrained(model, torch_dtype=torch_dtype, **kwargs)
        except (OSError, ValueError) as error:
            raise EMOInputError(f"cannot load model {model!r}: {error}") from error
    pipe.set_progress_bar_config(disable=True)
    return speed.apply(pipe, device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _quantize_in_place(pipe: Any, recipe: str) -> None:
    """The demo pipeline is built, not loaded: quantize its UNets as `quantization_config(recipe)` would at load."""
    if recipe.startswith("bnb"):
        raise EMOInputError(f"--quantize {recipe} quantizes at load: it needs --model")
    from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig, "int4": Int4WeightOnlyConfig}[recipe]()
    for model in (pipe.unet, pipe.reference_net):
        quantize_(model, config)


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

"""The generation settings of `EMOPipeline.__call__`, `iter_clips` and `write_video`, defined once.

`GenerationSettings` holds the settings every weight family takes; a family's own settings (Hallo's `mode`,
`face_embedding`, ...) are documented with the family (`emo_pipeline.families`) and reach the methods as
`**family_settings`, so they do not crowd every user's `help(pipe)`.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import re
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from emo_pipeline.errors import EMOInputError

__all__ = ["GenerationSettings", "check_generation_numbers", "takes_generation_settings"]


@dataclass
class GenerationSettings:
    """The generation arguments of `EMOPipeline.__call__`, `iter_clips` and `write_video`, defined once.

    The three methods take these fields as keyword-only arguments; their signatures (`inspect.signature`) and
    `help()` list every one with the default below (the paper's where it gives one). A pipeline may carry its own
    defaults for some (`pipe.emo_metadata["generation_defaults"]`: a converted Hallo pipeline has Hallo's 16 frames
    per clip, 2 motion frames, 40 steps); they apply to the arguments a call does not pass. The clip loop reads them
    from an instance of this class.

    Args:
        height: output height in pixels: equal to `width` (the portrait is cropped square around its face) and a
            multiple of the VAE factor (8 for SD).
        width: output width in pixels (see `height`).
        fps: output frame rate (frames/s). The video has `ceil(audio duration * fps)` frames.
        num_frames_per_clip: frames per clip `f` (the paper: 12). The last clip is trimmed to the audio.
        num_motion_frames: frames `n` of the previous clip that the temporal layers see (the paper: 4).
        num_inference_steps: denoising steps per clip (the paper: DDIM, 40).
        guidance_scale: classifier-free guidance on the audio: the scheduler gets `u + s * (c - u)`, `u` the
            no-audio branch and `c` the audio branch, batched into one backbone call; <= 1 runs the audio branch
            only. It applies afresh to every clip; a callback may change it for the rest of the clip's steps with
            `pipe._guidance_scale = value`, as in diffusers.
        speed: head rotation speed in rad/s: one float, or one value per video frame; None: no speed condition.
        face_mask: face-region mask of the input image's size (array or PIL image, > 0.5 or > 127 on the face):
            skips face detection.
        face_box: `(x0, y0, x1, y1)` face box in input-image pixels: skips face detection.
        face_index: which detected face (largest first) when the image has several; default the largest.
        generator: makes the noise reproducible (bit-identical on CPU).
        output_type: "np": `(N, H, W, 3)` float32 in [0, 1]; "pil": a list of PIL images; "pt": `(N, 3, H, W)`
            float32 in [0, 1] on the VAE's device; "latent": `(1, 4, N, h, w)` float32 (clips untrimmed). `write_video`
            takes "np", "pt" or "pil".
        watermark: embed the invisible provenance watermark in every frame (see `emo_pipeline.watermark`).
        eta: DDIM's eta (schedulers without one ignore it).
        decode_chunk_size: frames the VAE decodes per call (memory vs speed).
        decoder: "vae": the pipeline's VAE decodes the frames (exact); "tiny": TAESD (diffusers' `AutoencoderTiny`)
            decodes them instead, for fast previews at lower quality (softer detail, some colour shift). It uses
            `pipe.tiny_decoder`, loaded on first use from "madebyollin/taesd" unless `pipe.load_tiny_decoder(...)`
            was called with another folder or hub id.
        audio_sample_rate: sample rate of an `audio` array in Hz (default 16000); files carry their own.
        max_audio_seconds: longer audio is refused (None: no limit).
        callback_on_step_end: `fn(pipe, step, timestep, tensors) -> dict` called after every denoising step of
            every clip (`step` restarts at 0 in each clip, `pipe.clip_index` tells the clip), or a diffusers
            `PipelineCallback` / `MultiPipelineCallbacks`. `tensors` holds the inputs named in
            `callback_on_step_end_tensor_inputs`; those the callback returns replace the pipeline's: `latents`
            `(1, 4, f, h, w)` for the rest of the clip, `motion_latents` `(1, n, 4, h, w)` as this clip's motion
            frames (the ReferenceNet encodes the new ones). It may also set `pipe._guidance_scale`, or
            `pipe._interrupt = True` to stop: as in diffusers the clip in progress skips its remaining steps and is
            returned as it stands; no later clip is generated.
        callback_on_step_end_tensor_inputs: which of `EMOPipeline._callback_tensor_inputs` the callback gets.
        step_cache: None (off): every step runs the whole backbone. An int N >= 1 turns on DeepCache-style step
            caching (`emo_pipeline.models.step_cache`): the backbone's deep blocks run at one step in N of each
            clip and their features are reused at the N - 1 steps between. Faster, training-free, approximate:
            frames differ from the uncached run (measured in benchmarks/README.md). N = 1 changes nothing.
    """

    height: int = 512
    width: int = 512
    fps: float = 25
    num_frames_per_clip: int = 12
    num_motion_frames: int = 4
    num_inference_steps: int = 40
    guidance_scale: float = 3.5
    speed: float | np.ndarray | torch.Tensor | None = None
    face_mask: np.ndarray | PIL.Image.Image | torch.Tensor | None = None
    face_box: tuple[float, float, float, float] | None = None
    face_index: int | None = None
    generator: torch.Generator | None = None
    output_type: str = "np"
    watermark: bool = True
    eta: float = 0.0
    decode_chunk_size: int = 8
    decoder: str = "vae"
    audio_sample_rate: int | None = None
    max_audio_seconds: float | None = 3600.0
    callback_on_step_end: (
        Callable[[DiffusionPipeline, int, int, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None
    ) = None
    callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",)
    step_cache: int | None = None  # off: the output is exact; caching is an opt-in approximation
    # Settings of one weight family only (e.g. Hallo's `mode`) are not fields here: see `family_settings`.
    family_settings: dict[str, Any] = field(default_factory=dict, repr=False, metadata={"keyword": False})


# The positional inputs of `__call__`, `iter_clips` and `write_video`, documented once like `GenerationSettings`.
_INPUTS_DOC = """\
image: the portrait: a path, PIL image or `(H, W, 3)` uint8 array. It is cropped square around its face.
audio: speech or singing: a path or file of any format PyAV reads, bytes, or a float array at
    `audio_sample_rate` (default 16 kHz). The video has `ceil(duration * fps)` frames."""


_FAMILY_DOC = """\
family_settings: settings of the pipeline's weight family only, documented with it: `help(pipe.family.settings)`
    (Hallo / Hallo2 weights: `emo_pipeline.families.hallo.HalloSettings`: mode, face_embedding, ...). Another
    family's settings are refused with an `EMOInputError` naming them; an unknown name is a `TypeError`."""


def takes_generation_settings(method: Callable) -> Callable:
    """Give `method(self, ..., *, settings: GenerationSettings)` the fields of `GenerationSettings` as keyword-only
    arguments, so one definition serves `__call__`, `iter_clips` and `write_video`, plus `**family_settings`: the
    settings of the pipeline's weight family (`pipe.family.settings`), bound and checked by the family.

    The wrapper's `__signature__` lists every field with its default (`inspect.signature`, `help()`); its docstring
    is the method's, whose Args section (its last) gets `image`/`audio` first and the fields' entries last; a call
    binds its arguments as a plain signature would: an unknown or missing argument is a `TypeError` naming it.
    """
    hints = typing.get_type_hints(method)
    setting_hints = typing.get_type_hints(GenerationSettings)
    names = [field.name for field in fields(GenerationSettings) if field.metadata.get("keyword", True)]
    own = [
        parameter.replace(annotation=hints.get(name, parameter.annotation))
        for name, parameter in inspect.signature(method).parameters.items()
        if name != "settings"
    ]
    shared = [
        inspect.Parameter(
            field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=setting_hints[field.name]
        )
        for field in fields(GenerationSettings)
        if field.name in names
    ]
    family = inspect.Parameter("family_settings", inspect.Parameter.VAR_KEYWORD, annotation=Any)
    returns = hints.get("return", inspect.Signature.empty)
    signature = inspect.Signature(own + shared + [family], return_annotation=returns)

    own_doc = inspect.cleandoc(method.__doc__ or "")
    if "\nArgs:" not in own_doc:
        raise TypeError(f"{method.__qualname__}: its docstring must end with an Args section")
    head, own_args = own_doc.split("\nArgs:", 1)
    settings_args = textwrap.dedent(GenerationSettings.__doc__.split("Args:\n", 1)[1])
    entries = {}  # argument name -> its doc entry (first line "name: ...", continuation lines indented)
    for block in (textwrap.dedent(own_args), _INPUTS_DOC, settings_args):
        for entry in re.split(r"\n(?=\w+:)", block.strip("\n")):
            if entry:
                entries[entry.split(":", 1)[0]] = entry
    entries["family_settings"] = _FAMILY_DOC
    documented = [name for name in signature.parameters if name != "self"]
    if set(entries) != set(documented):
        raise TypeError(f"{method.__qualname__}: documented {sorted(entries)} but takes {documented}")
    doc = head.rstrip() + "\n\nArgs:\n" + "\n".join(textwrap.indent(entries[name], "    ") for name in documented)

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{method.__qualname__}(): {error}") from None
        # A pipeline's own defaults (`emo_metadata["generation_defaults"]`, e.g. Hallo's clip lengths) fill the
        # settings the call does not pass; then the signature's defaults.
        own_defaults = (getattr(bound.arguments.get("self"), "emo_metadata", None) or {}).get(
            "generation_defaults", {}
        )
        for name in names:
            if name in own_defaults and name not in bound.arguments:
                bound.arguments[name] = own_defaults[name]
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        given = arguments.pop("family_settings")
        settings = GenerationSettings(**{name: arguments.pop(name) for name in names})
        pipe = arguments.get("self")
        if pipe is not None:  # the family checks its own settings' names (a wrong one is a TypeError, as above)
            settings.family_settings = pipe.family.bind_settings(given, own_defaults, method.__qualname__)
        return method(**arguments, settings=settings)

    wrapper.__signature__ = signature
    wrapper.__doc__ = doc
    return wrapper


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_generation_numbers(
    fps: Any,
    num_frames_per_clip: Any,
    num_motion_frames: Any,
    num_inference_steps: Any,
    guidance_scale: Any,
    output_type: Any,
    decode_chunk_size: Any,
) -> None:
    """Raise `EMOInputError` naming the first of these settings that is not a usable value (any model)."""
    if not (isinstance(fps, numbers.Real) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0):
        raise EMOInputError(f"fps must be a positive number, got {fps!r}")
    if not _is_int(num_frames_per_clip) or num_frames_per_clip < 1:
        raise EMOInputError(f"num_frames_per_clip must be an int >= 1, got {num_frames_per_clip!r}")
    if not _is_int(num_motion_frames) or not 0 <= num_motion_frames <= num_frames_per_clip:
        raise EMOInputError(
            f"num_motion_frames must be an int in [0, num_frames_per_clip = {num_frames_per_clip}] (motion frames "
            f"are the previous clip's last frames), got {num_motion_frames!r}"
        )
    if not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise EMOInputError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if not (isinstance(guidance_scale, numbers.Real) and math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise EMOInputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if output_type not in ("np", "pil", "pt", "latent"):
        raise EMOInputError(f"output_type must be one of 'np', 'pil', 'pt', 'latent', got {output_type!r}")
    if not _is_int(decode_chunk_size) or decode_chunk_size < 1:
        raise EMOInputError(f"decode_chunk_size must be an int >= 1, got {decode_chunk_size!r}")

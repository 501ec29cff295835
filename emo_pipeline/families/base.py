"""The weight-family interface: what a checkpoint family tells the one sampling loop (`emo_pipeline.sampling`).

A family (native EMO, Hallo / Hallo2, EchoMimic, ...) is one small module under `emo_pipeline.families` holding one
`Family` subclass. It says:

* which pipelines are its own (`Family.matches`: read from the converted folder's metadata or the backbone config),
  and how its release layout converts (`Family.convert_option`: the `emo-convert --<family>` option; the converter
  itself lives beside the family's network code, e.g. `emo_pipeline.hallo_conversion.load_hallo_pipeline`);
* its own generation settings (`Family.settings`, a dataclass documented with the family): the pipeline's methods
  take them as `**family_settings`; another family's are refused (`bind_settings`);
* its conditioning front end and schedule (`Family.prepare`): portrait + track -> a `Plan` (what the video is) and a
  run object the loop drives:

  - `AutoregressiveRun` (EMO, Hallo): clips of `f` frames, each continued from the previous clip's last `n` frames
    (motion frames). `sampling.sample_clips` denoises one clip at a time.
  - `WindowRun` (EchoMimic, V-Express): the whole video's latents held and denoised jointly, each step over
    overlapping context windows whose predictions are averaged. `sampling.sample_windows` drives it.

  Either way the run hands the loop `BranchInputs`: the backbone's keyword arguments for the guidance batch
  `[unconditional, conditional]` and for the conditional branch alone. How the reference and motion frames are
  formed and what the unconditional branch drops are the family's; the loop never looks inside.

What the loop owns (never a family): the initial noise (`randn_tensor`: a generator on any device or a list),
`scheduler.scale_model_input`, `scheduler.step` with the keyword arguments its signature accepts (`eta`,
`generator`), guidance batched into one backbone call and skipped entirely at `guidance_scale <= 1`, the callback
contract (`latents`, `motion_latents`, `pipe._guidance_scale`, `pipe._interrupt`, `pipe.num_timesteps`), progress,
the step cache, decoding in chunks (or the tiny decoder) and streaming to the writer (`EMOPipeline`).

Offload: a family's `prepare` receives `precompute`. False means the backbone sits behind offload hooks (model,
sequential or group offload), where its weights are only in place inside its own forward: per-video and per-clip
work that calls its layers directly (reference keys/values, audio tokens, face features) must then be handed to the
forward as raw inputs instead, exactly as the EMO family does.

docs/families.md walks through adding a family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

from emo_pipeline.errors import EMOInputError

if TYPE_CHECKING:  # annotations only: the pipeline imports the families, never the reverse
    from emo_pipeline.face import PreparedPortrait
    from emo_pipeline.settings import GenerationSettings

__all__ = ["AutoregressiveRun", "BranchInputs", "Clip", "Family", "Plan", "Window", "WindowRun"]


@dataclass
class BranchInputs:
    """The backbone's keyword arguments for one clip (or window), both ways the loop may call it.

    guided: for the batch `[unconditional, conditional]` (latents stacked twice), used while
        `pipe.do_classifier_free_guidance` (guidance_scale > 1).
    conditional: for the conditional branch alone (batch 1), used at guidance_scale <= 1: the unconditional branch is
        then not computed at all.
    Either may be a function returning the dict, called the first time the loop needs that branch (a callback may
    change the guidance mid-clip; a branch never used is never built). The loop calls
    `pipe.unet(sample, timestep, **inputs.get(guided), return_dict=False)`; the dicts hold e.g.
    `reference_features`, `audio_tokens` (or `audio_features` under offload), `face_features`.
    """

    guided: dict[str, Any] | Callable[[], dict[str, Any]]
    conditional: dict[str, Any] | Callable[[], dict[str, Any]]

    def get(self, guided: bool) -> dict[str, Any]:
        """The inputs of the guidance batch (`guided`) or of the conditional branch alone, built once."""
        name = "guided" if guided else "conditional"
        value = getattr(self, name)
        if callable(value):
            value = value()
            setattr(self, name, value)
        return value


@dataclass
class Plan:
    """What is fixed for one video (`pipe.last_plan`): the prepared portrait, the track, frame and clip counts.

    portrait: the square face crop and its face-region mask. audio: `(num_samples,)` float32 mono at 16 kHz (the
    track muxed into the mp4). num_frames: frames of the video. num_clips: clips (autoregressive schedules; 1 for a
    window schedule). speed: `(num_frames,)` rad/s (EMO) or None.
    """

    portrait: PreparedPortrait
    audio: np.ndarray
    num_frames: int
    num_clips: int
    speed: np.ndarray | None = None


@dataclass
class Clip:
    """One clip of an autoregressive schedule, as its family prepared it (`AutoregressiveRun.start_clip`).

    inputs: the backbone inputs of this clip. latent_shape: `(1, C, f, h, w)` of its noise. motion_latents:
    `(1, n, C, h, w)`, the motion frames' latents callbacks see as `motion_latents` (None: the family has none).
    latent_dtype: dtype of the latents and of the scheduler's arithmetic (float32 except in a parity mode that
    reproduces a peer's half-precision latents).
    """

    inputs: BranchInputs
    latent_shape: tuple[int, ...]
    motion_latents: torch.Tensor | None = None
    latent_dtype: torch.dtype = torch.float32


class AutoregressiveRun(Protocol):
    """A video as clips chained by motion frames (EMO, Hallo). The loop (`sampling.sample_clips`) does, per clip::

    clip = run.start_clip(index)                     # conditioning, motion frames, noise shape
    latents = noise; for each timestep: predict (guided or not), scheduler.step, callback
    #   a callback returning motion_latents:  clip.inputs = run.replace_motion_latents(clip, new)
    frames = run.end_clip(index, latents)            # chain: this clip's last frames -> next clip's motion
    yield latents, frames                            # frames None: the pipeline decodes the latents itself
    """

    num_clips: int
    clip_length: int

    def start_clip(self, index: int) -> Clip: ...

    def replace_motion_latents(self, clip: Clip, motion_latents: torch.Tensor) -> BranchInputs: ...

    def end_clip(self, index: int, latents: torch.Tensor) -> torch.Tensor | None: ...


@dataclass
class Window:
    """One context window of a window schedule: `frames` (indices into the video's frames, may wrap) and its
    backbone inputs. Predictions of the frames that several windows share are averaged (`WindowRun.combine`)."""

    frames: Sequence[int]
    inputs: BranchInputs


class WindowRun(Protocol):
    """A video denoised jointly (EchoMimic: 12-frame windows, stride 9, wrapping, shifted every step, overlaps
    averaged; every frame's latents held). The loop (`sampling.sample_windows`) does, per timestep::

        for window in run.windows(step, timestep):      # the family's windows for this step (shifted as it likes)
            noise[:, :, window.frames] += predict(latents[:, :, window.frames], window.inputs)   # guided or not
            count[window.frames] += 1
        noise = run.combine(noise, count, guided)        # default: noise / count (a family may keep a peer's quirk)
        latents = scheduler.step(noise, timestep, latents); callback(latents)

    The noise is drawn once for the whole video (`latent_shape` `(1, C, num_frames, h, w)`) and passed through
    `run.transform_noise` (EchoMimic clamps it to +-1.5). Then the pipeline decodes the latents clip by clip in chunks
    and streams them (every frame's latents are held; nothing else per frame). The family's `Plan.num_clips` is the
    number of decode chunks of `num_frames_per_clip` frames. `tests/test_sampling.py` drives one over the tiny EMO
    backbone (`EMOWindowRun`): a worked example of the whole protocol.
    """

    latent_shape: tuple[int, ...]
    latent_dtype: torch.dtype

    def windows(self, step: int, timestep: torch.Tensor) -> Iterator[Window]: ...

    def combine(self, noise: torch.Tensor, count: torch.Tensor, guided: bool) -> torch.Tensor: ...

    def transform_noise(self, noise: torch.Tensor) -> torch.Tensor: ...


class Family:
    """One checkpoint family. Subclasses set the class attributes and implement `matches` and `prepare`.

    name: the family's name in `emo_metadata["family"]` (and its variants in `variants`). label: for messages
    ("Hallo / Hallo2"). convert_option: its `emo-convert` option. settings: its own settings dataclass (fields with
    defaults, documented in its docstring's Args section) or None. schedule: "clips" or "windows".
    """

    name: ClassVar[str]
    label: ClassVar[str]
    variants: ClassVar[tuple[str, ...]] = ()
    convert_option: ClassVar[str | None] = None
    settings: ClassVar[type | None] = None
    schedule: ClassVar[str] = "clips"
    # GenerationSettings fields this family cannot honour, and why (refused with that message when set).
    refused_settings: ClassVar[tuple[str, ...]] = ()
    refused_reason: ClassVar[str] = ""

    def __init__(self, pipe: Any):
        self.pipe = pipe

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        """Whether `pipe` (an `EMOPipeline`) holds this family's weights."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ settings

    def bind_settings(self, given: dict[str, Any], defaults: dict[str, Any], where: str) -> Any:
        """The family's settings object from the call's extra keywords `given`, the pipeline's own `defaults`
        (`generation_defaults`) and the dataclass defaults. Unknown names: `TypeError` naming them (as a plain
        signature); another family's settings set away from their defaults: `EMOInputError` naming them."""
        from emo_pipeline.families import all_families

        own = {f.name for f in dataclasses.fields(self.settings)} if self.settings is not None else set()
        foreign: dict[str, list[str]] = {}  # a setting of other families -> their labels (from the registry)
        for name, value in given.items():
            if name in own:
                continue
            fields = [
                (family, {f.name: f for f in dataclasses.fields(family.settings)}.get(name))
                for family in all_families()
                if family.settings is not None and family is not type(self)
            ]
            fields = [(family, field_) for family, field_ in fields if field_ is not None]
            if not fields:
                raise TypeError(f"{where}(): got an unexpected keyword argument {name!r}")
            if not all(_is_default(value, field_) for _, field_ in fields):
                foreign[name] = [family.label for family, _ in fields]
        groups: dict[str, list[str]] = {}  # "Hallo / Hallo2 or EchoMimic" -> the settings only those families take
        for name, labels in foreign.items():
            groups.setdefault(" or ".join(labels), []).append(name)
        if groups:
            raise EMOInputError(
                "; ".join(f"{names} apply to {labels} weights only" for labels, names in groups.items())
                + f"; this pipeline's weights are {self.label}'s (convert those weights with `emo-convert`)"
            )
        if self.settings is None:
            return None
        values = {name: defaults[name] for name in own if name in defaults}
        values.update({name: value for name, value in given.items() if name in own})
        return self.settings(**values)

    def check_settings(self, settings: GenerationSettings) -> None:
        """Raise `EMOInputError` for a setting this family cannot honour (called before any input is loaded)."""
        defaults = type(settings)()
        used = [name for name in self.refused_settings if getattr(settings, name) != getattr(defaults, name)]
        if used:
            raise EMOInputError(f"{used} are not available with {self.label} weights ({self.refused_reason})")

    # ------------------------------------------------------------------------------------------------ sampling

    def prepare(
        self, image: Any, audio: Any, settings: GenerationSettings, precompute: bool
    ) -> tuple[Plan, AutoregressiveRun | WindowRun]:
        """The front end: load and check the inputs, compute what is fixed per video, and return the `Plan` and the
        run the loop drives (an `AutoregressiveRun` when `schedule == "clips"`, a `WindowRun` for "windows").
        `precompute`: False under offload hooks (see the module docstring)."""
        raise NotImplementedError


@dataclass
class _Missing:
    pass


def _is_default(value: Any, field_: dataclasses.Field) -> bool:
    default = field_.default if field_.default is not dataclasses.MISSING else _Missing()
    if value is None or default is None:
        return value is default
    try:
        return bool(value == default)
    except (TypeError, ValueError, RuntimeError):  # arrays, tensors: never a default
        return False

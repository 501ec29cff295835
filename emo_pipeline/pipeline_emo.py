"""EMOPipeline: one portrait + one audio track -> a talking-head video (EMO, arXiv 2402.17485, section 3).

The video is generated clip by clip (`num_frames_per_clip` frames). Clip k+1 takes the last `num_motion_frames`
denoised latents of clip k as its motion frames (the first clip's are zero maps, the input training uses when it
drops them), so any audio length works with memory that does not grow with it: `iter_clips` yields each clip as
soon as it is decoded and `write_video` streams them to an mp4.

Work is done at the cheapest granularity that is exact: the reference image is VAE-encoded and run through the
ReferenceNet once per video (its reference keys/values are cached across steps and clips), the motion frames once
per clip, the backbone once per step with both guidance branches in one batch, and the VAE decodes each clip in
chunks.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import numbers
import os
import re
import textwrap
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from emo_pipeline.audio import FeatureWindows, iter_audio_features, load_audio, num_video_frames
from emo_pipeline.devices import has_offload_hooks
from emo_pipeline.errors import EMOInputError
from emo_pipeline.face import PreparedPortrait, prepare_portrait
from emo_pipeline.hallo import HALLO_MODES, HalloConditioning, iter_hallo_clips
from emo_pipeline.models.attention import ReferenceFeatures
from emo_pipeline.models.backbone import EMOUNet3DConditionModel
from emo_pipeline.models.identity import IdentityProjection
from emo_pipeline.models.reference_net import ReferenceNet
from emo_pipeline.models.step_cache import check_step_cache_interval, with_step_cache

__all__ = ["SCHEDULERS", "EMOPipeline", "EMOPipelineOutput", "GenerationSettings"]

SAMPLE_RATE = 16000  # wav2vec2's rate
DEFAULT_TINY_DECODER = "madebyollin/taesd"  # TAESD for SD1.x latents (decoder="tiny")
DECODERS = ("vae", "tiny")

# Schedulers known to work with EMO's epsilon-prediction SD noise schedule (each is tested). DDIM is the paper's.
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++ (2M) by default
    "euler": EulerDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
    "lcm": LCMScheduler,  # for LCM-distilled weights; few steps
}


@dataclass
class EMOPipelineOutput(BaseOutput):
    """Output of `EMOPipeline.__call__`.

    frames: `(N, H, W, 3)` float32 in [0, 1] (`output_type="np"`), a list of N PIL images ("pil"), a
        `(N, 3, H, W)` tensor on the VAE's device ("pt"), or `(1, 4, N, h, w)` float32 latents ("latent").
    audio: `(num_samples,)` float32 mono at `sample_rate`, the track the video follows.
    fps: frames per second of `frames`.
    face_mask: `(H, W)` float32 face-region mask used for the face locator.
    """

    frames: np.ndarray | list[PIL.Image.Image] | torch.Tensor
    audio: np.ndarray
    sample_rate: int
    fps: float
    face_mask: np.ndarray


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
        mode: Hallo weights only. "fast": the networks run on what changed only (the portrait through the ReferenceNet
            once per video, its keys/values cached, motion frames taken from the previous clip's latents, latents in
            float32); "parity": Hallo's own loop exactly (motion frames decoded and re-encoded, reference bank rounded
            to float16, frames decoded one by one), for comparison with Hallo's outputs.
        face_embedding: Hallo weights: the `(512,)` or `(1, 512)` insightface identity embedding of the portrait;
            skips insightface (default: computed with the models in `face_analysis_dir`).
        face_analysis_dir: Hallo weights: folder of Hallo's insightface models (`pretrained_models/face_analysis`);
            default: the one recorded when the pipeline was converted (`emo-convert --hallo`).
        motion_scale: Hallo weights: weights of the audio attention on the (full, face, lip) regions.
        motion_frame_mask_rate: Hallo2 weights, parity mode: before each clip, motion-frame pixels outside the face
            are dropped with this probability (Hallo2's long-video setting: 0.25); None: no masking.
        audio_separator_model: Hallo weights: an audio-separator model file (Hallo: `pretrained_models/
            audio_separator/Kim_Vocal_2.onnx`) to keep only the vocals before wav2vec2; None: the audio as given.
        audio_segment_seconds: Hallo weights: Hallo2's long-audio option, wav2vec2 run on segments of this many
            seconds (Hallo2: 60) instead of the whole track at once (Hallo), so its attention never spans a long
            track; each segment is normalised and encoded on its own, which changes the features near the cuts.
        hallo_conditioning: Hallo weights: precomputed inputs (`emo_pipeline.hallo.HalloConditioning`: portrait
            pixels, identity embedding, face region and masks, per-frame audio features) in place of the front end;
            `image` and `audio` may then be None (the video is silent).
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
    # Hallo / Hallo2 weights (`emo_pipeline.hallo`); native EMO weights refuse these when set.
    mode: str = "fast"
    face_embedding: np.ndarray | torch.Tensor | None = None
    face_analysis_dir: str | os.PathLike | None = None
    motion_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    motion_frame_mask_rate: float | None = None
    audio_separator_model: str | os.PathLike | None = None
    audio_segment_seconds: float | None = None
    hallo_conditioning: HalloConditioning | None = None


# The positional inputs of `__call__`, `iter_clips` and `write_video`, documented once like `GenerationSettings`.
_INPUTS_DOC = """\
image: the portrait: a path, PIL image or `(H, W, 3)` uint8 array. It is cropped square around its face.
audio: speech or singing: a path or file of any format PyAV reads, bytes, or a float array at
    `audio_sample_rate` (default 16 kHz). The video has `ceil(duration * fps)` frames."""


def _takes_generation_settings(method: Callable) -> Callable:
    """Give `method(self, ..., *, settings: GenerationSettings)` the fields of `GenerationSettings` as keyword-only
    arguments, so one definition serves `__call__`, `iter_clips` and `write_video`.

    The wrapper's `__signature__` lists every field with its default (`inspect.signature`, `help()`); its docstring
    is the method's, whose Args section (its last) gets `image`/`audio` first and the fields' entries last; a call
    binds its arguments as a plain signature would: an unknown or missing argument is a `TypeError` naming it.
    """
    hints = typing.get_type_hints(method)
    setting_hints = typing.get_type_hints(GenerationSettings)
    names = [field.name for field in fields(GenerationSettings)]
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
    ]
    signature = inspect.Signature(own + shared, return_annotation=hints.get("return", inspect.Signature.empty))

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
        settings = GenerationSettings(**{name: arguments.pop(name) for name in names})
        return method(**arguments, settings=settings)

    wrapper.__signature__ = signature
    wrapper.__doc__ = doc
    return wrapper


@dataclass
class _Plan:
    """Everything fixed for one video."""

    portrait: PreparedPortrait
    audio: np.ndarray
    num_frames: int
    num_clips: int
    speed: np.ndarray | None  # (num_frames,) rad/s


def _portrait_of(conditioning: HalloConditioning) -> PreparedPortrait:
    """The `PreparedPortrait` a `HalloConditioning` stands for (its pixels and face region)."""
    pixels = ((conditioning.source_image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    mask = (conditioning.face_region[0, 0] > 0).float().cpu().numpy()
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0], dtype=np.float32)
    return PreparedPortrait(image=PIL.Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()), face_box=box, mask=mask)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class EMOPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Audio-driven portrait video generation with EMO.

    Components: `vae` (frozen SD VAE), `reference_net` (`ReferenceNet`), `unet` (`EMOUNet3DConditionModel`),
    `audio_encoder` (`Wav2Vec2Model`), `feature_extractor` (`Wav2Vec2FeatureExtractor`), `scheduler` (any diffusers
    scheduler with `set_timesteps`/`step`; DDIM by default), and `identity_proj` (`IdentityProjection`, optional:
    only pipelines converted from Hallo / Hallo2 weights have one, see `emo_pipeline.hallo.build_hallo_pipeline`;
    `pipe.is_hallo` tells).

    Generate with `pipe(image, audio, ...)` (the whole video in memory), `pipe.iter_clips(...)` (clip by clip) or
    `pipe.write_video(path, ...)` (streamed to an mp4); they share the keyword arguments of `GenerationSettings`.
    During a call, as in diffusers' video pipelines: `pipe.guidance_scale`, `pipe.do_classifier_free_guidance`,
    `pipe.num_timesteps` (denoising steps per clip), `pipe.interrupt`, and `pipe.clip_index` (the clip being
    denoised); a `callback_on_step_end` may set `pipe._guidance_scale` or `pipe._interrupt`.

    LoRA (diffusers' loader, backbone only; needs peft): `pipe.load_lora_weights(path_or_repo, adapter_name=...)`,
    `pipe.set_adapters(names, weights)`, `pipe.fuse_lora()` / `pipe.unfuse_lora()`, `pipe.delete_adapters(names)`,
    `pipe.unload_lora_weights()`, `EMOPipeline.save_lora_weights(folder, unet_lora_layers=...)`.
    """

    _lora_loadable_modules = ["unet"]
    _optional_components = ["identity_proj"]
    model_cpu_offload_seq = "audio_encoder->identity_proj->reference_net->unet->vae"
    _callback_tensor_inputs = ["latents", "motion_latents"]
    # Per-call state, read through the properties below (diffusers' names). Class defaults until the first call.
    _guidance_scale: float | None = None
    _num_timesteps: int | None = None
    _interrupt: bool = False
    clip_index: int | None = None
    # TAESD for `decoder="tiny"` previews: not a registered component (not saved with the pipeline, not moved by
    # `pipe.to`); it follows the VAE's dtype and the latents' device when used.
    tiny_decoder: AutoencoderTiny | None = None

    def __init__(
        self,
        vae: AutoencoderKL,
        reference_net: ReferenceNet,
        unet: EMOUNet3DConditionModel,
        audio_encoder: Wav2Vec2Model,
        feature_extractor: Wav2Vec2FeatureExtractor,
        scheduler: SchedulerMixin,
        identity_proj: IdentityProjection | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            reference_net=reference_net,
            unet=unet,
            audio_encoder=audio_encoder,
            feature_extractor=feature_extractor,
            scheduler=scheduler,
            identity_proj=identity_proj,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.emo_metadata: dict = {}  # provenance and training history: emo_metadata.json and the model card

    # ---------------------------------------------------------------------------------------------- save/load

    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False, **kwargs) -> None:
        """diffusers' save (safetensors) + `emo_metadata.json` and a model card (README.md).

        Load it back with `EMOPipeline.from_pretrained(folder)`. diffusers' generic loader finds the class only as
        custom code: `DiffusionPipeline.from_pretrained(folder, custom_pipeline=emo_pipeline.pipeline_emo.__file__,
        trust_remote_code=True)`.
        """
        from emo_pipeline.hub import EMO_METADATA_FILE, push_folder_to_hub, write_model_card

        hub_kwargs = {k: kwargs.pop(k) for k in ("commit_message", "private", "token") if k in kwargs}
        repo_id = kwargs.pop("repo_id", None) or Path(save_directory).name
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        metadata = dict(getattr(self, "emo_metadata", None) or {})
        (folder / EMO_METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        write_model_card(folder, metadata)
        if push_to_hub:
            push_folder_to_hub(folder, repo_id, **hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Save (weights, metadata, model card) and upload to the Hub; returns the commit url."""
        from emo_pipeline.hub import push_pipeline_to_hub

        return push_pipeline_to_hub(self, repo_id, **kwargs)

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
        adapter_name: str | None = None,
        **kwargs,
    ) -> None:
        """Load LoRA weights (a folder/file/Hub repo saved by `save_lora_weights`, or a state dict) into the backbone.

        diffusers' Stable Diffusion loader, minus its text-encoder half (EMO has no text encoder)."""
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        state_dict, network_alphas, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        if not state_dict or not all("lora" in key for key in state_dict):
            raise EMOInputError(
                f"{pretrained_model_name_or_path_or_dict!s:.200}: not a LoRA checkpoint (no lora keys)"
            )
        self.load_lora_into_unet(
            state_dict,
            network_alphas=network_alphas,
            unet=self.unet,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Fuse the active (or the named) LoRA adapters into the backbone's weights: faster inference, same output.

        diffusers' `fuse_lora` with the backbone as the default component (its Stable Diffusion default also names a
        text encoder, which EMO does not have). `lora_scale` scales the fused update; `unfuse_lora()` undoes it.
        """
        super().fuse_lora(
            components=components or list(self._lora_loadable_modules),
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Undo `fuse_lora`: the backbone's weights are restored and the adapters act unfused again."""
        super().unfuse_lora(components=components or list(self._lora_loadable_modules), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> EMOPipeline:
        """diffusers' loader (folder or hub id), plus the `emo_metadata.json` provenance when present.

        A repo or folder without that file loads with empty metadata; an error reading it from the Hub (auth,
        network) is raised, not hidden (see `emo_pipeline.hub.read_metadata`).
        """
        from emo_pipeline.hub import read_metadata

        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = ("revision", "cache_dir", "token", "local_files_only")
        pipe.emo_metadata = read_metadata(
            pretrained_model_name_or_path, **{key: kwargs[key] for key in hub_kwargs if key in kwargs}
        )
        return pipe

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Callable | None = None) -> None:
        """diffusers' pipeline switch (`enable_`/`disable_xformers_memory_efficient_attention`); turning it off puts
        EMO's processor (cached reference keys/values) back on the backbone's attn1 layers, which diffusers' walk
        over every child module would otherwise leave on the plain default."""
        super().set_use_memory_efficient_attention_xformers(valid, attention_op)
        if not valid:
            self.unet._install_emo_processors()

    COMPILABLE = ("unet", "reference_net", "vae")

    def compile(
        self,
        mode: str | None = None,
        dynamic: bool = False,
        components: tuple[str, ...] | list[str] = COMPILABLE,
        **compile_kwargs,
    ) -> None:
        """`torch.compile` the backbone, the ReferenceNet and the VAE's decoder in place (`fullgraph=True`: none has
        a graph break).

        The first clip pays the compilation (minutes at SD1.5 size); later clips and videos of the same size reuse
        it. `dynamic=False` specialises on the shapes, which stay fixed within a video: the backbone sees one batch
        shape per guidance mode, the ReferenceNet one for the portrait and one for the motion frames, the decoder
        one per chunk size. `components`: which of "unet", "reference_net", "vae" (on this project's CPU benchmark
        the compiled decoder was 6x faster than eager while the compiled UNets were slower: compile the VAE alone
        with `components=("vae",)`, see benchmarks/README.md). `mode` (e.g. "max-autotune") and other arguments go
        to `torch.compile`.
        """
        unknown = set(components) - set(self.COMPILABLE)
        if unknown:
            raise EMOInputError(f"compile: unknown components {sorted(unknown)}; choose from {self.COMPILABLE}")
        for name in components:
            model = self.vae.decoder if name == "vae" else getattr(self, name)
            model.compile(fullgraph=True, dynamic=dynamic, mode=mode, **compile_kwargs)

    def set_scheduler(self, name: str, **config_overrides) -> None:
        """Swap the scheduler for one of `SCHEDULERS` built from the current scheduler's config (same noise
        schedule), e.g. `pipe.set_scheduler("dpm++")`. Any other diffusers scheduler can be assigned directly."""
        if name not in SCHEDULERS:
            raise EMOInputError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
        self.scheduler = SCHEDULERS[name].from_config(self.scheduler.config, **config_overrides)

    # ------------------------------------------------------------------------------------------------- inputs

    @property
    def guidance_scale(self) -> float | None:
        """The audio guidance scale of the clip being denoised (a callback may set `pipe._guidance_scale`)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether this step runs both branches (no audio, audio): `guidance_scale > 1`."""
        return self._guidance_scale is not None and self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int | None:
        """Denoising steps per clip of the current (or last) call: `len(scheduler.timesteps)`."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. from a callback) to stop generating after the current step."""
        return self._interrupt

    @property
    def is_hallo(self) -> bool:
        """Whether the backbone has Hallo's layout (audio modules; converted with `emo-convert --hallo`)."""
        return getattr(self.unet.config, "audio_attention", None) == "audio_modules"

    @property
    def audio_window(self) -> int:
        """m: audio features of frames i-m..i+m condition frame i."""
        return self.unet.audio_proj.config.window_size // 2

    def check_inputs(
        self,
        height: int,
        width: int,
        fps: float,
        num_frames_per_clip: int,
        num_motion_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        output_type: str,
        decode_chunk_size: int,
        callback_on_step_end_tensor_inputs: list[str] | None,
        callback_on_step_end: Callable | None = None,
    ) -> None:
        """Raise `EMOInputError` naming the first unusable argument."""
        if height != width:
            raise EMOInputError(
                f"height ({height}) and width ({width}) must be equal: the portrait is cropped square around the face"
            )
        if height <= 0 or height % self.vae_scale_factor:
            raise EMOInputError(f"height/width must be a positive multiple of {self.vae_scale_factor}, got {height}")
        if not (isinstance(fps, numbers.Real) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0):
            raise EMOInputError(f"fps must be a positive number, got {fps!r}")
        if not _is_int(num_frames_per_clip) or num_frames_per_clip < 1:
            raise EMOInputError(f"num_frames_per_clip must be an int >= 1, got {num_frames_per_clip!r}")
        if not _is_int(num_motion_frames) or not 0 <= num_motion_frames <= num_frames_per_clip:
            raise EMOInputError(
                f"num_motion_frames must be an int in [0, num_frames_per_clip = {num_frames_per_clip}] (motion frames "
                f"are the previous clip's last frames), got {num_motion_frames!r}"
            )
        limit = self.unet.config.motion_max_seq_length
        if num_motion_frames + num_frames_per_clip > limit:
            raise EMOInputError(
                f"num_motion_frames ({num_motion_frames}) + num_frames_per_clip ({num_frames_per_clip}) = "
                f"{num_motion_frames + num_frames_per_clip} exceeds the temporal layers' positional table "
                f"(motion_max_seq_length = {limit})"
            )
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise EMOInputError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if not (isinstance(guidance_scale, numbers.Real) and math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise EMOInputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if output_type not in ("np", "pil", "pt", "latent"):
            raise EMOInputError(f"output_type must be one of 'np', 'pil', 'pt', 'latent', got {output_type!r}")
        if not _is_int(decode_chunk_size) or decode_chunk_size < 1:
            raise EMOInputError(f"decode_chunk_size must be an int >= 1, got {decode_chunk_size!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise EMOInputError(
                f"callback_on_step_end must be callable (pipe, step, timestep, tensors) -> dict, got "
                f"{type(callback_on_step_end).__name__}"
            )
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise EMOInputError(
                f"callback_on_step_end_tensor_inputs {sorted(unknown)} not in {self._callback_tensor_inputs}"
            )

    def _speed_per_frame(self, speed: Any, num_frames: int) -> np.ndarray | None:
        if speed is None:
            return None
        values = np.asarray(speed.detach().cpu() if torch.is_tensor(speed) else speed, dtype=np.float64)
        if values.ndim == 0:
            values = np.full(num_frames, float(values))
        if values.shape != (num_frames,):
            raise EMOInputError(
                f"speed must be a float or one value per video frame, shape ({num_frames},) for this audio "
                f"(ceil(duration * fps) frames), got shape {values.shape}"
            )
        if not np.isfinite(values).all() or (values < 0).any():
            raise EMOInputError("speed must be finite and >= 0 (head rotation speed in rad/s)")
        return values.astype(np.float32)

    # ---------------------------------------------------------------------------------------------- pieces

    @torch.no_grad()
    def encode_image(self, image: PIL.Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """RGB image -> `(1, 4, h, w)` scaled VAE latents of the reference image.

        The latent distribution's mode (its mean), not a sample: the reference is deterministic, the same for every
        seed, and matches what training feeds the ReferenceNet (also the mode).
        """
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        latents = self.vae.encode(pixels.to(device=device, dtype=self.vae.dtype)).latent_dist.mode()
        return (latents * self.vae.config.scaling_factor).to(dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int = 8, decoder: str = "vae") -> torch.Tensor:
        """`(B, 4, F, h, w)` latents -> `(B*F, 3, H, W)` float32 in [0, 1], `decode_chunk_size` frames per call.

        `decoder="vae"` decodes with the pipeline's VAE in its dtype; "tiny" with `self.tiny_decoder` (TAESD, loaded
        from `DEFAULT_TINY_DECODER` if none was loaded): several times faster, visibly lower quality.
        """
        if decoder not in DECODERS:
            raise EMOInputError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        model = self.vae if decoder == "vae" else self._tiny_decoder(latents.device)
        # SD latents are the VAE's latents times its scaling factor; TAESD was trained on the scaled ones (its
        # scaling_factor is 1), so each decoder divides by its own factor.
        frames = latents.permute(0, 2, 1, 3, 4).flatten(0, 1) / model.config.scaling_factor
        decoded = [model.decode(chunk.to(model.dtype)).sample.float() for chunk in frames.split(decode_chunk_size)]
        return (torch.cat(decoded) / 2 + 0.5).clamp(0, 1)

    def load_tiny_decoder(
        self, pretrained_model_name_or_path: str | os.PathLike = DEFAULT_TINY_DECODER, **kwargs
    ) -> AutoencoderTiny:
        """Load TAESD (diffusers' `AutoencoderTiny`) from a folder or hub id as `self.tiny_decoder`, the decoder
        of `decoder="tiny"`; returns it. `kwargs` go to `AutoencoderTiny.from_pretrained`.

        Raises `EMOInputError` naming the source when nothing loads from it (missing folder, unknown or offline hub
        id), or when its latents do not match the VAE's (channels, downscale factor).
        """
        try:
            tiny = AutoencoderTiny.from_pretrained(
                pretrained_model_name_or_path, **{"torch_dtype": self.vae.dtype, **kwargs}
            )
        except (OSError, ValueError) as error:
            raise EMOInputError(
                f"tiny decoder {str(pretrained_model_name_or_path)!r}: no AutoencoderTiny could be loaded from it "
                f"({type(error).__name__}: {str(error)[:300]}). Pass a folder written by "
                f"AutoencoderTiny.save_pretrained or a hub id such as {DEFAULT_TINY_DECODER!r} (downloaded first when "
                "offline)."
            ) from error
        channels = (tiny.config.latent_channels, self.vae.config.latent_channels)
        factors = (
            tiny.config.upsampling_scaling_factor ** (len(tiny.config.num_decoder_blocks) - 1),
            self.vae_scale_factor,
        )
        if channels[0] != channels[1] or factors[0] != factors[1]:
            raise EMOInputError(
                f"tiny decoder {str(pretrained_model_name_or_path)!r} decodes {channels[0]}-channel latents "
                f"upscaling {factors[0]}x, but this pipeline's VAE uses {channels[1]} channels and {factors[1]}x"
            )
        self.tiny_decoder = tiny.eval()
        return tiny

    def _tiny_decoder(self, device: torch.device) -> AutoencoderTiny:
        if self.tiny_decoder is None:
            self.load_tiny_decoder()
        if (self.tiny_decoder.device, self.tiny_decoder.dtype) != (device, self.vae.dtype):  # follow the VAE
            self.tiny_decoder.to(device=device, dtype=self.vae.dtype)
        return self.tiny_decoder

    def _scheduler_step_kwargs(self, generator, eta: float) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    # ----------------------------------------------------------------------------------------------- generate

    @_takes_generation_settings
    def __call__(
        self, image: Any, audio: Any, *, return_dict: bool = True, settings: GenerationSettings
    ) -> EMOPipelineOutput | tuple:
        """Generate the whole video in memory; `iter_clips` and `write_video` stream it with flat memory instead.

        Returns an `EMOPipelineOutput` (frames, audio, sample_rate, fps, face_mask), or `(frames,)` when
        `return_dict=False`.

        Args:
            return_dict: return an `EMOPipelineOutput` (True) or a plain tuple `(frames,)`.
        """
        clips = list(self._start(image, audio, settings))
        if settings.output_type == "pil":
            frames = [frame for clip in clips for frame in clip]
        elif settings.output_type == "latent":
            frames = torch.cat(clips, dim=2)
        elif settings.output_type == "pt":
            frames = torch.cat(clips)
        else:
            frames = np.concatenate(clips)
        if not return_dict:
            return (frames,)
        plan = self.last_plan
        return EMOPipelineOutput(
            frames=frames,
            audio=plan.audio,
            sample_rate=SAMPLE_RATE,
            fps=float(settings.fps),
            face_mask=plan.portrait.mask,
        )

    @_takes_generation_settings
    def iter_clips(
        self, image: Any, audio: Any, *, settings: GenerationSettings
    ) -> Iterator[np.ndarray | list[PIL.Image.Image] | torch.Tensor]:
        """Generate the video clip by clip: an iterator over each clip's frames, yielded as soon as decoded.

        Inputs are loaded and checked when this is called (bad input raises `EMOInputError` here, not at the first
        `next`); generation runs as the iterator is consumed. `self.last_plan` holds the loaded audio, the prepared
        portrait and the frame count. Each clip has `num_frames_per_clip` frames (the last one trimmed to the audio)
        in the form `output_type` says.

        Args:
        """
        return self._start(image, audio, settings)

    @_takes_generation_settings
    def write_video(
        self,
        output_path: str | os.PathLike,
        image: Any,
        audio: Any,
        *,
        crf: int = 18,
        c2pa_signer: Any = None,
        settings: GenerationSettings,
    ) -> Path:
        """Generate and stream the video into an mp4 (H.264 + AAC, the audio muxed), clip by clip; returns its path.

        Memory stays flat in the audio length. The file appears at `output_path` only once complete; an error or
        Ctrl-C leaves nothing there. A deliberate stop (a callback setting `pipe._interrupt = True`) ends the video
        early: the file holds the clips generated until then, the audio cut to their length. The mp4 carries a tag
        saying it is AI-generated.

        Args:
            output_path: the mp4 to write (its folder must exist).
            crf: x264 constant rate factor (0 lossless .. 51; 18 is visually transparent).
            c2pa_signer: an `emo_pipeline.provenance.C2PASigner` to sign C2PA content credentials into the mp4
                (the model, the portrait's and audio's SHA-256); None: the one $EMO_C2PA_CERT/$EMO_C2PA_KEY
                name, if set; False: never sign.
        """
        from emo_pipeline.media import VideoWriter
        from emo_pipeline.provenance import ingredient, manifest_definition, model_claim, resolve_c2pa_signer
        from emo_pipeline.watermark import AI_GENERATED_METADATA

        if settings.output_type not in ("np", "pt", "pil"):
            raise EMOInputError("write_video needs decoded frames: output_type must be 'np', 'pt' or 'pil'")
        signer = resolve_c2pa_signer() if c2pa_signer is None else (c2pa_signer or None)
        clips = self._start(image, audio, settings)  # checks the inputs before they are hashed
        manifest = None
        if signer is not None:  # the inputs as given (file bytes), not as decoded
            manifest = manifest_definition(
                os.path.basename(os.fspath(output_path)),
                model=model_claim(getattr(self, "emo_metadata", None)),
                ingredients=[ingredient(image, "portrait"), ingredient(audio, "audio")],
            )
        with VideoWriter(
            output_path,
            fps=settings.fps,
            audio=self.last_plan.audio,
            sample_rate=SAMPLE_RATE,
            crf=crf,
            metadata=AI_GENERATED_METADATA,
            c2pa_signer=signer,
            c2pa_manifest=manifest,
        ) as writer:
            for clip in clips:
                if isinstance(clip, list):
                    clip = np.stack([np.asarray(frame) for frame in clip])
                elif torch.is_tensor(clip):  # "pt" frames are on the VAE's device, maybe an accelerator
                    clip = clip.permute(0, 2, 3, 1).cpu().numpy()
                writer.write(clip)
        return Path(output_path)

    def _start(self, image: Any, audio: Any, settings: GenerationSettings) -> Iterator:
        """Check the settings, load the inputs, plan the clips (`self.last_plan`) and return the clip loop."""
        callback = settings.callback_on_step_end
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            settings.callback_on_step_end_tensor_inputs = callback.tensor_inputs  # as diffusers' pipelines do
        self.check_inputs(
            settings.height,
            settings.width,
            settings.fps,
            settings.num_frames_per_clip,
            settings.num_motion_frames,
            settings.num_inference_steps,
            settings.guidance_scale,
            settings.output_type,
            settings.decode_chunk_size,
            settings.callback_on_step_end_tensor_inputs,
            callback,
        )
        if settings.decoder not in DECODERS:
            raise EMOInputError(f"decoder must be one of {DECODERS}, got {settings.decoder!r}")
        self._check_family_settings(settings)
        if settings.decoder == "tiny" and settings.output_type != "latent" and self.tiny_decoder is None:
            self.load_tiny_decoder()  # now, so a missing decoder is reported before any generation
        if self.is_hallo:
            return self._free_model_hooks_after(self._start_hallo(image, audio, settings))
        check_step_cache_interval(settings.step_cache)
        samples = load_audio(
            audio, SAMPLE_RATE, max_duration=settings.max_audio_seconds, src_sample_rate=settings.audio_sample_rate
        )
        num_frames = num_video_frames(len(samples), SAMPLE_RATE, settings.fps)
        portrait = prepare_portrait(
            image,
            size=settings.height,
            face_index=settings.face_index,
            face_box=settings.face_box,
            face_mask=settings.face_mask,
        )
        self.last_plan = plan = _Plan(
            portrait=portrait,
            audio=samples,
            num_frames=num_frames,
            num_clips=math.ceil(num_frames / settings.num_frames_per_clip),
            speed=self._speed_per_frame(settings.speed, num_frames),
        )
        return self._free_model_hooks_after(
            with_step_cache(self.unet, settings.step_cache, self._generate(plan, settings))
        )

    def _free_model_hooks_after(self, clips: Iterator) -> Iterator:
        """Yield from the clip loop, then `maybe_free_model_hooks()` as diffusers' pipelines end their `__call__`.

        Under `enable_model_cpu_offload` that parks every model on the CPU again and resets the offload hooks. It
        also runs when the consumer stops early (`close()`, or the iterator dropped) and when generation fails.
        """
        try:
            yield from clips
        finally:
            self.maybe_free_model_hooks()

    # ------------------------------------------------------------------------------------------ Hallo weights

    _HALLO_ONLY = (
        "mode",
        "face_embedding",
        "face_analysis_dir",
        "motion_scale",
        "motion_frame_mask_rate",
        "audio_separator_model",
        "audio_segment_seconds",
        "hallo_conditioning",
    )
    _EMO_ONLY = ("speed", "face_mask", "step_cache")

    def _check_family_settings(self, settings: GenerationSettings) -> None:
        """Refuse settings the loaded weights cannot honour (Hallo's with EMO's backbone and the reverse)."""
        defaults = GenerationSettings()
        if not self.is_hallo:
            used = [
                name
                for name in self._HALLO_ONLY
                if getattr(settings, name) is not None
                and (getattr(defaults, name) is None or getattr(settings, name) != getattr(defaults, name))
            ]
            if used:
                raise EMOInputError(
                    f"{used} apply to Hallo / Hallo2 weights only; this pipeline's backbone is EMO's "
                    "(convert Hallo's weights with `emo-convert --hallo`)"
                )
            return
        used = [name for name in self._EMO_ONLY if getattr(settings, name) is not None]
        if used:
            raise EMOInputError(
                f"{used} are not available with Hallo weights (no speed condition; the face region comes from face "
                "landmarks, pass hallo_conditioning= to set it; no step cache for its audio modules yet)"
            )
        if settings.mode not in HALLO_MODES:
            raise EMOInputError(f"mode must be one of {HALLO_MODES}, got {settings.mode!r}")
        if float(settings.fps) != int(settings.fps):
            raise EMOInputError(
                f"fps must be a whole number with Hallo weights (Hallo's audio frames are sample_rate // fps samples; "
                f"it was trained at 25), got {settings.fps!r}"
            )
        if settings.mode == "parity" and settings.decoder != "vae":
            raise EMOInputError("mode='parity' decodes with the VAE frame by frame as Hallo does: use decoder='vae'")
        rate = settings.motion_frame_mask_rate
        if rate is not None and not (isinstance(rate, numbers.Real) and 0 <= rate < 1):
            raise EMOInputError(f"motion_frame_mask_rate must be in [0, 1) (Hallo2: 0.25), got {rate!r}")
        scale = settings.motion_scale
        if (
            not isinstance(scale, (tuple, list))
            or len(scale) != 3
            or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in scale)
        ):
            raise EMOInputError(f"motion_scale must be three finite numbers (full, face, lip), got {scale!r}")
        unknown = set(settings.callback_on_step_end_tensor_inputs) - {"latents"}
        if unknown:
            raise EMOInputError(f"with Hallo weights a callback gets 'latents' only, not {sorted(unknown)}")
        if has_offload_hooks(self.unet):
            raise EMOInputError(
                "CPU/group offloading is not supported with Hallo weights yet: the Hallo loop calls the identity "
                "projection, face locator and audio projection directly; move the pipeline to one device instead"
            )

    def _start_hallo(self, image: Any, audio: Any, settings: GenerationSettings) -> Iterator:
        """`_start` for Hallo weights: Hallo's front end (or `hallo_conditioning`), the plan, the clip loop."""
        size = settings.height
        conditioning = settings.hallo_conditioning
        if conditioning is None:
            if image is None or audio is None:
                raise EMOInputError("pass a portrait image and an audio track (or hallo_conditioning=)")
            samples = load_audio(
                audio, SAMPLE_RATE, max_duration=settings.max_audio_seconds, src_sample_rate=settings.audio_sample_rate
            )
            portrait = prepare_portrait(image, size=size, face_index=settings.face_index, face_box=settings.face_box)
            conditioning = self._hallo_conditioning(portrait, samples, settings)
        else:
            if not isinstance(conditioning, HalloConditioning):
                raise EMOInputError(
                    f"hallo_conditioning must be an emo_pipeline.hallo.HalloConditioning, got {type(conditioning)}"
                )
            conditioning.check()
            if conditioning.source_image.shape[-1] != size:
                raise EMOInputError(
                    f"height/width ({size}) must equal hallo_conditioning.source_image's size "
                    f"({conditioning.source_image.shape[-1]})"
                )
            duration = conditioning.num_frames / settings.fps
            samples = (
                np.zeros(round(duration * SAMPLE_RATE), dtype=np.float32)
                if audio is None
                else load_audio(audio, SAMPLE_RATE, src_sample_rate=settings.audio_sample_rate)
            )
            portrait = _portrait_of(conditioning)
        self.last_plan = plan = _Plan(
            portrait=portrait,
            audio=samples,
            num_frames=conditioning.num_frames,
            num_clips=math.ceil(conditioning.num_frames / settings.num_frames_per_clip),
            speed=None,
        )
        return self._generate_hallo(plan, conditioning, settings)

    def _hallo_conditioning(
        self, portrait: PreparedPortrait, samples: np.ndarray, settings: GenerationSettings
    ) -> HalloConditioning:
        """Hallo's front end on the cropped portrait and the track: landmarks -> face region and masks, insightface
        identity embedding (or `face_embedding`), wav2vec2 features interpolated before the transformer."""
        from emo_pipeline import hallo_inputs

        size = settings.height
        embedding = settings.face_embedding
        if embedding is not None:
            embedding = torch.as_tensor(np.asarray(embedding, dtype=np.float32)).reshape(1, -1)
            expected = self.identity_proj.config.embed_dim
            if embedding.shape[1] != expected or not torch.isfinite(embedding).all():
                raise EMOInputError(
                    f"face_embedding must hold {expected} finite numbers (an insightface embedding), got shape "
                    f"{tuple(np.shape(settings.face_embedding))}"
                )
        else:
            folder = settings.face_analysis_dir
            if folder is None:
                raise EMOInputError(
                    "Hallo weights need the portrait's face embedding: pass face_analysis_dir= (Hallo's "
                    "pretrained_models/face_analysis, insightface models) or face_embedding= (512 numbers)"
                )
            embedding = hallo_inputs.hallo_face_embedding(portrait.image, folder)
        masks = hallo_inputs.hallo_face_masks((size, size), hallo_inputs.hallo_face_landmarks(portrait.image), size)
        if settings.audio_separator_model is not None:
            model = Path(settings.audio_separator_model)
            samples = hallo_inputs.separate_vocals(samples, SAMPLE_RATE, model.parent, model.name)
        if self.audio_encoder is None or self.feature_extractor is None:
            raise EMOInputError("this pipeline has no audio_encoder/feature_extractor: pass hallo_conditioning=")
        self.audio_encoder.eval()
        # Chunks (Hallo2: one per segment) computed as the clip loop reaches them: long audio is never held whole.
        chunks, total, audio_length = hallo_inputs.iter_hallo_audio_features(
            samples,
            self.audio_encoder,
            self.feature_extractor,
            fps=int(settings.fps),
            clip_length=settings.num_frames_per_clip,
            segment_seconds=settings.audio_segment_seconds,
        )
        pixels = torch.from_numpy(np.asarray(portrait.image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        return HalloConditioning(
            source_image=pixels,
            face_embedding=embedding,
            face_region=masks.face_region,
            region_masks=masks.region_masks,
            audio_features=chunks,
            audio_length=audio_length,
            audio_frames=total,
        )

    @torch.no_grad()
    def _generate_hallo(self, plan: _Plan, conditioning: HalloConditioning, settings: GenerationSettings) -> Iterator:
        """The clip loop with Hallo's networks (`emo_pipeline.hallo.iter_hallo_clips`), the pipeline's outputs."""
        from emo_pipeline.hallo import HalloModels

        f = settings.num_frames_per_clip
        callback, tensor_inputs = settings.callback_on_step_end, list(settings.callback_on_step_end_tensor_inputs)
        self._interrupt = False
        self._num_timesteps = None
        models = HalloModels(self.reference_net, self.unet, self.identity_proj)

        def clip_start(clip: int) -> None:
            self.clip_index = clip
            self._guidance_scale = settings.guidance_scale  # a callback's change lasts for its clip only

        def step_end(step: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor | None:
            self._num_timesteps = len(self.scheduler.timesteps)
            progress.update()
            if callback is None:
                return None
            returned = callback(self, step, timestep, {"latents": latents} if "latents" in tensor_inputs else {})
            if not isinstance(returned, dict):
                raise TypeError(f"callback_on_step_end must return a dict of tensors, got {type(returned).__name__}")
            return returned.get("latents")

        with self.progress_bar(total=plan.num_clips * settings.num_inference_steps) as progress:
            clips = iter_hallo_clips(
                models,
                self.vae,
                self.scheduler,
                conditioning,
                mode=settings.mode,
                num_frames=f,
                num_motion_frames=settings.num_motion_frames,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=lambda: self._guidance_scale,
                motion_scale=tuple(settings.motion_scale),
                generator=settings.generator,
                motion_frame_mask_rate=settings.motion_frame_mask_rate,
                eta=settings.eta,
                on_clip_start=clip_start,
                on_step=step_end,
                interrupted=lambda: self._interrupt,
            )
            for clip_index, (latents, frames) in enumerate(clips):
                keep = min(f, plan.num_frames - clip_index * f)
                yield self._postprocess(
                    latents,
                    keep,
                    settings.output_type,
                    settings.watermark,
                    settings.decode_chunk_size,
                    settings.decoder,
                    frames=frames,
                )

    @torch.no_grad()
    def _generate(self, plan: _Plan, settings: GenerationSettings) -> Iterator:
        """The clip loop of `iter_clips` (settings already checked)."""
        device = self._execution_device
        dtype = self.unet.dtype  # the models' compute dtype; the scheduler's latents stay float32 (see below)
        f, n = settings.num_frames_per_clip, settings.num_motion_frames  # clip and motion-frame lengths
        callback, tensor_inputs = settings.callback_on_step_end, list(settings.callback_on_step_end_tensor_inputs)
        latent_size = plan.portrait.image.size[0] // self.vae_scale_factor
        self._interrupt = False
        self._guidance_scale = settings.guidance_scale

        # Once per video: reference latents -> ReferenceNet; face mask; audio feature stream.
        reference_latents = self.encode_image(plan.portrait.image, device, dtype)
        reference = self.reference_net(reference_latents)
        # Under model/group offloading the backbone's weights are only loaded inside its forward (parked on the CPU,
        # or as empty placeholders with disk offload), so the per-video and per-clip precomputation, which calls its
        # layers directly, is left to the forward. Otherwise the reference keys/values are projected once per video
        # (exact: tokens and weights are fixed during a video) and the clip's conditioning is encoded once per clip.
        precompute = not has_offload_hooks(self.unet)
        if precompute:
            reference = self.unet.prepare_reference(reference)
        face_mask = torch.from_numpy(plan.portrait.mask)[None, None].to(device=device, dtype=dtype)
        self.audio_encoder.eval()
        audio_windows = FeatureWindows(
            iter_audio_features(plan.audio, self.audio_encoder, self.feature_extractor, settings.fps, plan.num_frames),
            plan.num_frames,
            self.audio_window,
        )
        motion_latents = torch.zeros(1, n, 4, latent_size, latent_size, device=device)
        step_kwargs = self._scheduler_step_kwargs(settings.generator, settings.eta)

        def clip_reference(motion_latents: torch.Tensor) -> ReferenceFeatures:
            return ReferenceFeatures(
                spatial=reference.spatial,
                # Contiguous: the previous clip's latents arrive as a strided view, which a compiled ReferenceNet
                # would recompile for (dynamo guards on strides).
                temporal=self.reference_net(motion_latents.to(dtype).contiguous()).temporal,  # once per clip
                key_value=reference.key_value,
            )

        with self.progress_bar(total=plan.num_clips * settings.num_inference_steps) as progress:
            for clip_index in range(plan.num_clips):
                self.clip_index = clip_index
                self._guidance_scale = settings.guidance_scale  # a callback's change lasts for its clip only
                start = clip_index * f
                clip_audio = audio_windows.window(start, start + f)[None].to(device=device, dtype=dtype)
                guided_audio = torch.cat([torch.zeros_like(clip_audio), clip_audio])  # [no audio, audio]
                clip_speed = None
                if plan.speed is not None:
                    clip_speed = plan.speed[np.minimum(np.arange(start, start + f), plan.num_frames - 1)]
                    clip_speed = torch.from_numpy(clip_speed)[None].to(device=device, dtype=dtype)
                # Audio tokens, face-locator features and speed embeddings depend on the clip, not on the step:
                # encoded once per clip, both guidance branches' tokens at once ([no audio, audio]).
                if precompute:
                    encoded = self.unet.encode_conditioning(guided_audio, face_mask, clip_speed, dtype=dtype)
                    guided_inputs = {"audio_tokens": encoded.pop("audio_tokens")}
                else:
                    encoded = {"face_mask": face_mask, "speed": clip_speed}
                    guided_inputs = {"audio_features": guided_audio}
                audio_inputs = {key: value[value.shape[0] // 2 :] for key, value in guided_inputs.items()}
                conditioning = {"reference_features": clip_reference(motion_latents), **encoded}

                self.scheduler.set_timesteps(settings.num_inference_steps, device=device)
                self._num_timesteps = len(self.scheduler.timesteps)
                # Latents, guidance and the scheduler's update stay in float32 whatever the models' dtype: the
                # schedulers do their arithmetic in the latents' dtype, and bf16's 8-bit mantissa would round each
                # step's small update (and the clip chain's motion frames) away. Only the backbone's input is cast.
                # The noise is drawn in float32, so a seed gives the same noise in every dtype.
                latents = randn_tensor((1, 4, f, latent_size, latent_size), settings.generator, device, torch.float32)
                latents = latents * self.scheduler.init_noise_sigma
                for step, timestep in enumerate(self.scheduler.timesteps):
                    if self.interrupt:
                        break
                    # Read every step: a callback may change the guidance. Guidance batches both branches into one
                    # backbone call; the rest of the conditioning is shared and tiled.
                    guided = self.do_classifier_free_guidance
                    model_input = torch.cat([latents] * 2) if guided else latents
                    model_input = self.scheduler.scale_model_input(model_input, timestep).to(dtype)
                    audio = guided_inputs if guided else audio_inputs
                    noise = self.unet(model_input, timestep, **audio, **conditioning, return_dict=False)[0].float()
                    if guided:
                        unconditional, conditional = noise.chunk(2)
                        noise = unconditional + self.guidance_scale * (conditional - unconditional)
                    latents = self.scheduler.step(noise, timestep, latents, **step_kwargs, return_dict=False)[0]
                    if callback is not None:
                        local = {"latents": latents, "motion_latents": motion_latents}
                        returned = callback(self, step, timestep, {k: local[k] for k in tensor_inputs})
                        if not isinstance(returned, dict):
                            raise TypeError(
                                f"callback_on_step_end must return a dict of tensors, got {type(returned).__name__}"
                            )
                        latents = returned.pop("latents", latents)
                        if returned.get("motion_latents", motion_latents) is not motion_latents:
                            motion_latents = returned.pop("motion_latents")  # this clip's motion frames from now on
                            conditioning["reference_features"] = clip_reference(motion_latents)
                    progress.update()

                if n:  # the next clip's motion frames: this clip's last n latents, no VAE round trip
                    motion_latents = latents[:, :, f - n :].permute(0, 2, 1, 3, 4)
                keep = min(f, plan.num_frames - start)
                yield self._postprocess(
                    latents,
                    keep,
                    settings.output_type,
                    settings.watermark,
                    settings.decode_chunk_size,
                    settings.decoder,
                )
                if self.interrupt:  # as in diffusers: the interrupted clip is returned as it stands, then stop
                    return

    def _postprocess(self, latents, keep, output_type, watermark, decode_chunk_size, decoder="vae", frames=None):
        """A clip's latents (or its already decoded `frames`, `(f, 3, H, W)` in [0, 1]) in the `output_type` form."""
        if output_type == "latent":
            return latents
        if frames is None:
            frames = self.decode_latents(latents, decode_chunk_size, decoder)
        frames = frames[:keep]  # (keep, 3, H, W) in [0, 1]
        if watermark:
            from emo_pipeline.watermark import embed_watermark

            pixels = (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
            marked = torch.from_numpy(embed_watermark(pixels)).permute(0, 3, 1, 2).float() / 255
            frames = marked.to(frames.device)  # "pt" frames stay on the VAE's device either way
        if output_type == "pt":
            return frames
        array = frames.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        if output_type == "pil":
            return [PIL.Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in array]
        return array

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

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model, WhisperFeatureExtractor

from emo_pipeline.devices import has_offload_hooks
from emo_pipeline.echomimic_inputs import WhisperAudioEncoder
from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.attention import install_emo_processors
from emo_pipeline.models.backbone import EMOUNet3DConditionModel
from emo_pipeline.models.identity import IdentityProjection
from emo_pipeline.models.reference_net import ReferenceNet
from emo_pipeline.models.step_cache import check_step_cache_interval, with_step_cache
from emo_pipeline.sampling import sample_clips, sample_windows
from emo_pipeline.settings import GenerationSettings, check_generation_numbers, takes_generation_settings

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


class EMOPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Audio-driven portrait video generation with EMO.

    Components: `vae` (frozen SD VAE), `reference_net` (`ReferenceNet`), `unet` (`EMOUNet3DConditionModel`),
    `audio_encoder` (`Wav2Vec2Model`; EchoMimic weights: whisper-tiny's encoder, `WhisperAudioEncoder`),
    `feature_extractor` (`Wav2Vec2FeatureExtractor`; EchoMimic: `WhisperFeatureExtractor`), `scheduler` (any diffusers
    scheduler with `set_timesteps`/`step`; DDIM by default), and `identity_proj` (`IdentityProjection`, optional:
    only pipelines converted from Hallo / Hallo2 weights have one, see
    `emo_pipeline.hallo_conversion.build_hallo_pipeline`; `pipe.is_hallo` tells).

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
    _current_timestep: torch.Tensor | None = None
    clip_index: int | None = None
    # TAESD for `decoder="tiny"` previews: not a registered component (not saved with the pipeline, not moved by
    # `pipe.to`); it follows the VAE's dtype and the latents' device when used.
    tiny_decoder: AutoencoderTiny | None = None

    def __init__(
        self,
        vae: AutoencoderKL,
        reference_net: ReferenceNet,
        unet: EMOUNet3DConditionModel,
        # The families' audio encoders (EMO and Hallo: wav2vec2; EchoMimic: whisper-tiny's encoder): diffusers checks
        # a loaded component against these hints and warns about any other type.
        audio_encoder: Wav2Vec2Model | WhisperAudioEncoder,
        feature_extractor: Wav2Vec2FeatureExtractor | WhisperFeatureExtractor,
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
        from emo_pipeline.quantization import check_quantization_config

        check_quantization_config(kwargs.get("quantization_config"))  # bitsandbytes without a GPU: refused up front
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
            for model in (self.unet, self.reference_net):
                install_emo_processors(model)

    COMPILABLE = ("unet", "reference_net", "vae")

    def compile(
        self,
        mode: str | None = None,
        dynamic: bool = False,
        components: tuple[str, ...] | list[str] = COMPILABLE,
        regional: bool = True,
        **compile_kwargs,
    ) -> None:
        """`torch.compile` the backbone, the ReferenceNet and the VAE's decoder in place (`fullgraph=True`).

        `regional=True` (default): diffusers' regional compilation of the two UNets (`compile_repeated_blocks`), a
        shorter cold start, the backbone still hookable (`step_cache`); `regional=False` compiles them whole. The VAE
        decoder is compiled whole. `components`: which of "unet", "reference_net", "vae"; `dynamic`, `mode` and other
        arguments go to `torch.compile`. README, "Speed switches"; benchmarks/results/compile_quant_sd15_128.json.
        """
        unknown = set(components) - set(self.COMPILABLE)
        if unknown:
            raise EMOInputError(f"compile: unknown components {sorted(unknown)}; choose from {self.COMPILABLE}")
        for name in components:
            model = self.vae.decoder if name == "vae" else getattr(self, name)
            if regional and name != "vae":
                model.compile_repeated_blocks(fullgraph=True, dynamic=dynamic, mode=mode, **compile_kwargs)
            else:
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
    def current_timestep(self) -> torch.Tensor | None:
        """The timestep being denoised (None outside a call), as diffusers' pipelines expose it: diffusers' cache
        hooks read it, e.g. `PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: pipe.current_timestep)`.
        """
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. from a callback) to stop generating after the current step."""
        return self._interrupt

    @property
    def family(self):
        """The weight family serving this pipeline (`emo_pipeline.families`): its front end, schedule and settings
        (`help(pipe.family.settings)`); native EMO unless the weights are another family's."""
        from emo_pipeline.families import family_of

        return family_of(self)

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
        check_generation_numbers(
            fps,
            num_frames_per_clip,
            num_motion_frames,
            num_inference_steps,
            guidance_scale,
            output_type,
            decode_chunk_size,
        )
        limit = self.unet.config.motion_max_seq_length
        if num_motion_frames + num_frames_per_clip > limit:
            raise EMOInputError(
                f"num_motion_frames ({num_motion_frames}) + num_frames_per_clip ({num_frames_per_clip}) = "
                f"{num_motion_frames + num_frames_per_clip} exceeds the temporal layers' positional table "
                f"(motion_max_seq_length = {limit})"
            )
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

    # ----------------------------------------------------------------------------------------------- generate

    @takes_generation_settings
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

    @takes_generation_settings
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

    @takes_generation_settings
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
        """Check the settings, run the family's front end (`self.last_plan`) and return the clip loop."""
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
        family = self.family
        family.check_settings(settings)
        check_step_cache_interval(settings.step_cache)
        if settings.decoder == "tiny" and settings.output_type != "latent" and self.tiny_decoder is None:
            self.load_tiny_decoder()  # now, so a missing decoder is reported before any generation
        # Under model/group offloading the backbone's weights are only loaded inside its forward (parked on the CPU,
        # or as empty placeholders with disk offload): the family then leaves the per-video and per-clip work that
        # calls its layers directly (reference keys/values, audio tokens) to the forward.
        precompute = not has_offload_hooks(self.unet)
        self.last_plan, run = family.prepare(image, audio, settings, precompute)
        clips = self._generate(run, settings)
        return self._free_model_hooks_after(with_step_cache(self.unet, settings.step_cache, clips))

    def _free_model_hooks_after(self, clips: Iterator) -> Iterator:
        """Yield from the clip loop, then `maybe_free_model_hooks()` as diffusers' pipelines end their `__call__`.

        Under `enable_model_cpu_offload` that parks every model on the CPU again and resets the offload hooks. It
        also runs when the consumer stops early (`close()`, or the iterator dropped) and when generation fails.
        """
        try:
            yield from clips
        finally:
            self._current_timestep = None
            self.maybe_free_model_hooks()

    @torch.no_grad()
    def _generate(self, run: Any, settings: GenerationSettings) -> Iterator:
        """The sampling loop (`emo_pipeline.sampling`) of the family's schedule, each clip in `output_type` form."""
        plan, f = self.last_plan, settings.num_frames_per_clip
        options = (settings.output_type, settings.watermark, settings.decode_chunk_size, settings.decoder)
        if self.family.schedule == "windows":
            latents = sample_windows(self, run, settings)
            for start in range(0, plan.num_frames, f):  # decoded and streamed clip by clip
                yield self._postprocess(latents[:, :, start : start + f], min(f, plan.num_frames - start), *options)
            return
        for index, latents, frames in sample_clips(self, run, settings):
            yield self._postprocess(latents, min(f, plan.num_frames - index * f), *options, frames=frames)

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

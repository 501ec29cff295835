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

import inspect
import json
import math
import numbers
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
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from emo_pipeline.audio import iter_audio_features, load_audio, num_video_frames
from emo_pipeline.errors import EMOInputError
from emo_pipeline.face import PreparedPortrait, prepare_portrait
from emo_pipeline.models.attention import ReferenceFeatures
from emo_pipeline.models.backbone import EMOUNet3DConditionModel
from emo_pipeline.models.reference_net import ReferenceNet

__all__ = ["SCHEDULERS", "EMOPipeline", "EMOPipelineOutput"]

SAMPLE_RATE = 16000  # wav2vec2's rate

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
        `(N, 3, H, W)` tensor ("pt"), or `(1, 4, N, h, w)` latents ("latent").
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
class _Plan:
    """Everything fixed for one video."""

    portrait: PreparedPortrait
    audio: np.ndarray
    num_frames: int
    num_clips: int
    speed: np.ndarray | None  # (num_frames,) rad/s


class _AudioWindows:
    """Windowed audio features for consecutive frame ranges, pulled lazily from a chunk iterator.

    Equals `window_audio_features(torch.cat(chunks), m)[start:stop]` with edge padding at the ends of the whole
    track, while holding only the frames a window still needs.
    """

    def __init__(self, chunks: Iterator[torch.Tensor], num_frames: int, m: int):
        self.chunks, self.num_frames, self.m = chunks, num_frames, m
        self.buffer: torch.Tensor | None = None
        self.offset = 0  # global index of buffer[0]

    def window(self, start: int, stop: int) -> torch.Tensor:
        """`(stop - start, 2m+1, L, D)` for frames start..stop-1 (frames past the end repeat the last one)."""
        need = min(stop + self.m, self.num_frames)
        while self.buffer is None or self.offset + self.buffer.shape[0] < need:
            chunk = next(self.chunks)
            self.buffer = chunk if self.buffer is None else torch.cat([self.buffer, chunk])
        last = self.num_frames - 1
        centres = torch.arange(start, stop).clamp(max=last)
        index = (centres[:, None] + torch.arange(-self.m, self.m + 1)).clamp(0, last) - self.offset
        windows = self.buffer[index.to(self.buffer.device)]
        drop = max(0, min(stop, last) - self.m - self.offset)  # frames no later window can reach
        self.buffer, self.offset = self.buffer[drop:], self.offset + drop
        return windows


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _read_metadata(path_or_id: str | os.PathLike, kwargs: dict) -> dict:
    from emo_pipeline.hub import EMO_METADATA_FILE, read_metadata

    if Path(path_or_id).is_dir():
        return read_metadata(path_or_id)
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(
            str(path_or_id),
            EMO_METADATA_FILE,
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
        )
        return json.loads(Path(file).read_text())
    except Exception:  # noqa: BLE001 - metadata is optional; the weights loaded
        return {}


class EMOPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Audio-driven portrait video generation with EMO.

    Components: `vae` (frozen SD VAE), `reference_net` (`ReferenceNet`), `unet` (`EMOUNet3DConditionModel`),
    `audio_encoder` (`Wav2Vec2Model`), `feature_extractor` (`Wav2Vec2FeatureExtractor`), `scheduler` (any diffusers
    scheduler with `set_timesteps`/`step`; DDIM by default).

    LoRA (diffusers' loader, backbone only): `pipe.load_lora_weights(path_or_repo)`, `pipe.unload_lora_weights()`,
    `pipe.fuse_lora()`, `EMOPipeline.save_lora_weights(folder, unet_lora_layers=...)`.
    """

    _lora_loadable_modules = ["unet"]
    model_cpu_offload_seq = "audio_encoder->reference_net->unet->vae"
    _callback_tensor_inputs = ["latents", "motion_latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        reference_net: ReferenceNet,
        unet: EMOUNet3DConditionModel,
        audio_encoder: Wav2Vec2Model,
        feature_extractor: Wav2Vec2FeatureExtractor,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            reference_net=reference_net,
            unet=unet,
            audio_encoder=audio_encoder,
            feature_extractor=feature_extractor,
            scheduler=scheduler,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.emo_metadata: dict = {}  # provenance and training history: emo_metadata.json and the model card
        self.reference_net_calls = 0  # ReferenceNet forwards of the last video (1 + number of clips)

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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> EMOPipeline:
        """diffusers' loader (folder or hub id), plus the `emo_metadata.json` provenance when present."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.emo_metadata = _read_metadata(pretrained_model_name_or_path, kwargs)
        return pipe

    def set_scheduler(self, name: str, **config_overrides) -> None:
        """Swap the scheduler for one of `SCHEDULERS` built from the current scheduler's config (same noise
        schedule), e.g. `pipe.set_scheduler("dpm++")`. Any other diffusers scheduler can be assigned directly."""
        if name not in SCHEDULERS:
            raise EMOInputError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
        self.scheduler = SCHEDULERS[name].from_config(self.scheduler.config, **config_overrides)

    # ------------------------------------------------------------------------------------------------- inputs

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
        """RGB image -> `(1, 4, h, w)` scaled VAE latents (the distribution's mode: deterministic)."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        latents = self.vae.encode(pixels.to(device=device, dtype=self.vae.dtype)).latent_dist.mode()
        return (latents * self.vae.config.scaling_factor).to(dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int = 8) -> torch.Tensor:
        """`(B, 4, F, h, w)` latents -> `(B*F, 3, H, W)` in [0, 1], `decode_chunk_size` frames per VAE call."""
        frames = latents.permute(0, 2, 1, 3, 4).flatten(0, 1) / self.vae.config.scaling_factor
        decoded = [
            self.vae.decode(chunk.to(self.vae.dtype)).sample.float() for chunk in frames.split(decode_chunk_size)
        ]
        return (torch.cat(decoded) / 2 + 0.5).clamp(0, 1)

    def _reference_features(self, latents: torch.Tensor) -> ReferenceFeatures:
        self.reference_net_calls += 1
        return self.reference_net(latents)

    def _scheduler_step_kwargs(self, generator, eta: float) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    # ----------------------------------------------------------------------------------------------- generate

    def iter_clips(
        self,
        image: Any,
        audio: Any,
        height: int = 512,
        width: int = 512,
        fps: float = 25,
        num_frames_per_clip: int = 12,
        num_motion_frames: int = 4,
        num_inference_steps: int = 40,
        guidance_scale: float = 3.5,
        speed: float | np.ndarray | torch.Tensor | None = None,
        face_mask: Any = None,
        face_box: Any = None,
        face_index: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        watermark: bool = True,
        eta: float = 0.0,
        decode_chunk_size: int = 8,
        audio_sample_rate: int | None = None,
        max_audio_seconds: float | None = 3600.0,
        callback_on_step_end: Callable[[EMOPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> Iterator[np.ndarray | list[PIL.Image.Image] | torch.Tensor]:
        """Generate the video clip by clip: an iterator over each clip's frames, yielded as soon as decoded.

        Inputs are loaded and checked when this is called (bad input raises `EMOInputError` here, not at the
        first `next`); generation runs as the iterator is consumed. `self.last_plan` holds the loaded audio,
        the prepared portrait and the frame count.

        Args:
            image: the portrait: a path, PIL image or `(H, W, 3)` array. It is cropped square around its face.
            audio: speech or singing: a path or file of any format PyAV reads, bytes, or a float array at
                `audio_sample_rate` (default 16 kHz). The video has `ceil(duration * fps)` frames.
            height, width: output size in pixels (equal; a multiple of the VAE factor, 8 for SD).
            fps: output frame rate.
            num_frames_per_clip: frames per clip `f` (the paper: 12). The last clip is trimmed to the audio.
            num_motion_frames: previous-clip frames `n` the temporal layers see (the paper: 4).
            num_inference_steps: denoising steps per clip (the paper: DDIM 40).
            guidance_scale: classifier-free guidance on the audio; <= 1 runs the conditional branch only.
            speed: head rotation speed in rad/s, one float or one value per frame; None = no speed conditioning.
            face_mask / face_box / face_index: skip or steer face detection (see `prepare_portrait`).
            generator: makes the noise reproducible (bit-identical on CPU).
            output_type: "np" -> `(f, H, W, 3)` float32 in [0, 1]; "pil"; "pt" -> `(f, 3, H, W)`; "latent" ->
                `(1, 4, f, h, w)` (the last clip untrimmed).
            watermark: embed the invisible provenance watermark in every frame (see `emo_pipeline.watermark`).
            eta: DDIM eta (ignored by schedulers without it).
            decode_chunk_size: frames the VAE decodes at once (memory vs speed).
            audio_sample_rate: rate of an `audio` array (default 16 kHz); files carry their own.
            max_audio_seconds: longer audio is refused (None: no limit).
            callback_on_step_end: `fn(pipe, step, timestep, tensors) -> dict` after each denoising step, with the
                tensors named in `callback_on_step_end_tensor_inputs` (default `["latents"]`); `pipe.clip_index`
                tells the clip. Returned tensors replace the pipeline's.
        """
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(
            height,
            width,
            fps,
            num_frames_per_clip,
            num_motion_frames,
            num_inference_steps,
            guidance_scale,
            output_type,
            decode_chunk_size,
            tensor_inputs,
        )
        samples = load_audio(audio, SAMPLE_RATE, max_duration=max_audio_seconds, src_sample_rate=audio_sample_rate)
        num_frames = num_video_frames(len(samples), SAMPLE_RATE, fps)
        portrait = prepare_portrait(image, size=height, face_index=face_index, face_box=face_box, face_mask=face_mask)
        self.last_plan = plan = _Plan(
            portrait=portrait,
            audio=samples,
            num_frames=num_frames,
            num_clips=math.ceil(num_frames / num_frames_per_clip),
            speed=self._speed_per_frame(speed, num_frames),
        )
        return self._generate(
            plan,
            fps=fps,
            f=num_frames_per_clip,
            n=num_motion_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type=output_type,
            watermark=watermark,
            eta=eta,
            decode_chunk_size=decode_chunk_size,
            callback_on_step_end=callback_on_step_end,
            tensor_inputs=tensor_inputs,
        )

    @torch.no_grad()
    def _generate(self, plan: _Plan, *, fps, f, n, num_inference_steps, guidance_scale, generator, output_type,
                  watermark, eta, decode_chunk_size, callback_on_step_end, tensor_inputs):  # fmt: skip
        """The clip loop of `iter_clips` (arguments already checked; `f`, `n`: clip and motion-frame lengths)."""
        device = self._execution_device
        dtype = self.unet.dtype
        do_guidance = guidance_scale > 1.0
        latent_size = plan.portrait.image.size[0] // self.vae_scale_factor
        self.reference_net_calls = 0

        # Once per video: reference latents -> ReferenceNet; face mask; audio feature stream.
        reference_latents = self.encode_image(plan.portrait.image, device, dtype)
        reference = self._reference_features(reference_latents)
        face_mask = torch.from_numpy(plan.portrait.mask)[None, None].to(device=device, dtype=dtype)
        self.audio_encoder.eval()
        audio_windows = _AudioWindows(
            iter_audio_features(plan.audio, self.audio_encoder, self.feature_extractor, fps, plan.num_frames),
            plan.num_frames,
            self.audio_window,
        )
        motion_latents = torch.zeros(1, n, 4, latent_size, latent_size, device=device, dtype=dtype)
        step_kwargs = self._scheduler_step_kwargs(generator, eta)

        with self.progress_bar(total=plan.num_clips * num_inference_steps) as progress:
            for clip_index in range(plan.num_clips):
                self.clip_index = clip_index
                start = clip_index * f
                audio_features = audio_windows.window(start, start + f)[None].to(device=device, dtype=dtype)
                conditioning = {
                    "reference_features": ReferenceFeatures(
                        spatial=reference.spatial,
                        temporal=self._reference_features(motion_latents).temporal,  # once per clip
                        _kv_cache=reference._kv_cache,  # reference K/V stay valid for the whole video
                    ),
                    "face_mask": face_mask,
                }
                if plan.speed is not None:
                    clip_speed = plan.speed[np.minimum(np.arange(start, start + f), plan.num_frames - 1)]
                    conditioning["speed"] = torch.from_numpy(clip_speed)[None].to(device=device, dtype=dtype)
                if do_guidance:  # one backbone call: [no audio, audio]; the rest is shared and tiled
                    audio_features = torch.cat([torch.zeros_like(audio_features), audio_features])

                self.scheduler.set_timesteps(num_inference_steps, device=device)
                latents = randn_tensor((1, 4, f, latent_size, latent_size), generator, device, dtype)
                latents = latents * self.scheduler.init_noise_sigma
                for step, timestep in enumerate(self.scheduler.timesteps):
                    model_input = torch.cat([latents] * 2) if do_guidance else latents
                    model_input = self.scheduler.scale_model_input(model_input, timestep)
                    noise = self.unet(model_input, timestep, audio_features, **conditioning, return_dict=False)[0]
                    if do_guidance:
                        unconditional, conditional = noise.chunk(2)
                        noise = unconditional + guidance_scale * (conditional - unconditional)
                    latents = self.scheduler.step(noise, timestep, latents, **step_kwargs, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        local = {"latents": latents, "motion_latents": motion_latents}
                        returned = callback_on_step_end(self, step, timestep, {k: local[k] for k in tensor_inputs})
                        latents = returned.pop("latents", latents)
                        motion_latents = returned.pop("motion_latents", motion_latents)
                    progress.update()

                if n:  # the next clip's motion frames: this clip's last n latents, no VAE round trip
                    motion_latents = latents[:, :, f - n :].permute(0, 2, 1, 3, 4)
                keep = min(f, plan.num_frames - start)
                yield self._postprocess(latents, keep, output_type, watermark, decode_chunk_size)

    def _postprocess(self, latents, keep, output_type, watermark, decode_chunk_size):
        if output_type == "latent":
            return latents
        frames = self.decode_latents(latents, decode_chunk_size)[:keep]  # (keep, 3, H, W) in [0, 1]
        if watermark:
            from emo_pipeline.watermark import embed_watermark

            pixels = (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
            frames = torch.from_numpy(embed_watermark(pixels)).permute(0, 3, 1, 2).float() / 255
        if output_type == "pt":
            return frames
        array = frames.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        if output_type == "pil":
            return [PIL.Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in array]
        return array

    def __call__(self, image: Any, audio: Any, *, return_dict: bool = True, **kwargs) -> EMOPipelineOutput | tuple:
        """Generate the whole video in memory. Same arguments as `iter_clips` (use that, or `write_video`, to stream
        long audio with flat memory). Returns `EMOPipelineOutput`, or `(frames,)` with `return_dict=False`."""
        output_type = kwargs.get("output_type", "np")
        clips = list(self.iter_clips(image, audio, **kwargs))
        if output_type == "pil":
            frames = [frame for clip in clips for frame in clip]
        elif output_type == "latent":
            frames = torch.cat(clips, dim=2)
        elif output_type == "pt":
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
            fps=float(kwargs.get("fps", 25)),
            face_mask=plan.portrait.mask,
        )

    def write_video(self, output_path: str | os.PathLike, image: Any, audio: Any, crf: int = 18, **kwargs) -> Path:
        """Generate and stream the video into an mp4 (H.264 + AAC, the audio muxed), clip by clip.

        Memory stays flat in the audio length. The file appears at `output_path` only once complete; an error or
        Ctrl-C leaves nothing there. The mp4 carries a tag saying it is AI-generated. Arguments as `iter_clips`.
        """
        from emo_pipeline.media import VideoWriter
        from emo_pipeline.watermark import AI_GENERATED_METADATA

        if kwargs.get("output_type", "np") not in ("np", "pt", "pil"):
            raise EMOInputError("write_video needs decoded frames: output_type must be 'np', 'pt' or 'pil'")
        clips = self.iter_clips(image, audio, **kwargs)
        fps = kwargs.get("fps", 25)
        with VideoWriter(
            output_path,
            fps=fps,
            audio=self.last_plan.audio,
            sample_rate=SAMPLE_RATE,
            crf=crf,
            metadata=AI_GENERATED_METADATA,
        ) as writer:
            for clip in clips:
                if isinstance(clip, list):
                    clip = np.stack([np.asarray(frame) for frame in clip])
                elif torch.is_tensor(clip):
                    clip = clip.permute(0, 2, 3, 1).numpy()
                writer.write(clip)
        return Path(output_path)

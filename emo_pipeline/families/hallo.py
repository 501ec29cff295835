"""Hallo / Hallo2 weights (fudan-generative-vision/hallo, hallo2) through the one sampling loop.

Conversion: `emo-convert --hallo pretrained_models [--net hallo2/net.pth]`
(`emo_pipeline.hallo_conversion.load_hallo_pipeline`; the networks are EMO's classes with Hallo's options,
docs/hallo_architecture.md). Front end (`emo_pipeline.hallo_inputs`): face landmarks -> face region and (full, face,
lip) masks, the insightface identity embedding (or `face_embedding`), wav2vec2 features interpolated before its
transformer (per Hallo2 segment with `audio_segment_seconds`), optionally the vocals only (`vocal_separation`).
Schedule: autoregressive clips (16 frames, 2 motion frames by default). Reference: the portrait and the motion frames
through the ReferenceNet with the identity tokens as its attn2 context. Unconditional branch: zero audio tokens and
face features, no reference tokens, the projection of a zero identity embedding (Hallo's recipe). Modes
(`HalloSettings.mode`):

* "fast" (default): the same networks with nothing computed twice: the portrait through the ReferenceNet once per
  video (its keys/values projected once), only the motion frames per clip, taken from the previous clip's latents
  (no decode/encode round trip), no bank rounding, float32 latents; any scheduler of `SCHEDULERS`.
* "parity": Hallo's `scripts/inference.py` + `FaceAnimatePipeline` exactly: `[source, motion frames]` through its
  image processor (which rescales a batch with no pixel below mid-grey a second time, as diffusers'
  `VaeImageProcessor` does with `do_normalize`), the VAE and the ReferenceNet every clip, the reference bank rounded
  to float16, motion frames decoded and re-encoded, frames decoded one by one, Hallo's DDIM with its seeded generator
  (other samplers are refused), Hallo2's motion-frame pixel mask (`motion_frame_mask_rate`).

At `guidance_scale <= 1` only the conditional branch runs: its reference is then written with the identity tokens as
the attn2 context of every image, one copy for every frame (Hallo's single-copy bank as its code reads at
`do_classifier_free_guidance=False`; not checked by running Hallo there), not the guidance batch's alternating copies.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler

from emo_pipeline.errors import EMOInputError
from emo_pipeline.families.base import BranchInputs, Clip, Family, Plan
from emo_pipeline.hallo import HALLO_MODES, HALLO_VAE_SCALE, HalloConditioning, HalloModels
from emo_pipeline.models.attention import ReferenceFeatures

__all__ = ["HalloFamily", "HalloSettings", "motion_frame_keep_mask", "hallo_image_preprocess"]

SAMPLE_RATE = 16000  # wav2vec2's rate


@dataclass
class HalloSettings:
    """Settings of Hallo / Hallo2 weights (`pipe(..., mode="parity")`); other families refuse them.

    Args:
        mode: "fast" (default): the networks run on what changed only, any scheduler; "parity": Hallo's own loop
            exactly (motion frames decoded and re-encoded, reference bank rounded to float16, frames decoded one by
            one, Hallo's DDIM only), for comparison with Hallo's outputs. See `emo_pipeline.families.hallo`.
        face_embedding: the `(512,)` or `(1, 512)` insightface identity embedding of the portrait; skips insightface.
        face_analysis_dir: folder of Hallo's insightface models (`pretrained_models/face_analysis`, with
            `models/scrfd_10g_bnkps.onnx` and `models/glintr100.onnx`) to compute the embedding; needed unless
            `face_embedding` or `hallo_conditioning` is given. Nothing of it is stored in a converted folder.
        motion_scale: weights of the audio attention on the (full, face, lip) regions (Hallo: 1, 1, 1).
        motion_frame_mask_rate: Hallo2, parity mode: before each clip, motion-frame pixels outside the face are
            dropped with this probability (Hallo2's long-video setting: 0.25); None: no masking.
        vocal_separation: an audio-separator model file (Hallo: `pretrained_models/audio_separator/Kim_Vocal_2.onnx`,
            beside its `*.json` model lists) to keep only the vocals before wav2vec2, separated at the track's own
            sample rate then resampled to 16 kHz, as Hallo does; None (default): the track as given.
        audio_segment_seconds: Hallo2's long-audio option: wav2vec2 run on segments of this many seconds (Hallo2:
            60) instead of the whole track at once (Hallo); each segment is normalised and encoded on its own.
        hallo_conditioning: precomputed inputs (`emo_pipeline.hallo.HalloConditioning`: portrait pixels, identity
            embedding, face region and masks, per-frame audio features) in place of the front end; `image` and
            `audio` may then be None (the video is silent).
    """

    mode: str = "fast"
    face_embedding: np.ndarray | torch.Tensor | None = None
    face_analysis_dir: str | os.PathLike | None = None
    motion_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    motion_frame_mask_rate: float | None = None
    vocal_separation: str | os.PathLike | None = None
    audio_segment_seconds: float | None = None
    hallo_conditioning: HalloConditioning | None = None


class HalloFamily(Family):
    name = "hallo"
    label = "Hallo / Hallo2"
    variants = ("hallo", "hallo2")
    convert_option = "--hallo"
    settings = HalloSettings
    refused_settings = ("speed", "face_mask", "step_cache")
    refused_reason = (
        "no speed condition; the face region comes from face landmarks, pass hallo_conditioning= to set it; no step "
        "cache for its audio modules yet"
    )

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return getattr(pipe.unet.config, "audio_attention", None) == "audio_modules"

    def check_settings(self, settings: Any) -> None:
        if any(getattr(settings, name) is not None for name in self.refused_settings):
            used = [name for name in self.refused_settings if getattr(settings, name) is not None]
            raise EMOInputError(f"{used} are not available with Hallo weights ({self.refused_reason})")
        own: HalloSettings = settings.family_settings
        if own.mode not in HALLO_MODES:
            raise EMOInputError(f"mode must be one of {HALLO_MODES}, got {own.mode!r}")
        if float(settings.fps) != int(settings.fps):
            raise EMOInputError(
                f"fps must be a whole number with Hallo weights (Hallo's audio frames are sample_rate // fps samples; "
                f"it was trained at 25), got {settings.fps!r}"
            )
        scheduler = self.pipe.scheduler
        if own.mode == "parity":
            if settings.decoder != "vae":
                raise EMOInputError(
                    "mode='parity' decodes with the VAE frame by frame as Hallo does: use decoder='vae'"
                )
            if type(scheduler) is not DDIMScheduler:
                raise EMOInputError(
                    f"mode='parity' is Hallo's own DDIM loop: the scheduler {type(scheduler).__name__} cannot be used "
                    "in it; use mode='fast' (every sampler) or pipe.set_scheduler('ddim')"
                )
        rate = own.motion_frame_mask_rate
        if rate is not None and not (isinstance(rate, numbers.Real) and 0 <= rate < 1):
            raise EMOInputError(f"motion_frame_mask_rate must be in [0, 1) (Hallo2: 0.25), got {rate!r}")
        if own.mode == "fast" and rate is not None:
            raise EMOInputError(
                "motion_frame_mask_rate masks decoded motion-frame pixels (Hallo2): use it with mode='parity'; the "
                "fast mode keeps motion frames as latents"
            )
        scale = own.motion_scale
        if (
            not isinstance(scale, (tuple, list))
            or len(scale) != 3
            or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in scale)
        ):
            raise EMOInputError(f"motion_scale must be three finite numbers (full, face, lip), got {scale!r}")
        if own.hallo_conditioning is None and own.face_embedding is None:
            if own.face_analysis_dir is None:
                raise EMOInputError(
                    "Hallo weights need the portrait's face embedding: pass face_analysis_dir= (Hallo's "
                    "pretrained_models/face_analysis, insightface models) or face_embedding= (512 numbers)"
                )
            from emo_pipeline.hallo_inputs import _face_analysis_models_dir

            _face_analysis_models_dir(own.face_analysis_dir)  # missing folder or model: EMOInputError naming it
        if own.vocal_separation is not None and not Path(own.vocal_separation).expanduser().is_file():
            raise EMOInputError(
                f"vocal_separation model {os.fspath(own.vocal_separation)!r} does not exist (an audio-separator model "
                "file such as Hallo's pretrained_models/audio_separator/Kim_Vocal_2.onnx); pass None to skip"
            )

    # ------------------------------------------------------------------------------------------------ front end

    def prepare(self, image: Any, audio: Any, settings: Any, precompute: bool) -> tuple[Plan, _HalloRun]:
        from emo_pipeline.audio import load_audio
        from emo_pipeline.face import prepare_portrait

        own: HalloSettings = settings.family_settings
        size = settings.height
        conditioning = own.hallo_conditioning
        if conditioning is None:
            if image is None or audio is None:
                raise EMOInputError("pass a portrait image and an audio track (or hallo_conditioning=)")
            samples = self._load_track(audio, settings, own)
            portrait = prepare_portrait(image, size=size, face_index=settings.face_index, face_box=settings.face_box)
            conditioning = self._conditioning(portrait, samples, settings, own)
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
        plan = Plan(
            portrait=portrait,
            audio=samples,
            num_frames=conditioning.num_frames,
            num_clips=math.ceil(conditioning.num_frames / settings.num_frames_per_clip),
        )
        return plan, _HalloRun(self.pipe, conditioning, settings, own, precompute)

    def _load_track(self, audio: Any, settings: Any, own: HalloSettings) -> np.ndarray:
        """The track at 16 kHz; with `vocal_separation`, its vocals separated at the track's own rate first."""
        from emo_pipeline.audio import load_audio

        limit = settings.max_audio_seconds
        if own.vocal_separation is None:
            return load_audio(audio, SAMPLE_RATE, max_duration=limit, src_sample_rate=settings.audio_sample_rate)
        from emo_pipeline.hallo_inputs import separate_vocals

        rate = _native_rate(audio, settings.audio_sample_rate)
        native = load_audio(audio, rate, max_duration=limit, src_sample_rate=settings.audio_sample_rate)
        model = Path(own.vocal_separation).expanduser()
        return separate_vocals(native, rate, model.parent, model.name, output_sample_rate=SAMPLE_RATE)

    def _conditioning(self, portrait: Any, samples: np.ndarray, settings: Any, own: HalloSettings):
        """Hallo's front end on the cropped portrait and the track: landmarks -> face region and masks, insightface
        identity embedding (or `face_embedding`), wav2vec2 features interpolated before the transformer."""
        from emo_pipeline import hallo_inputs

        pipe, size = self.pipe, settings.height
        embedding = own.face_embedding
        if embedding is not None:
            embedding = torch.as_tensor(np.asarray(embedding, dtype=np.float32)).reshape(1, -1)
            expected = pipe.identity_proj.config.embed_dim
            if embedding.shape[1] != expected or not torch.isfinite(embedding).all():
                raise EMOInputError(
                    f"face_embedding must hold {expected} finite numbers (an insightface embedding), got shape "
                    f"{tuple(np.shape(own.face_embedding))}"
                )
        else:
            embedding = hallo_inputs.hallo_face_embedding(portrait.image, own.face_analysis_dir)
        masks = hallo_inputs.hallo_face_masks((size, size), hallo_inputs.hallo_face_landmarks(portrait.image), size)
        if pipe.audio_encoder is None or pipe.feature_extractor is None:
            raise EMOInputError("this pipeline has no audio_encoder/feature_extractor: pass hallo_conditioning=")
        pipe.audio_encoder.eval()
        # Chunks (Hallo2: one per segment) computed as the clip loop reaches them: long audio is never held whole.
        chunks, total, audio_length = hallo_inputs.iter_hallo_audio_features(
            samples,
            pipe.audio_encoder,
            pipe.feature_extractor,
            fps=int(settings.fps),
            clip_length=settings.num_frames_per_clip,
            segment_seconds=own.audio_segment_seconds,
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


def _native_rate(audio: Any, array_rate: int | None) -> int:
    """The sample rate `audio` comes at: an array's `audio_sample_rate` (default 16 kHz), a file's own."""
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        return int(array_rate or SAMPLE_RATE)
    import io

    import av

    source = io.BytesIO(audio) if isinstance(audio, (bytes, bytearray)) else audio
    try:
        with av.open(os.fspath(source) if isinstance(source, (str, os.PathLike)) else source) as container:
            if not container.streams.audio:
                raise EMOInputError(f"audio {audio!s:.200}: no audio stream")
            return int(container.streams.audio[0].rate)
    except (OSError, av.error.FFmpegError) as error:
        raise EMOInputError(f"audio {audio!s:.200}: cannot be read ({error})") from error
    finally:
        if hasattr(source, "seek"):
            source.seek(0)


def _portrait_of(conditioning: HalloConditioning):
    """The `PreparedPortrait` a `HalloConditioning` stands for (its pixels and face region)."""
    from emo_pipeline.face import PreparedPortrait

    pixels = ((conditioning.source_image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    mask = (conditioning.face_region[0, 0] > 0).float().cpu().numpy()
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0], dtype=np.float32)
    return PreparedPortrait(image=PIL.Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()), face_box=box, mask=mask)


def hallo_image_preprocess(pixels: torch.Tensor) -> torch.Tensor:
    """Hallo's `ref_image_processor.preprocess` on `[source, motion frames]` `(k, 3, H, W)` in [-1, 1]: diffusers'
    `VaeImageProcessor(do_normalize=True)` maps a tensor batch to `2x - 1` unless some value is below 0 (it then
    warns that [-1, 1] input is deprecated and leaves it), so a batch with no pixel below mid-grey is rescaled
    twice."""
    return pixels * 2.0 - 1.0 if pixels.min() >= 0 else pixels


def motion_frame_keep_mask(generator: Any, height: int, width: int, rate: float) -> torch.Tensor:
    """Hallo2's (`inference_long.py`) motion-frame pixel mask before a clip: `rand(H, W) > rate`, drawn from the
    seeded generator (on its device), True where the pixel is kept (the face box is kept as well, by the caller)."""
    generator = generator[0] if isinstance(generator, list) else generator
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(height, width, generator=generator, device=device) > rate


class _HalloRun:
    """Hallo's autoregressive schedule in either mode (`emo_pipeline.families.base.AutoregressiveRun`)."""

    def __init__(self, pipe: Any, conditioning: HalloConditioning, settings: Any, own: HalloSettings, precompute):
        self.pipe, self.conditioning, self.precompute = pipe, conditioning, precompute
        self.parity = own.mode == "parity"
        self.num_clips = math.ceil(conditioning.num_frames / settings.num_frames_per_clip)
        self.clip_length, self.n = settings.num_frames_per_clip, settings.num_motion_frames
        self.motion_scale, self.mask_rate = tuple(own.motion_scale), own.motion_frame_mask_rate
        self.generator = settings.generator
        self.models = models = HalloModels(pipe.reference_net, pipe.unet, pipe.identity_proj)
        if not self.parity:
            models.bank_dtype = None  # fast mode: no float16 rounding of the bank
        self.window = pipe.unet.audio_proj.config.window_size
        conditioning.check(self.window)
        self.device = device = pipe._execution_device
        self.dtype = dtype = pipe.unet.dtype
        self.source_image = conditioning.source_image.to(device)
        self.face_region = conditioning.face_region.to(device)
        self.region_masks = {
            level: tuple(mask.to(device=device, dtype=dtype) for mask in masks)
            for level, masks in conditioning.region_masks.items()
        }
        self.id_tokens = models.identity_tokens(conditioning.face_embedding.to(device=device, dtype=dtype))
        # Under offload hooks the backbone's face locator runs inside its forward (`face_mask=`), not here.
        self.face = models.face_features(self.face_region.to(dtype)) if precompute else None
        self.latent_dtype = dtype if self.parity else torch.float32
        self.vae = pipe.vae
        if self.parity:
            self.motion_pixels = self.source_image.repeat(self.n, 1, 1, 1)  # clip 0: the source image itself
        else:
            source = self._vae_encode(self.source_image)
            self.source_latents = source
            self.source = models.encode_source(source.to(dtype), self.id_tokens, self.n)
            if precompute:
                self.source = pipe.unet.prepare_reference(self.source)
            self.motion_latents = source.repeat(self.n, 1, 1, 1)[None]  # clip 0: the source image itself

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean * HALLO_VAE_SCALE

    # -- the reference of each branch ------------------------------------------------------------------------

    def _guided_reference(self, motion_latents: torch.Tensor) -> ReferenceFeatures:
        """`[uncond, cond]` reference (Hallo's two-copy bank, tiled over the frames) for motion latents `(n, ...)`."""
        if self.parity:
            latents = torch.cat([self.reference_latents[:1], motion_latents])
            return self.models.encode_reference(latents, self.id_tokens)
        temporal = self.models.encode_motion(motion_latents.to(self.dtype), self.id_tokens)
        return ReferenceFeatures(
            spatial=self.source.spatial, temporal=temporal, key_value=self.source.key_value, tiled=True
        )

    def _conditional_reference(self, motion_latents: torch.Tensor) -> ReferenceFeatures:
        """Hallo without guidance: `[source, motion frames]` through the ReferenceNet once, every image with the
        identity tokens as attn2 context; one copy for every frame."""
        models, n = self.models, motion_latents.shape[0]
        source = self.reference_latents[:1] if self.parity else self.source_latents
        latents = torch.cat([source, motion_latents]).to(self.dtype)[None]  # (1, 1 + n, 4, h, w)
        context = self.id_tokens[1:].expand(1 + n, -1, -1)
        features = models.reference_net(latents, 0, context=context)
        spatial, temporal = {}, {}
        for name, tokens in features.spatial.items():
            tokens = models._round(tokens.reshape(1, 1 + n, -1, tokens.shape[-1]))
            spatial[name] = tokens[:, 0]
            for layer, value in models._motion_features(name, tokens[:, 1:].expand(2, -1, -1, -1)).items():
                temporal[layer] = value[:1]
        return ReferenceFeatures(spatial=spatial, temporal=temporal)

    def _inputs(self, motion_latents: torch.Tensor) -> BranchInputs:
        """The clip's backbone inputs for motion latents `(n, 4, h, w)`; each branch built when first used."""
        shared, f = self._shared, self.clip_length
        scales = {"region_masks": self.region_masks, "region_scales": self.motion_scale}

        def guided() -> dict:
            rows = torch.tensor([False, True], device=self.device)
            inputs = {**shared["guided"], **scales, "reference_rows": rows}
            inputs["context_tokens"] = self.id_tokens.repeat_interleave(f, dim=0)
            return {**inputs, "reference_features": self._guided_reference(motion_latents)}

        def conditional() -> dict:
            inputs = {**shared["conditional"], **scales, "context_tokens": self.id_tokens[1:].expand(f, -1, -1)}
            return {**inputs, "reference_features": self._conditional_reference(motion_latents)}

        return BranchInputs(guided=guided, conditional=conditional)

    # -- the schedule --------------------------------------------------------------------------------------

    def start_clip(self, index: int) -> Clip:
        f, device, dtype = self.clip_length, self.device, self.dtype
        if self.parity:
            if self.mask_rate is not None:
                height, width = self.source_image.shape[-2:]
                keep = motion_frame_keep_mask(self.generator, height, width, self.mask_rate).to(device)
                self.motion_pixels = self.motion_pixels * (keep | (self.face_region[0, 0] > 0))
            pixels = hallo_image_preprocess(torch.cat([self.source_image, self.motion_pixels]))
            self.reference_latents = self._vae_encode(pixels).to(dtype)
            motion_latents = self.reference_latents[1:][None]
        else:
            motion_latents = self.motion_latents
        windows = self.conditioning.audio_windows(index * f, index * f + f, self.window)[None]
        windows = windows.to(device=device, dtype=dtype)
        if self.precompute:
            tokens = self.models.audio_tokens(windows)  # (f, T, C): the conditional branch's
            self._shared = {
                "guided": {
                    "audio_tokens": torch.cat([torch.zeros_like(tokens), tokens]),
                    "face_features": torch.cat([torch.zeros_like(self.face), self.face]),
                },
                "conditional": {"audio_tokens": tokens, "face_features": self.face},
            }
        else:  # offloaded: the forward encodes them, zeroing the unconditional branch's
            face = self.face_region.to(dtype)
            self._shared = {
                "guided": {
                    "audio_features": torch.cat([windows, windows]),
                    "face_mask": face,
                    "unconditional_rows": torch.tensor([True, False], device=device),
                },
                "conditional": {"audio_features": windows, "face_mask": face},
            }
        height, width = self.source_image.shape[-2] // 8, self.source_image.shape[-1] // 8
        return Clip(
            inputs=self._inputs(motion_latents[0]),
            latent_shape=(1, 4, f, height, width),
            motion_latents=motion_latents,
            latent_dtype=self.latent_dtype,
        )

    def replace_motion_latents(self, clip: Clip, motion_latents: torch.Tensor) -> BranchInputs:
        return self._inputs(motion_latents[0].to(self.dtype))

    def end_clip(self, index: int, latents: torch.Tensor) -> torch.Tensor | None:
        f, n = self.clip_length, self.n
        if not self.parity:  # the next clip's motion frames: this clip's last n latents
            self.motion_latents = latents[:, :, f - n :].permute(0, 2, 1, 3, 4)
            return None
        frames = latents[0].permute(1, 0, 2, 3) / HALLO_VAE_SCALE  # (f, 4, h, w), decoded one frame at a time
        frames = torch.cat([self.vae.decode(frame[None].to(self.vae.dtype)).sample for frame in frames])
        frames = (frames / 2 + 0.5).clamp(0, 1).float()  # (f, 3, H, W)
        self.motion_pixels = frames[f - n :].to(self.source_image.dtype) * 2.0 - 1.0
        return frames

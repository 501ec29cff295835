"""Native EMO weights (`emo-convert --sd15 ... --wav2vec2 ...`, or trained): the default family.

Front end: the portrait cropped square around its face (face detection, or `face_box` / `face_mask`), the track's
wav2vec2 features per video frame, streamed in bounded chunks, windowed `2m+1` frames per frame, and the optional head
speed. Schedule: autoregressive clips; clip k+1's motion frames are clip k's last `n` latents (no VAE round trip),
the first clip's zero maps (the input training uses when it drops them). Reference: the portrait's VAE latents (the
mode) through the ReferenceNet once per video, its keys/values projected once; motion frames once per clip.
Unconditional branch: zero audio features (the audio projection of zeros), everything else shared.
Its own settings (`speed`, `face_mask`, `step_cache`) are `GenerationSettings` fields: EMO is the default family.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from emo_pipeline.audio import FeatureWindows, iter_audio_features, load_audio, num_video_frames
from emo_pipeline.errors import EMOInputError
from emo_pipeline.face import prepare_portrait
from emo_pipeline.families.base import BranchInputs, Clip, Family, Plan
from emo_pipeline.models.attention import ReferenceFeatures

__all__ = ["EMOFamily"]

SAMPLE_RATE = 16000  # wav2vec2's rate


class EMOFamily(Family):
    name = "emo"
    label = "EMO"
    convert_option = "--sd15"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return True  # the default: every pipeline no other family claims

    def prepare(self, image: Any, audio: Any, settings: Any, precompute: bool) -> tuple[Plan, _EMORun]:
        pipe = self.pipe
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
        plan = Plan(
            portrait=portrait,
            audio=samples,
            num_frames=num_frames,
            num_clips=math.ceil(num_frames / settings.num_frames_per_clip),
            speed=_speed_per_frame(settings.speed, num_frames),
        )
        return plan, _EMORun(pipe, plan, settings, precompute)


class _EMORun:
    """EMO's autoregressive schedule (`emo_pipeline.families.base.AutoregressiveRun`)."""

    def __init__(self, pipe: Any, plan: Plan, settings: Any, precompute: bool):
        self.pipe, self.plan, self.precompute = pipe, plan, precompute
        self.num_clips, self.clip_length = plan.num_clips, settings.num_frames_per_clip
        self.num_motion_frames = settings.num_motion_frames
        self.device = device = pipe._execution_device
        self.dtype = dtype = pipe.unet.dtype  # the models' compute dtype
        self.latent_size = plan.portrait.image.size[0] // pipe.vae_scale_factor
        # Once per video: reference latents -> ReferenceNet (keys/values projected once unless offloaded); face mask;
        # the audio feature stream.
        reference = pipe.reference_net(pipe.encode_image(plan.portrait.image, device, dtype))
        self.reference = pipe.unet.prepare_reference(reference) if precompute else reference
        self.face_mask = torch.from_numpy(plan.portrait.mask)[None, None].to(device=device, dtype=dtype)
        pipe.audio_encoder.eval()
        self.audio_windows = FeatureWindows(
            iter_audio_features(plan.audio, pipe.audio_encoder, pipe.feature_extractor, settings.fps, plan.num_frames),
            plan.num_frames,
            pipe.audio_window,
        )
        size = self.latent_size
        self.motion_latents = torch.zeros(1, self.num_motion_frames, 4, size, size, device=device)
        self._shared: dict = {}

    def _clip_reference(self, motion_latents: torch.Tensor) -> ReferenceFeatures:
        return ReferenceFeatures(
            spatial=self.reference.spatial,
            # Contiguous: the previous clip's latents arrive as a strided view, which a compiled ReferenceNet would
            # recompile for (dynamo guards on strides).
            temporal=self.pipe.reference_net(motion_latents.to(self.dtype).contiguous()).temporal,  # once per clip
            key_value=self.reference.key_value,
        )

    def _inputs(self, reference: ReferenceFeatures) -> BranchInputs:
        guided, conditional = self._shared["guided"], self._shared["conditional"]
        return BranchInputs(
            guided={**guided, "reference_features": reference},
            conditional={**conditional, "reference_features": reference},
        )

    def start_clip(self, index: int) -> Clip:
        f, plan, device, dtype = self.clip_length, self.plan, self.device, self.dtype
        start = index * f
        clip_audio = self.audio_windows.window(start, start + f)[None].to(device=device, dtype=dtype)
        guided_audio = torch.cat([torch.zeros_like(clip_audio), clip_audio])  # [no audio, audio]
        clip_speed = None
        if plan.speed is not None:
            clip_speed = plan.speed[np.minimum(np.arange(start, start + f), plan.num_frames - 1)]
            clip_speed = torch.from_numpy(clip_speed)[None].to(device=device, dtype=dtype)
        # Audio tokens, face-locator features and speed embeddings depend on the clip, not on the step: encoded once
        # per clip, both guidance branches' tokens at once. Under offload the forward encodes them.
        if self.precompute:
            encoded = self.pipe.unet.encode_conditioning(guided_audio, self.face_mask, clip_speed, dtype=dtype)
            guided = {"audio_tokens": encoded.pop("audio_tokens")}
        else:
            encoded = {"face_mask": self.face_mask, "speed": clip_speed}
            guided = {"audio_features": guided_audio}
        conditional = {key: value[value.shape[0] // 2 :] for key, value in guided.items()}
        self._shared = {"guided": {**guided, **encoded}, "conditional": {**conditional, **encoded}}
        latent_shape = (1, 4, f, self.latent_size, self.latent_size)
        inputs = self._inputs(self._clip_reference(self.motion_latents))
        return Clip(inputs=inputs, latent_shape=latent_shape, motion_latents=self.motion_latents)

    def replace_motion_latents(self, clip: Clip, motion_latents: torch.Tensor) -> BranchInputs:
        return self._inputs(self._clip_reference(motion_latents))

    def end_clip(self, index: int, latents: torch.Tensor) -> None:
        n = self.num_motion_frames
        if n:  # the next clip's motion frames: this clip's last n latents, no VAE round trip
            self.motion_latents = latents[:, :, self.clip_length - n :].permute(0, 2, 1, 3, 4)
        return None


def _speed_per_frame(speed: Any, num_frames: int) -> np.ndarray | None:
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

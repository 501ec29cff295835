"""A dataset batch -> the inputs of `EMOTrainingModule`: frozen VAE encoding and conditioning dropout.

Conditions are encoded as inference encodes them, so training sees what the pipeline will feed: the reference image
and the motion frames take the VAE posterior's mode (`EMOPipeline` encodes the portrait with `latent_dist.mode()`,
and later clips' motion frames are generated latents, not samples). Only the denoising targets take a posterior
sample, as diffusers' training scripts do: the sample is a cheap augmentation of what the model learns to produce.
"""

from __future__ import annotations

import torch

from emo_pipeline.config import TrainConfig
from emo_pipeline.models.backbone import EMOUNet3DConditionModel

__all__ = ["batch_inputs", "encode_condition", "encode_target"]


def encode_condition(vae, pixels: torch.Tensor) -> torch.Tensor:
    """`(N, 3, H, W)` in [-1, 1] -> `(N, 4, h, w)` scaled latents, the posterior's mode (as `EMOPipeline`)."""
    return vae.encode(pixels.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor


def encode_target(vae, pixels: torch.Tensor) -> torch.Tensor:
    """`(N, 3, H, W)` in [-1, 1] -> `(N, 4, h, w)` scaled latents, a posterior sample (global torch RNG)."""
    return vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor


def _encode_frames(encode, vae, frames: torch.Tensor) -> torch.Tensor:
    """`(B, F, 3, H, W)` -> `(B, F, 4, h, w)` with `encode` over all frames at once."""
    return encode(vae, frames.flatten(0, 1)).unflatten(0, frames.shape[:2])


def batch_inputs(
    batch: dict, vae, unet: EMOUNet3DConditionModel, config: TrainConfig, weight_dtype: torch.dtype
) -> dict[str, torch.Tensor | None]:
    """Dataset batch (see `TalkingHeadDataset`) -> keyword inputs of `EMOTrainingModule` (without noise and
    timesteps): `latents (B, 4, F, h, w)` (F = 1 in stage 1), `reference_latents (B, 4, h, w)`, `motion_latents
    (B, n, 4, h, w)` or None, `audio_features (B, F, 2m+1, L, D)`, `face_mask (B, 1, H, W)`, `speed (B, F)` or
    None. Dropout draws from the global torch RNG (restored on resume)."""
    device = vae.device
    size = batch["reference"].shape[0]
    with torch.no_grad():
        reference_latents = encode_condition(vae, batch["reference"].to(device))
        if config.stage == 1:
            latents = encode_target(vae, batch["target"].to(device))[:, :, None]  # one frame
            motion_latents = None
            window, layers, dim = unet.audio_proj.expected_feature_shape
            audio = torch.zeros(size, 1, window, layers, dim, device=device)  # stage 1 has no audio
        else:
            latents = _encode_frames(encode_target, vae, batch["frames"].to(device)).permute(0, 2, 1, 3, 4)
            motion = batch["motion_frames"].to(device)
            motion_latents = _encode_frames(encode_condition, vae, motion) if motion.shape[1] else None
            audio = batch["audio_features"].to(device)

    def keep(probability: float) -> torch.Tensor:
        """`(B,)` 1 where the condition stays, 0 where it is replaced by its absent input."""
        return (torch.rand(size, device=device) >= probability).float()

    reference_latents = reference_latents * keep(config.dropout.reference)[:, None, None, None]
    if motion_latents is not None:
        motion_latents = motion_latents * keep(config.dropout.motion)[:, None, None, None, None]
    audio = audio * keep(config.dropout.audio)[:, None, None, None, None]
    speed = batch["speed"].to(device, weight_dtype) if config.stage == 3 else None
    return {
        "latents": latents.to(weight_dtype),
        "reference_latents": reference_latents.to(weight_dtype),
        "motion_latents": None if motion_latents is None else motion_latents.to(weight_dtype),
        "audio_features": audio.to(weight_dtype),
        "face_mask": batch["face_mask"].to(device, weight_dtype),
        "speed": speed,
    }

"""`EMOTrainingModule`: ReferenceNet + backbone with EMO's denoising loss (arXiv 2402.17485, Eq. 1).

The loss is diffusers' training recipe: MSE to the noise (epsilon) or to the velocity (v-prediction), optionally
weighted by Min-SNR (Hang et al. 2023) and, EMO-style, weighted up inside the face mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from emo_pipeline.config import TrainConfig
from emo_pipeline.models.attention import ReferenceFeatures
from emo_pipeline.models.backbone import EMOUNet3DConditionModel
from emo_pipeline.models.reference_net import ReferenceNet

__all__ = ["EMOTrainingModule"]


class EMOTrainingModule(nn.Module):
    """ReferenceNet + backbone with the denoising loss; one module so accelerate/DDP/FSDP wrap a single thing."""

    def __init__(
        self, reference_net: ReferenceNet, unet: EMOUNet3DConditionModel, noise_scheduler, config: TrainConfig
    ):
        super().__init__()
        self.reference_net = reference_net
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.config = config

    def forward(
        self,
        latents: torch.Tensor,
        reference_latents: torch.Tensor,
        motion_latents: torch.Tensor | None,
        audio_features: torch.Tensor,
        face_mask: torch.Tensor,
        speed: torch.Tensor | None,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Loss of one batch. `latents (B, 4, F, h, w)` clean targets; `reference_latents (B, 4, h, w)`;
        `motion_latents (B, n, 4, h, w)` or None; `audio_features (B, F, 2m+1, L, D)`; `face_mask (B, 1, H, W)`;
        `speed (B, F)` or None; `noise` like `latents`; `timesteps (B,)`. Returns the mean loss `()`."""
        train_reference = any(p.requires_grad for p in self.reference_net.parameters())
        with torch.set_grad_enabled(train_reference and torch.is_grad_enabled()):
            reference = self.reference_net(reference_latents)
            motion = self.reference_net(motion_latents) if motion_latents is not None else None
        features = ReferenceFeatures(spatial=reference.spatial, temporal=motion.temporal if motion else {})

        scheduler = self.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(
            noisy, timesteps, audio_features, reference_features=features, face_mask=face_mask, speed=speed
        ).sample
        epsilon = scheduler.config.prediction_type == "epsilon"
        target = noise if epsilon else scheduler.get_velocity(latents, noise, timesteps)
        error = F.mse_loss(prediction.float(), target.float(), reduction="none")  # (B, 4, F, h, w)
        if self.config.face_loss_weight:
            mask = F.adaptive_max_pool2d(face_mask.float(), latents.shape[-2:])[:, :, None]  # (B, 1, 1, h, w)
            error = error * (1 + self.config.face_loss_weight * mask)
        per_sample = error.mean(dim=(1, 2, 3, 4))
        if self.config.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            # min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v (diffusers' train_text_to_image.py). The config
            # rejects epsilon with zero terminal SNR, whose last timestep would make this 0 / 0.
            snr = compute_snr(scheduler, timesteps)
            clipped = torch.clamp(snr, max=self.config.snr_gamma)
            per_sample = per_sample * (clipped / snr if epsilon else clipped / (snr + 1))
        return per_sample.mean()

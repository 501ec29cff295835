"""Head-speed conditioning of EMO (arXiv 2402.17485, section 3.2, "Speed Layers").

Head rotation speed (rad/s) per frame is encoded against `d` speed buckets,
`s_i = tanh((w - c_i) / r_i * 3)`, the encodings of a window of `2m+1` frames are concatenated and an MLP turns
them into one embedding per frame. The temporal layers cross-attend to these embeddings.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from emo_pipeline.errors import EMOInputError

__all__ = ["ModelMixin", "SpeedEncoder", "speed_bucket_encoding", "window_frames"]

# Default buckets, from still heads to brisk turns (rad/s). Train with the ones `emo-preprocess` suggests for your
# data (speed_buckets.yaml, centres at speed quantiles), which a stage-3 config includes.
DEFAULT_SPEED_CENTERS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0)
DEFAULT_SPEED_RADII = (0.1, 0.1, 0.1, 0.15, 0.15, 0.25, 0.25, 0.5, 0.5)


def speed_bucket_encoding(speed: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """EMO eq. (speed buckets): `tanh((w - c) / r * 3)`; `(...,)` rad/s -> `(..., d)` in (-1, 1)."""
    return torch.tanh((speed[..., None] - centers) / radii * 3.0)


def window_frames(values: torch.Tensor, m: int) -> torch.Tensor:
    """Gather a `2m+1`-frame window around every frame, edges clamped: `(B, F, ...)` -> `(B, F, 2m+1, ...)`."""
    num_frames = values.shape[1]
    offsets = torch.arange(-m, m + 1, device=values.device)
    index = (torch.arange(num_frames, device=values.device)[:, None] + offsets).clamp(0, num_frames - 1)
    return values[:, index]


class SpeedEncoder(ModelMixin, ConfigMixin):
    """`(B, F)` head rotation speed in rad/s -> `(B, F, embed_dim)` per-frame speed embeddings."""

    @register_to_config
    def __init__(
        self,
        centers: tuple[float, ...] = DEFAULT_SPEED_CENTERS,
        radii: tuple[float, ...] = DEFAULT_SPEED_RADII,
        window_size: int = 5,  # 2m+1 frames, m = 2 as for audio in the paper
        hidden_dim: int = 256,
        embed_dim: int = 768,
    ):
        super().__init__()
        if len(centers) != len(radii) or not centers:
            raise EMOInputError(
                f"SpeedEncoder: centers ({len(centers)}) and radii ({len(radii)}) must be non-empty and equally long"
            )
        if any(r <= 0 for r in radii):
            raise EMOInputError(f"SpeedEncoder: every radius must be > 0, got {tuple(radii)}")
        if window_size < 1 or window_size % 2 == 0:
            raise EMOInputError(f"SpeedEncoder: window_size must be odd (2m+1), got {window_size}")
        # Buffers, not parameters: buckets are data statistics, not learned; persistent so a saved model keeps them.
        self.register_buffer("bucket_centers", torch.tensor(centers, dtype=torch.float32))
        self.register_buffer("bucket_radii", torch.tensor(radii, dtype=torch.float32))
        self.mlp = nn.Sequential(
            nn.Linear(len(centers) * window_size, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, embed_dim),
        )

    def forward(self, speed: torch.Tensor) -> torch.Tensor:
        """`speed (B, F)` rad/s -> `(B, F, embed_dim)`."""
        if speed.ndim != 2:
            raise EMOInputError(f"speed must have shape (B, F) in rad/s, got {tuple(speed.shape)}")
        encoding = speed_bucket_encoding(speed.float(), self.bucket_centers, self.bucket_radii)  # (B, F, d)
        windows = window_frames(encoding, self.config.window_size // 2)  # (B, F, 2m+1, d)
        return self.mlp(windows.flatten(2).to(speed.dtype))

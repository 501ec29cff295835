"""Face locator of EMO (arXiv 2402.17485, section 3.2): a light conv encoder of the face-region mask.

Its output is added to the backbone's `conv_in` features, so generation is steered to keep the face inside the
region. The last conv is zero-initialised: an untrained locator changes nothing.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from emo_pipeline.errors import EMOInputError

__all__ = ["FaceLocator", "ModelMixin"]


class FaceLocator(ModelMixin, ConfigMixin):
    """`(B, 1, H, W)` mask in [0, 1] -> `(B, out_channels, H / 2**(len(channels)-1), W / ...)` features."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, ...] = (16, 32, 64, 128),  # three stride-2 steps: the SD VAE's factor of 8
        out_channels: int = 320,  # SD1.5 conv_in width
        same_width_convs: bool = False,
    ):
        """`same_width_convs`: a stride-1 conv (c_in -> c_in) + SiLU before every stride-2 conv, the layout of
        ControlNet's conditioning embedding that Hallo's FaceLocator uses (EMO's: False)."""
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1), nn.SiLU()]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            if same_width_convs:
                layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=2), nn.SiLU()]
        self.encoder = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def downscale_factor(self) -> int:
        """Pixels per output feature along each side."""
        return 2 ** (len(self.config.channels) - 1)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.ndim != 4 or mask.shape[1] != self.config.in_channels:
            raise EMOInputError(
                f"face_mask must have shape (B, {self.config.in_channels}, H, W), got {tuple(mask.shape)}"
            )
        if not mask.is_floating_point():
            mask = mask.float()
        return self.conv_out(self.encoder(mask))


def controlnet_face_locator_key(key: str) -> str:
    """A face locator key in ControlNet's conditioning-embedding layout (`conv_in`, `blocks.i`, `conv_out`: Hallo's
    and EchoMimic's FaceLocator) -> `FaceLocator(same_width_convs=True)`'s."""
    if key.startswith("conv_in."):
        return "encoder.0." + key.removeprefix("conv_in.")
    if key.startswith("blocks."):
        index, rest = key.removeprefix("blocks.").split(".", 1)
        return f"encoder.{2 * int(index) + 2}.{rest}"
    return key

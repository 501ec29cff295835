"""Identity-embedding projection: a face-recognition embedding -> context tokens for the spatial attn2 layers.

The layout of Hallo's `ImageProjModel` (IP-Adapter's image projection, arXiv 2308.06721): one Linear to
`num_tokens * output_dim`, reshaped to tokens, then a LayerNorm. Hallo feeds the insightface embedding (512-d,
raw) through it and uses the tokens as the attn2 context of the ReferenceNet and of the backbone
(`docs/hallo_architecture.md` section 1.4).
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from emo_pipeline.errors import EMOInputError

__all__ = ["IdentityProjection"]


class IdentityProjection(ModelMixin, ConfigMixin):
    """`(B, embed_dim)` identity embedding -> `(B, num_tokens, output_dim)` tokens."""

    @register_to_config
    def __init__(self, embed_dim: int = 512, num_tokens: int = 4, output_dim: int = 768):
        super().__init__()
        self.proj = nn.Linear(embed_dim, num_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if embedding.ndim != 2 or embedding.shape[1] != self.config.embed_dim:
            raise EMOInputError(
                f"identity embedding must have shape (B, {self.config.embed_dim}), got {tuple(embedding.shape)}"
            )
        tokens = self.proj(embedding.to(self.proj.weight.dtype))
        return self.norm(tokens.reshape(embedding.shape[0], self.config.num_tokens, self.config.output_dim))

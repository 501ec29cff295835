"""Audio projection of EMO (arXiv 2402.17485, section 3.2, "Audio Layers").

wav2vec2 hidden states of several layers over a window of `2m+1` frames around each video frame are flattened and
projected by an MLP into `num_tokens` context tokens per frame, of the SD1.5 text-context width, so the backbone's
cross-attention (SD's text attention) can attend to them with SD's weights as the initialisation.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from emo_pipeline.errors import EMOInputError

__all__ = ["AudioProjection", "ModelMixin"]


class AudioProjection(ModelMixin, ConfigMixin):
    """`(B, F, 2m+1, L, D)` windowed wav2vec2 features -> `(B*F, num_tokens, output_dim)` per-frame tokens."""

    @register_to_config
    def __init__(
        self,
        window_size: int = 5,  # 2m+1 with the paper's m = 2
        num_layers: int = 12,  # wav2vec2-base transformer layers
        audio_dim: int = 768,  # wav2vec2-base hidden size
        num_tokens: int = 32,
        hidden_dim: int = 512,
        output_dim: int = 768,  # SD1.5 text-context width, so attn2 keeps its weights
        activation: str = "silu",  # "silu" (EMO) or "relu" (Hallo's AudioProjModel)
        passthrough: bool = False,
    ):
        """`passthrough=True`: no MLP, no weights; each frame's `window_size x num_layers` feature vectors are its
        tokens (EchoMimic: 10 whisper steps x (blocks + 1) vectors of width 384, `num_tokens` and `output_dim` are
        then `window_size * num_layers` and `audio_dim`)."""
        super().__init__()
        if passthrough:
            if num_tokens != window_size * num_layers or output_dim != audio_dim:
                raise ValueError(
                    "a passthrough audio projection has num_tokens = window_size * num_layers and output_dim = "
                    f"audio_dim, got num_tokens={num_tokens}, output_dim={output_dim}"
                )
            self.mlp = self.norm = None
            return
        activations = {"silu": nn.SiLU, "relu": nn.ReLU}
        if activation not in activations:
            raise ValueError(f"activation must be one of {sorted(activations)}, got {activation!r}")
        act = activations[activation]
        self.mlp = nn.Sequential(
            nn.Linear(window_size * num_layers * audio_dim, hidden_dim),
            act(),
            nn.Linear(hidden_dim, hidden_dim),
            act(),
            nn.Linear(hidden_dim, num_tokens * output_dim),
        )
        self.norm = nn.LayerNorm(output_dim)

    @property
    def expected_feature_shape(self) -> tuple[int, int, int]:
        """`(2m+1, L, D)`: the trailing dimensions of the features this projection takes."""
        return (self.config.window_size, self.config.num_layers, self.config.audio_dim)

    def forward(self, audio_features: torch.Tensor) -> torch.Tensor:
        if audio_features.ndim != 5 or tuple(audio_features.shape[2:]) != self.expected_feature_shape:
            raise EMOInputError(
                "audio_features must have shape (B, F, 2m+1, L, D) = (B, F, "
                f"{', '.join(map(str, self.expected_feature_shape))}), got {tuple(audio_features.shape)}"
            )
        batch, frames = audio_features.shape[:2]
        if self.config.passthrough:
            return audio_features.reshape(batch * frames, self.config.num_tokens, self.config.output_dim)
        flat = audio_features.reshape(batch * frames, -1)
        tokens = self.mlp(flat).reshape(batch * frames, self.config.num_tokens, self.config.output_dim)
        return self.norm(tokens)

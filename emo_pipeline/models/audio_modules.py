"""Region-masked audio transformers: the backbone's `audio_attention: "audio_modules"` option (Hallo's layout).

Hallo (arXiv 2406.08801, "hierarchical audio-driven visual synthesis") does not put the audio into the spatial
transformer's attn2 (which attends to identity tokens there); it adds a separate transformer after every spatial
transformer ("audio module"): per-frame self-attention, then three cross-attentions to the audio tokens whose
outputs are weighted by the full (background/pose), face and lip masks of the resolution level, each followed by a
1x1 conv, summed with the region weights, then a feed-forward. Built from diffusers' `Attention` and
`FeedForward`; parameter names follow Hallo's checkpoint (`norm`, `proj_in`, `transformer_blocks.0.{norm1, attn1,
norm2, attn2_0, attn2_1, attn2_2, zero_conv_full, zero_conv_face, zero_conv_lip, norm3, ff}`, `proj_out`), so its
weights load without renaming (`docs/hallo_architecture.md` section 2.2).

The backbone attaches one module after each `attentions.i` of a block (as `audio_modules.i`, run by a forward hook
of the spatial transformer); its inputs come from the backbone's `ConditioningState`.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.attention import ConditioningState

__all__ = ["AudioModuleHook", "RegionAudioBlock", "RegionAudioTransformer", "audio_module_inner_dims"]


class RegionAudioBlock(nn.Module):
    """Self-attention, three region-masked audio cross-attentions with 1x1 convs, feed-forward (all pre-norm)."""

    def __init__(self, dim: int, heads: int, cross_attention_dim: int):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=head_dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        for i in range(3):
            attention = Attention(
                query_dim=dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=head_dim, bias=False
            )
            setattr(self, f"attn2_{i}", attention)
        self.zero_conv_full = nn.Conv2d(dim, dim, kernel_size=1)
        self.zero_conv_face = nn.Conv2d(dim, dim, kernel_size=1)
        self.zero_conv_lip = nn.Conv2d(dim, dim, kernel_size=1)
        for conv in (self.zero_conv_full, self.zero_conv_face, self.zero_conv_lip):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio_tokens: torch.Tensor,
        masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        scales: tuple[float, float, float],
        height: int,
        width: int,
    ) -> torch.Tensor:
        """`hidden_states (N, h*w, dim)`, `audio_tokens (N, T, C_a)`, masks broadcastable to `(N, h*w)`."""
        hidden_states = self.attn1(self.norm1(hidden_states)) + hidden_states
        normed = self.norm2(hidden_states)
        batch, length, dim = hidden_states.shape
        convs = (self.zero_conv_full, self.zero_conv_face, self.zero_conv_lip)
        attentions = (self.attn2_0, self.attn2_1, self.attn2_2)
        total = hidden_states
        for attention, conv, mask, scale in zip(attentions, convs, masks, scales):
            region = attention(normed, encoder_hidden_states=audio_tokens) * mask.to(normed.dtype)[..., None]
            region = conv(region.reshape(batch, height, width, dim).permute(0, 3, 1, 2))
            total = total + scale * region.permute(0, 2, 3, 1).reshape(batch, length, dim)
        return self.ff(self.norm3(total)) + total


class RegionAudioTransformer(nn.Module):
    """GroupNorm, 1x1 `proj_in` (C -> dim), one `RegionAudioBlock`, 1x1 `proj_out` (dim -> C), plus the input."""

    def __init__(
        self, in_channels: int, inner_dim: int, heads: int, cross_attention_dim: int, norm_num_groups: int = 32
    ):
        super().__init__()
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([RegionAudioBlock(inner_dim, heads, cross_attention_dim)])
        self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio_tokens: torch.Tensor,
        masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> torch.Tensor:
        """`hidden_states (N, C, h, w)` (N = batch * frames), `audio_tokens (N, T, C_a)` -> `(N, C, h, w)`."""
        batch, _, height, width = hidden_states.shape
        states = self.proj_in(self.norm(hidden_states))
        inner = states.shape[1]
        states = states.permute(0, 2, 3, 1).reshape(batch, height * width, inner)
        for block in self.transformer_blocks:
            states = block(states, audio_tokens, masks, scales, height, width)
        states = states.reshape(batch, height, width, inner).permute(0, 3, 1, 2)
        return self.proj_out(states) + hidden_states


def audio_module_inner_dims(block_out_channels: list[int], layers_per_block: int) -> dict[str, int]:
    """`{"down_blocks.i.audio_modules.j": inner dim}` for every block with attention, Hallo's rule.

    Hallo builds each audio module with `inner_dim = in_channels` of its loop (hallo/models/unet_3d_blocks.py:589,
    1051): in down blocks the block's input channels for layer 0 and its output channels after; in up blocks the
    block's `in_channels` argument (the skip width `reversed(block_out_channels)[min(i + 1, last)]`) for every
    layer; in the mid block its channels. The last down block and the first up block have no attention.
    """
    channels = list(block_out_channels)
    last = len(channels) - 1
    dims: dict[str, int] = {}
    for i in range(last):
        for j in range(layers_per_block):
            dims[f"down_blocks.{i}.audio_modules.{j}"] = (
                (channels[i - 1] if i else channels[0]) if j == 0 else channels[i]
            )
    dims["mid_block.audio_modules.0"] = channels[-1]
    reversed_channels = channels[::-1]
    for i in range(1, last + 1):
        for j in range(layers_per_block + 1):
            dims[f"up_blocks.{i}.audio_modules.{j}"] = reversed_channels[min(i + 1, last)]
    return dims


class AudioModuleHook:
    """Forward hook of a spatial transformer `X.attentions.j`: runs the audio module `X.audio_modules.j` on its output.

    `level` indexes the per-resolution region masks (0 = full latent resolution). With no audio tokens in the state
    the module still runs, on the tokens of silence the caller must pass; a missing state is an error.
    """

    def __init__(self, name: str, module: RegionAudioTransformer, level: int, state: ConditioningState):
        self.name, self.level, self.state = name, level, state
        self._module = [module]  # a list: not registered twice as a submodule of the hook owner

    def __call__(self, transformer: nn.Module, inputs: tuple, output):
        state = self.state
        if state.audio_module_tokens is None or state.audio_module_masks is None:
            raise EMOInputError(
                f"{self.name}: this backbone has audio modules (audio_attention='audio_modules'); pass audio_tokens "
                "(or audio_features) and region_masks to its forward"
            )
        sample = output[0] if isinstance(output, tuple) else output.sample
        masks = state.audio_module_masks.get(self.level)
        if masks is None:
            raise EMOInputError(f"{self.name}: region_masks has no entry for resolution level {self.level}")
        scales = state.audio_module_scales or (1.0, 1.0, 1.0)
        result = self._module[0](sample, state.audio_module_tokens.to(sample.dtype), masks, scales)
        state.mark(self.name)
        if isinstance(output, tuple):
            return (result, *output[1:])
        output.sample = result
        return output

"""Temporal layers of the EMO backbone: AnimateDiff motion modules that also see motion frames and head speed.

EMO (arXiv 2402.17485, section 3.2): the ReferenceNet features of the previous clip's last `n` frames (motion
frames) are concatenated in front of the clip's `f` frames along the frame axis inside every temporal layer and
dropped at its output; the speed embeddings are fused by a cross-attention across the time dimension. Everything
else is diffusers' `AnimateDiffTransformer3D` (AnimateDiff, arXiv 2307.04725), whose weights load unchanged.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn

from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.attention import ConditioningState, broadcast_batch, dispatch_attention

__all__ = ["EMOTemporalTransformer3D", "sinusoidal_positions"]


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids (Vaswani et al. 2017; AnimateDiff's table): `(T,)` positions -> `(T, dim)`, dim even."""
    div_term = torch.exp(torch.arange(0, dim, 2, device=positions.device) * (-math.log(10000.0) / dim))
    angles = positions.float()[:, None] * div_term
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


class EMOTemporalTransformer3D(AnimateDiffTransformer3D):
    """`AnimateDiffTransformer3D` + motion frames + a zero-initialised speed cross-attention after each block.

    Built by upgrading diffusers' module in place (`from_animatediff`), so every hyperparameter and weight name
    stays diffusers' and AnimateDiff checkpoints load without key surgery. Conditioning comes from the backbone's
    conditioning state (`emo_pipeline.models.attention`); with none it behaves exactly like the diffusers module.
    """

    emo_name: str
    _emo_state: ConditioningState
    # Checkpoint-family options (class defaults are EMO's; `EMOUNet3DConditionModel` sets them per layer):
    # `temporal_norm`: "across_frames" (diffusers/EMO: GroupNorm over (C, T, h, w) jointly) or "per_frame"
    # (original AnimateDiff as run by Hallo: GroupNorm of every frame on its own);
    # `enabled`: False makes the layer the identity (Hallo loads but never runs down_blocks.3 / up_blocks.0's).
    temporal_norm: str = "across_frames"
    enabled: bool = True

    @classmethod
    def from_animatediff(
        cls, module: AnimateDiffTransformer3D, name: str, speed_dim: int, state: ConditioningState | None = None
    ) -> EMOTemporalTransformer3D:
        """Upgrade `module` in place; it reads motion frames and speed from `state` (the backbone's)."""
        module.__class__ = cls
        module._add_emo_layers(name, speed_dim, state if state is not None else ConditioningState())
        return module

    def _add_emo_layers(self, name: str, speed_dim: int, state: ConditioningState) -> None:
        self.emo_name = name
        self._emo_state = state
        inner_dim = self.num_attention_heads * self.attention_head_dim
        self.speed_norms = nn.ModuleList(nn.LayerNorm(inner_dim) for _ in self.transformer_blocks)
        self.speed_attentions = nn.ModuleList(
            Attention(
                query_dim=inner_dim,
                cross_attention_dim=speed_dim,
                heads=self.num_attention_heads,
                dim_head=self.attention_head_dim,
                bias=False,
            )
            for _ in self.transformer_blocks
        )
        device = self.proj_out.weight.device
        if device.type != "meta":
            self.speed_norms.to(device)
            self.speed_attentions.to(device)
        for attention in self.speed_attentions:
            # zero output: an untrained speed branch leaves the backbone's output unchanged
            nn.init.zeros_(attention.to_out[0].weight)
            nn.init.zeros_(attention.to_out[0].bias)

    @property
    def max_seq_length(self) -> int | None:
        pos_embed = self.transformer_blocks[0].pos_embed
        return None if pos_embed is None else pos_embed.pe.shape[1]

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        num_frames: int = 1,
        cross_attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        if not self.enabled:
            return hidden_states
        batch_frames, channels, height, width = hidden_states.shape
        batch = batch_frames // num_frames
        state = self._emo_state
        motion = self._motion_features(state, batch, channels, height, width)
        speed = state.speed_embeddings
        num_motion = 0 if motion is None else motion.shape[1]
        total = num_motion + num_frames
        if self.max_seq_length is not None and total > self.max_seq_length:
            raise EMOInputError(
                f"{self.emo_name}: num_motion_frames ({num_motion}) + num_frames ({num_frames}) = {total} exceeds the "
                f"temporal layers' positional table ({self.max_seq_length} positions, motion_max_seq_length)"
            )

        residual = hidden_states
        states = hidden_states.reshape(batch, num_frames, channels, height, width)
        if motion is not None:
            states = torch.cat([motion.to(states.dtype), states], dim=1)
        if self.temporal_norm == "per_frame":  # GroupNorm over (C, h, w) of each frame
            states = self.norm(states.reshape(batch * total, channels, height, width))
            states = states.reshape(batch, total, channels, height, width).permute(0, 3, 4, 1, 2)
        else:
            states = self.norm(states.permute(0, 2, 1, 3, 4))  # GroupNorm over (C, T, h, w)
            states = states.permute(0, 3, 4, 2, 1)
        states = states.reshape(batch * height * width, total, channels)
        states = self.proj_in(states)

        for block, speed_norm, speed_attention in zip(
            self.transformer_blocks, self.speed_norms, self.speed_attentions
        ):
            states = block(
                hidden_states=states,
                encoder_hidden_states=encoder_hidden_states,
                timestep=timestep,
                cross_attention_kwargs=cross_attention_kwargs,
                class_labels=class_labels,
            )
            if speed is not None:
                states = states + self._speed_attention(
                    block, speed_norm, speed_attention, states, speed, batch, num_motion
                )

        states = self.proj_out(states)
        states = states.reshape(batch, height, width, total, channels)[:, :, :, num_motion:]  # drop motion frames
        states = states.permute(0, 3, 4, 1, 2).reshape(batch_frames, channels, height, width)
        return states + residual

    def _motion_features(self, state, batch: int, channels: int, height: int, width: int) -> torch.Tensor | None:
        if state.temporal is None:
            return None
        motion = state.temporal.get(self.emo_name)
        if motion is None:
            raise EMOInputError(
                f"reference_features.temporal has no entry for temporal layer {self.emo_name!r}; motion-frame "
                "features must come from a ReferenceNet built from the same SD UNet as the backbone"
            )
        if motion.ndim != 5 or tuple(motion.shape[2:]) != (channels, height, width):
            raise EMOInputError(
                f"reference_features.temporal[{self.emo_name!r}] must have shape (B, n, {channels}, {height}, "
                f"{width}), got {tuple(motion.shape)}"
            )
        state.mark(self.emo_name)
        return broadcast_batch(motion, batch, self.emo_name)

    @staticmethod
    def _speed_attention(block, norm, attention, states, speed, batch, num_motion) -> torch.Tensor:
        """Cross-attention of every (position, frame) token to the clip's per-frame speed embeddings."""
        tokens, total, inner = states.shape
        speed = broadcast_batch(speed, batch, "speed").to(states.dtype)  # (B, F, l)
        # Both sides carry sinusoidal frame positions, so frame t can find its own speed (clip frames sit after
        # the motion frames on the same positional axis the temporal attention uses).
        positions = torch.arange(num_motion, num_motion + speed.shape[1], device=speed.device)
        speed = speed + sinusoidal_positions(positions, speed.shape[-1]).to(speed.dtype)
        query_input = norm(states)
        if block.pos_embed is not None:
            query_input = block.pos_embed(query_input)
        heads, head_dim = attention.heads, inner // attention.heads
        # Every spatial position attends to the same F speed tokens: fold positions into the query length so the
        # keys/values are projected once per sample instead of once per position.
        # (B, S, H, D) through diffusers' dispatcher: the attention backend of the layer's processor.
        query = attention.to_q(query_input).reshape(batch, -1, heads, head_dim)
        key = attention.to_k(speed).reshape(batch, -1, heads, head_dim)
        value = attention.to_v(speed).reshape(batch, -1, heads, head_dim)
        out = dispatch_attention(query, key, value, attention.processor, scale=attention.scale, layer="speed")
        out = out.reshape(tokens, total, inner)
        return attention.to_out[1](attention.to_out[0](out))

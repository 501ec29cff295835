"""Reference features, the per-call conditioning context and the attention processors of EMO.

EMO (arXiv 2402.17485, section 3.2) conditions the backbone on the reference image through *reference attention*:
every spatial self-attention (attn1) of the backbone also attends to the ReferenceNet's attn1 input tokens of the
same layer, keys/values concatenated along the token axis.

Per-call conditioning (reference tokens, motion-frame features, speed embeddings, face-locator features) reaches
processors and temporal layers through `forward_context`, a `contextvars` scope opened by the backbone's `forward`
and closed when it returns: no state survives a call. Gradient checkpointing re-runs blocks during backward, after
the scope closed; `checkpoint_with_context` re-enters the scope captured at forward time for that recomputation.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from emo_pipeline.errors import EMOInputError

__all__ = [
    "ForwardContext",
    "ReferenceAttnProcessor",
    "ReferenceCaptureAttnProcessor",
    "ReferenceFeatures",
    "broadcast_batch",
    "checkpoint_with_context",
    "current_context",
    "forward_context",
]


@dataclass
class ReferenceFeatures:
    """What the ReferenceNet hands to the backbone.

    `spatial`: `{attn1 module name: (B, h*w, C)}` attn1 input tokens of the reference image (reference attention).
    `temporal`: `{temporal layer name: (B, n, C, h, w)}` hidden states of the `n` motion frames at every temporal
    layer of the backbone (empty when n = 0).
    """

    spatial: dict[str, torch.Tensor] = field(default_factory=dict)
    temporal: dict[str, torch.Tensor] = field(default_factory=dict)
    # Reference keys/values per layer. The reference tokens are fixed for a whole video and the weights are frozen at
    # inference, so projecting them once instead of at every frame, step and clip is exact. Filled only when
    # autograd is off (a training step needs fresh projections with a graph).
    _kv_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_motion_frames(self) -> int:
        return next(iter(self.temporal.values())).shape[1] if self.temporal else 0

    def to(self, *args, **kwargs) -> ReferenceFeatures:
        return ReferenceFeatures(
            spatial={k: v.to(*args, **kwargs) for k, v in self.spatial.items()},
            temporal={k: v.to(*args, **kwargs) for k, v in self.temporal.items()},
        )


@dataclass
class ForwardContext:
    """Conditioning of one backbone forward call (see module docstring)."""

    num_frames: int
    reference: ReferenceFeatures | None = None
    speed_embeddings: torch.Tensor | None = None  # (B, F, l)
    face_features: torch.Tensor | None = None  # (B, C, h, w)
    # Which layers consumed reference / motion-frame features, so the backbone can prove that conditioning reached
    # every layer (a replaced processor must fail loudly, not drop the reference silently).
    reached_spatial: set[str] = field(default_factory=set)
    reached_temporal: set[str] = field(default_factory=set)


_CONTEXT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("emo_forward_context", default=None)


def current_context() -> ForwardContext | None:
    return _CONTEXT.get()


@contextlib.contextmanager
def forward_context(context: ForwardContext | None) -> Iterator[ForwardContext | None]:
    token = _CONTEXT.set(context)
    try:
        yield context
    finally:
        _CONTEXT.reset(token)


def checkpoint_with_context(inner: Callable | None = None) -> Callable:
    """A diffusers `gradient_checkpointing_func` whose recomputation sees the forward call's context."""

    def default(function, *args):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    inner = inner or default

    def gradient_checkpointing_func(module, *args):
        context = current_context()

        def run(*inputs):
            with forward_context(context):
                return module(*inputs)

        return inner(run, *args)

    return gradient_checkpointing_func


def broadcast_batch(features: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Tile `(b, ...)` conditioning to a batch of `batch` (b divides it: classifier-free guidance stacks branches)."""
    if features.shape[0] == batch:
        return features
    if batch % features.shape[0]:
        raise EMOInputError(
            f"{name} conditioning has batch {features.shape[0]}, which does not divide the sample batch {batch}"
        )
    return features.repeat(batch // features.shape[0], *([1] * (features.ndim - 1)))


def _attention(query, key, value, heads: int, use_xformers: bool) -> torch.Tensor:
    """Multi-head attention on `(B, L, heads*d)` projections -> `(B, Lq, heads*d)`."""
    batch, _, inner = query.shape
    head_dim = inner // heads
    if use_xformers:
        import xformers.ops

        q, k, v = (t.reshape(batch, -1, heads, head_dim) for t in (query, key, value))
        out = xformers.ops.memory_efficient_attention(q, k, v)
        return out.reshape(batch, -1, inner)
    q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, -1, inner)


class ReferenceAttnProcessor:
    """Backbone attn1: self-attention whose keys/values also cover the reference tokens of the same layer.

    With no reference features in the current context it is plain self-attention, numerically the same as
    diffusers' `AttnProcessor2_0` (the SD1.5 parity tests rely on it).
    """

    def __init__(self, name: str, use_xformers: bool = False):
        self.name = name
        self.use_xformers = use_xformers

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError(f"{self.name}: reference attention supports SD-style attn1 layers only")
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError(f"{self.name}: reference attention is self-attention without a mask")
        residual = hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        context = current_context()
        reference = context.reference if context is not None else None
        if reference is not None and reference.spatial:
            ref_key, ref_value = self._reference_kv(attn, reference)
            batch_frames = hidden_states.shape[0]
            frames = context.num_frames
            ref_key = broadcast_batch(ref_key, batch_frames // frames, self.name)
            ref_value = broadcast_batch(ref_value, batch_frames // frames, self.name)
            # (B, T_ref, C) -> (B*F, T_ref, C): the same reference tokens for every frame of the clip.
            ref_key = ref_key.repeat_interleave(frames, dim=0)
            ref_value = ref_value.repeat_interleave(frames, dim=0)
            key = torch.cat([key, ref_key], dim=1)
            value = torch.cat([value, ref_value], dim=1)
            context.reached_spatial.add(self.name)

        hidden_states = _attention(query, key, value, attn.heads, self.use_xformers).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _reference_kv(self, attn: Attention, reference: ReferenceFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = reference.spatial.get(self.name)
        if tokens is None:
            raise EMOInputError(
                f"reference_features.spatial has no entry for layer {self.name!r}; it must come from a ReferenceNet "
                "built from the same SD UNet as the backbone"
            )
        if tokens.ndim != 3 or tokens.shape[-1] != attn.to_k.in_features:
            raise EMOInputError(
                f"reference_features.spatial[{self.name!r}] must have shape (B, tokens, {attn.to_k.in_features}), "
                f"got {tuple(tokens.shape)}"
            )
        cached = reference._kv_cache.get(self.name)
        weight = attn.to_k.weight
        if cached is not None and (cached[0].dtype, cached[0].device) == (weight.dtype, weight.device):
            return cached
        tokens = tokens.to(device=weight.device, dtype=weight.dtype)
        key_value = (attn.to_k(tokens), attn.to_v(tokens))
        if not torch.is_grad_enabled():
            reference._kv_cache[self.name] = key_value
        return key_value


class ReferenceCaptureAttnProcessor:
    """ReferenceNet attn1: ordinary self-attention that records its input tokens (after norm1) for the backbone."""

    def __init__(self, name: str, capture: Callable[[str, torch.Tensor], None]):
        self.name = name
        self.capture = capture

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.capture(self.name, hidden_states)
        return _SELF_ATTENTION(attn, hidden_states, *args, **kwargs)


_SELF_ATTENTION = AttnProcessor2_0()

"""Reference features, the per-call conditioning state and the reference-attention hooks of EMO.

EMO (arXiv 2402.17485, section 3.2) conditions the backbone on the reference image through *reference attention*:
every spatial self-attention (attn1) of the backbone also attends to the ReferenceNet's attn1 input tokens of the
same layer, keys/values concatenated along the token axis.

How conditioning reaches the layers, whatever attention backend is installed:

* Per-call conditioning (reference tokens or their precomputed keys/values, motion-frame features, speed
  embeddings, face-locator features) is written by the backbone's `forward` into one `ConditioningState` that the
  layers hold a reference to, and cleared when the call returns (no state survives a call). It is plain attribute
  access on a plain object, which `torch.compile(fullgraph=True)` traces (a `ContextVar` is not).
* Reference attention is a forward pre-hook on every attn1 `Attention` *module*, not an attention processor, so any
  processor diffusers installs (SDPA, xformers, sliced, fused QKV, a user's own) keeps it: the hook passes
  `encoder_hidden_states = cat([hidden_states, reference tokens])`, which every processor turns into keys/values
  over both. With `EMOAttnProcessor` installed (the default) the hook passes the reference keys/values projected
  once per video instead (`EMOUNet3DConditionModel.prepare_reference`), an exact shortcut.
* Gradient checkpointing re-runs blocks during backward, after `forward` cleared the state;
  `checkpoint_with_state` re-installs the state captured at forward time for that recomputation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.utils import logging

from emo_pipeline.errors import EMOInputError

logger = logging.get_logger(__name__)

__all__ = [
    "ConditioningState",
    "EMOAttentionSwitches",
    "EMOAttnProcessor",
    "ReferenceAttentionHook",
    "ReferenceFeatures",
    "broadcast_batch",
    "checkpoint_with_state",
    "dispatch_attention",
    "fuse_qkv_projections",
    "install_emo_processors",
    "warn_unswitched_layers",
]


@dataclass
class ReferenceFeatures:
    """What the ReferenceNet hands to the backbone.

    `spatial`: `{attn1 module name: (B, h*w, C)}` attn1 input tokens of the reference image (reference attention).
    `temporal`: `{temporal layer name: (B, n, C, h, w)}` hidden states of the `n` motion frames at every temporal
    layer of the backbone (empty when n = 0).
    `key_value`: `{attn1 module name: ((B, h*w, C'), (B, h*w, C'))}` the reference tokens already projected by that
    layer's `to_k`/`to_v` (`EMOUNet3DConditionModel.prepare_reference`): the tokens and the weights are fixed for a
    whole video at inference, so projecting them once instead of at every frame, step and clip is exact.
    `tiled`: how `spatial`/`key_value` copies map to the backbone's `B*F` rows. False (EMO): copy b serves every
    frame of sample b. True (Hallo's reference bank, `emo_pipeline.hallo`): the copies tile the rows, row i gets copy
    `i % copies`, so with guidance's two copies the frames alternate between them.
    """

    spatial: dict[str, torch.Tensor] = field(default_factory=dict)
    temporal: dict[str, torch.Tensor] = field(default_factory=dict)
    key_value: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    tiled: bool = False

    @property
    def num_motion_frames(self) -> int:
        return next(iter(self.temporal.values())).shape[1] if self.temporal else 0

    def to(self, *args, **kwargs) -> ReferenceFeatures:
        return ReferenceFeatures(
            spatial={k: v.to(*args, **kwargs) for k, v in self.spatial.items()},
            temporal={k: v.to(*args, **kwargs) for k, v in self.temporal.items()},
            key_value={k: (kv[0].to(*args, **kwargs), kv[1].to(*args, **kwargs)) for k, kv in self.key_value.items()},
            tiled=self.tiled,
        )


class ConditioningState:
    """Conditioning of the backbone call in progress; every conditioned layer holds a reference to one instance.

    `reached` is a set while conditioning reach is being recorded (eager calls), else None (compiled calls).
    """

    __slots__ = (
        "num_frames",
        "spatial",
        "key_value",
        "temporal",
        "speed_embeddings",
        "face_features",
        "reached",
        "reference_rows",
        "reference_runs",
        "reference_tiled",
        "audio_module_tokens",
        "audio_module_masks",
        "audio_module_scales",
    )

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.num_frames: int = 1
        self.spatial: dict[str, torch.Tensor] | None = None
        self.key_value: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.temporal: dict[str, torch.Tensor] | None = None
        self.speed_embeddings: torch.Tensor | None = None  # (B, F, l)
        self.face_features: torch.Tensor | None = None  # (B, C, h, w)
        self.reached: set[str] | None = None
        # Checkpoint families other than EMO (all None for EMO):
        # `reference_rows` (B,) bool: which samples attend to the reference (Hallo: not the unconditional branch);
        self.reference_rows: torch.Tensor | None = None
        # `reference_runs`: the same as contiguous row ranges ((start, stop, sees_reference), ...) over the B*F rows,
        # known in Python (`reference_row_runs`), so `EMOAttnProcessor` attends each range to exactly its keys;
        self.reference_runs: tuple[tuple[int, int, bool], ...] | None = None
        # `reference_tiled`: reference copies tile the rows (`ReferenceFeatures.tiled`, Hallo's bank);
        self.reference_tiled: bool = False
        # inputs of Hallo-style audio modules (`emo_pipeline.models.audio_modules`): tokens (B*F, T, C), per-level
        # region masks {level: (B*F, h_l*w_l) x 3 (full, face, lip)} and the three region weights.
        self.audio_module_tokens: torch.Tensor | None = None
        self.audio_module_masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self.audio_module_scales: tuple[float, float, float] | None = None

    def snapshot(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def restore(self, snapshot: tuple) -> None:
        for name, value in zip(self.__slots__, snapshot):
            setattr(self, name, value)

    @contextlib.contextmanager
    def installed(self, snapshot: tuple) -> Iterator[None]:
        previous = self.snapshot()
        self.restore(snapshot)
        try:
            yield
        finally:
            self.restore(previous)

    def mark(self, name: str) -> None:
        if self.reached is not None:
            self.reached.add(name)


def checkpoint_with_state(state: ConditioningState, inner: Callable | None = None) -> Callable:
    """A diffusers `gradient_checkpointing_func` whose recomputation sees the forward call's conditioning."""

    def default(function, *args):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    inner = inner or default

    def gradient_checkpointing_func(module, *args):
        snapshot = state.snapshot()

        def run(*inputs):
            with state.installed(snapshot):
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


def _per_frame(
    tokens: torch.Tensor, batch_frames: int, num_frames: int, name: str, tiled: bool = False
) -> torch.Tensor:
    """`(b, T, C)` per-sample tokens -> `(B*F, T, C)`: the same tokens for every frame of each sample's clip, or
    with `tiled` the b copies tiled over the rows (row i gets copy i % b, Hallo's bank).

    Tokens that already have `B*F` rows are per frame and pass unchanged.
    """
    if tokens.shape[0] == batch_frames:
        return tokens
    if tiled:
        return broadcast_batch(tokens, batch_frames, name)
    tokens = broadcast_batch(tokens, batch_frames // num_frames, name)
    return tokens.repeat_interleave(num_frames, dim=0)


# Backends whose kernels take no attention mask (diffusers raises inside them): a masked layer falls back to "native".
_MASKLESS_BACKEND_PARTS = ("flash", "sage", "aiter", "xla")
_warned_fallbacks: set[str] = set()


def backend_takes_mask(backend: str | AttentionBackendName) -> bool:
    """Whether diffusers' attention backend `backend` accepts an `attn_mask` (flash-attn, sage, aiter, XLA do not)."""
    name = AttentionBackendName(backend).value
    return not any(part in name for part in _MASKLESS_BACKEND_PARTS)


def dispatch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    processor: object | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    layer: str = "attention",
) -> torch.Tensor:
    """`(B, S, H, D)` query/key/value -> `(B, S_q, H, D)` through diffusers' `dispatch_attention_fn`.

    The backend is `processor._attention_backend` (what `model.set_attention_backend(name)` sets), else the active
    one (`with attention_backend(name):`, `DIFFUSERS_ATTN_BACKEND`, "native" by default). A layer that needs a mask
    under a backend whose kernel takes none (flash-attn 2/3/4, `_native_flash`, sage, aiter, XLA) runs on "native"
    instead, with one warning per backend (only the reference attention under guidance has a mask, and only when its
    rows are not known in Python: a compiled backbone given them as a tensor).
    """
    backend = getattr(processor, "_attention_backend", None)
    if attn_mask is not None:
        active = backend if backend is not None else _AttentionBackendRegistry._active_backend
        if not backend_takes_mask(active):
            if not torch.compiler.is_compiling() and str(active) not in _warned_fallbacks:
                _warned_fallbacks.add(str(active))
                logger.warning(
                    f"{layer}: attention backend {AttentionBackendName(active).value!r} takes no attention mask; the "
                    "masked calls (the reference attention under guidance, compiled) run on 'native' SDPA instead"
                )
            backend = AttentionBackendName.NATIVE
    return dispatch_attention_fn(
        query,
        key,
        value,
        attn_mask=attn_mask,
        scale=scale,
        backend=backend,
        parallel_config=getattr(processor, "_parallel_config", None),
    )


class EMOAttnProcessor:
    """EMO's attention processor, on every attention layer of the backbone and the ReferenceNet.

    diffusers' `AttnProcessor2_0` computation, with the kernel chosen by diffusers' attention dispatcher
    (`dispatch_attention_fn`): like diffusers' own processors it carries `_attention_backend` and `_parallel_config`,
    so `model.set_attention_backend("flex")` or `with attention_backend("_native_math"):` selects the kernel of every
    layer (spatial self-attention with the reference, audio cross-attention, temporal attention with the motion frames,
    the speed attention and Hallo's audio modules). `fused=True` (set by `fuse_qkv_projections`) projects with the
    fused `to_qkv` / `to_kv` where the layer has them.

    It also takes precomputed reference keys/values: the keys and values of the layer's own tokens are extended by
    the reference ones, which is what the generic path (`encoder_hidden_states = cat([hidden_states, reference
    tokens])`) computes, minus re-projecting the reference. `reference_runs` (row ranges, `reference_row_runs`) says
    which rows see the reference (Hallo's and EchoMimic's unconditional rows do not): each range gets one kernel call
    over exactly its keys. Without it, an `attention_mask` `(B*F, 1, L + R)` is additive over those keys.
    """

    _attention_backend: AttentionBackendName | None = None
    _parallel_config = None

    def __init__(self, fused: bool = False):
        self.fused = fused

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        reference_key: torch.Tensor | None = None,
        reference_value: torch.Tensor | None = None,
        reference_runs: tuple[tuple[int, int, bool], ...] | None = None,
        num_reference: int = 0,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = self._project(attn, hidden_states, encoder_hidden_states)
        if reference_runs is not None:
            out = self._attend_runs(
                attn, query, key, value, reference_key, reference_value, reference_runs, num_reference
            )
        else:
            out = self._attend(attn, query, key, value, attention_mask, reference_key, reference_value, batch)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend_runs(self, attn, query, key, value, reference_key, reference_value, runs, num_reference):
        """Rows that see the reference attend to their own and the reference keys, the others to their own only
        (no masked-out reference keys computed: Hallo's and EchoMimic's unconditional branch)."""
        own = key.shape[1] - num_reference  # with `num_reference`, the keys already end with the reference's
        pieces = []
        for start, stop, sees in runs:
            k, v = key[start:stop], value[start:stop]
            if not sees:
                k, v = k[:, :own], v[:, :own]
            elif reference_key is not None:
                k = torch.cat([k, reference_key[start:stop].to(k.dtype)], dim=1)
                v = torch.cat([v, reference_value[start:stop].to(v.dtype)], dim=1)
            pieces.append(self._attend(attn, query[start:stop], k, v, None, None, None, stop - start))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _attend(self, attn, query, key, value, attention_mask, reference_key, reference_value, batch):
        if reference_key is not None and reference_value is not None:
            key = torch.cat([key, reference_key.to(key.dtype)], dim=1)
            value = torch.cat([value, reference_value.to(value.dtype)], dim=1)
            mask = attention_mask[:, None].to(query.dtype) if attention_mask is not None else None
        elif attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        else:
            mask = None
        query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = dispatch_attention(query, key, value, self, mask, attn.scale, type(attn).__name__)
        return out.flatten(2, 3).to(query.dtype)

    def _project(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        if self.fused and encoder_hidden_states is None and hasattr(attn, "to_qkv"):
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if self.fused and hasattr(attn, "to_kv"):
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        return query, key, value


# diffusers' plain defaults, replaced by EMO's processor (the processor API's "default" / "off" switches set these).
_PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def install_emo_processors(model: torch.nn.Module, force: bool = False) -> None:
    """Put `EMOAttnProcessor` on every attention layer of `model` that has diffusers' plain default (all with
    `force`); other processors (sliced, xformers, fused, a user's) are left as they are."""
    for module in model.modules():
        if isinstance(module, Attention) and (force or type(module.processor) in _PLAIN_PROCESSORS):
            module.set_processor(EMOAttnProcessor())


def warn_unswitched_layers(model: torch.nn.Module, backend: str) -> None:
    """After `set_attention_backend`: warn once if some layers have a processor the dispatcher does not reach
    (sliced, xformers through the processor API, a user's), which therefore do not run `backend`."""
    others = sorted(
        {
            type(module.processor).__name__
            for module in model.modules()
            if isinstance(module, Attention) and not hasattr(module.processor, "_attention_backend")
        }
    )
    if others:
        logger.warning(
            f"{type(model).__name__}.set_attention_backend({backend!r}): layers with {others} keep their own kernel; "
            "call set_default_attn_processor() first for the backend to apply to every layer"
        )


class EMOAttentionSwitches:
    """diffusers' attention switches for EMO's networks (mixed in before the diffusers model class).

    EMO's dispatching processor is the default: `set_default_attn_processor()` and turning slicing or xformers off put
    it back; `fuse_qkv_projections()` keeps it (fused); `set_attention_backend()` reaches every layer.
    """

    _reference_layer_names: list[str] = []  # attn1 layers that get a fused `to_kv` for the reference tokens

    def set_default_attn_processor(self) -> None:
        """EMO's processor everywhere: SDPA through diffusers' attention dispatcher (the backend set by
        `set_attention_backend` / `attention_backend(...)`), reference attention kept on attn1."""
        install_emo_processors(self, force=True)

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' switch: every EMO processor of the model runs `backend` (README, "Attention backends")."""
        super().set_attention_backend(backend)
        warn_unswitched_layers(self, backend)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Callable | None = None) -> None:
        super().set_use_memory_efficient_attention_xformers(valid, attention_op)
        if not valid:
            install_emo_processors(self)

    def set_attention_slice(self, slice_size: str | int | list[int] | None = "auto") -> None:
        """Sliced attention as in `UNet2DConditionModel` (diffusers' `UNetMotionModel` has none); None turns it off."""
        UNet2DConditionModel.set_attention_slice(self, slice_size)
        if slice_size is None:
            install_emo_processors(self)

    def compile_repeated_blocks(self, *args, **kwargs) -> None:
        """diffusers' regional compilation: `torch.compile` every transformer block (`_repeated_blocks`), not the
        whole model (much shorter cold start).

        Blocks differ in width, token count and layout, and the reference hooks are per layer, so dynamo keeps up to
        one graph per block instance: the recompile limit (`torch._dynamo.config.recompile_limit`) is raised to the
        number of blocks, else `fullgraph=True` would fail at the ninth variant.
        """
        blocks = sum(type(module).__name__ in self._repeated_blocks for module in self.modules())
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 2 * blocks + 8)
        super().compile_repeated_blocks(*args, **kwargs)

    def fuse_qkv_projections(self) -> None:
        """Fused QKV projections (diffusers' switch), the attention backend kept (`EMOAttnProcessor(fused=True)`);
        the backbone's attn1 layers also get a fused `to_kv` for the reference tokens; quantized layers stay
        unfused."""
        fuse_qkv_projections(self, self._reference_layer_names)


def is_quantized(linear: torch.nn.Module) -> bool:
    """Whether a projection's weight is not a plain dense tensor (torchao's tensor subclasses, bitsandbytes'
    packed `Params4bit` / `Int8Params`): it cannot be concatenated or copied into a new `Linear`."""
    weight = getattr(linear, "weight", None)
    return weight is None or type(weight) not in (torch.Tensor, torch.nn.Parameter)


def fuse_qkv_projections(model: torch.nn.Module, reference_layers: list[str] = ()) -> None:
    """diffusers' `fuse_qkv_projections` for EMO's networks: fused `to_qkv` (self-attention) / `to_kv`
    (cross-attention), the reference layers' `to_kv` too (`add_fused_key_value`), `EMOAttnProcessor(fused=True)`
    everywhere (so the attention backend still applies). Layers with quantized projections stay unfused: their packed
    weights cannot be concatenated (they keep `to_q`/`to_k`/`to_v`). `unfuse_qkv_projections` restores the processors.
    """
    processors = model.attn_processors
    model.original_attn_processors = processors
    reference_layers = set(reference_layers)
    fused = {}
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        if not any(is_quantized(linear) for linear in (module.to_q, module.to_k, module.to_v)):
            module.fuse_projections(fuse=True)
            if name in reference_layers:
                add_fused_key_value(module)
        fused[f"{name}.processor"] = EMOAttnProcessor(fused=True)
    model.set_attn_processor({name: fused.get(name, processor) for name, processor in processors.items()})


def is_supported_reference_layer(attn: Attention) -> bool:
    """attn1 layers of SD-style transformer blocks: token input, no group/spatial norm, no added K/V."""
    return attn.spatial_norm is None and attn.group_norm is None and attn.added_kv_proj_dim is None


class ReferenceAttentionHook:
    """Forward pre-hook of a backbone attn1 module: makes its self-attention also attend to the reference tokens.

    Works with any attention processor (see the module docstring); with none set in the state it changes nothing,
    so the layer is plain SD self-attention.
    """

    def __init__(self, name: str, state: ConditioningState):
        self.name = name
        self.state = state

    def __call__(self, attn: Attention, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.state
        if state.spatial is None and state.key_value is None:
            return None
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if kwargs.get("encoder_hidden_states") is not None or kwargs.get("attention_mask") is not None:
            raise NotImplementedError(f"{self.name}: reference attention is self-attention without a mask")
        batch_frames = hidden_states.shape[0]
        kwargs = dict(kwargs)
        cached = state.key_value.get(self.name) if state.key_value is not None else None
        tiled = state.reference_tiled
        own_processor = isinstance(attn.processor, EMOAttnProcessor)
        runs = state.reference_runs if own_processor else None
        if cached is not None and own_processor:
            key, value = (_per_frame(t, batch_frames, state.num_frames, self.name, tiled) for t in cached)
            kwargs["reference_key"], kwargs["reference_value"] = key, value
            if runs is not None:
                kwargs["reference_runs"] = runs
            elif state.reference_rows is not None:
                kwargs["attention_mask"] = _reference_row_mask(
                    state.reference_rows, hidden_states, key.shape[1], state.num_frames
                )
        else:
            tokens = state.spatial.get(self.name) if state.spatial is not None else None
            if tokens is None:
                raise EMOInputError(
                    f"reference_features.spatial has no entry for layer {self.name!r}; it must come from a "
                    "ReferenceNet built from the same SD UNet as the backbone"
                )
            tokens = _per_frame(tokens.to(hidden_states.dtype), batch_frames, state.num_frames, self.name, tiled)
            kwargs["encoder_hidden_states"] = torch.cat([hidden_states, tokens], dim=1)
            if runs is not None:
                kwargs["reference_runs"], kwargs["num_reference"] = runs, tokens.shape[1]
            elif state.reference_rows is not None:
                kwargs["attention_mask"] = _reference_row_mask(
                    state.reference_rows, hidden_states, tokens.shape[1], state.num_frames
                )
        state.mark(self.name)
        return args, kwargs


def reference_row_runs(
    rows: torch.Tensor | tuple[bool, ...] | list[bool] | None, num_frames: int
) -> tuple[tuple[int, int, bool], ...] | None:
    """`(B,)` bool (which samples see the reference) -> contiguous ranges `(start, stop, sees)` of the `B*F` rows.

    None when there are no rows, or when `rows` is a tensor under `torch.compile` (its values are not known while
    tracing: the layers then use the additive mask of `_reference_row_mask`, the same result).
    """
    if rows is None:
        return None
    if isinstance(rows, torch.Tensor):
        if torch.compiler.is_compiling():
            return None
        rows = rows.tolist()
    runs: list[list] = []
    for sample, sees in enumerate(bool(r) for r in rows):
        if runs and runs[-1][2] == sees:
            runs[-1][1] = (sample + 1) * num_frames
        else:
            runs.append([sample * num_frames, (sample + 1) * num_frames, sees])
    return tuple(tuple(run) for run in runs)


def _reference_row_mask(
    rows: torch.Tensor, hidden_states: torch.Tensor, num_reference: int, num_frames: int
) -> torch.Tensor:
    """Additive mask `(B*F, 1, L + R)`: samples with `rows[b]` False do not see the R reference keys.

    A key masked with -inf gets exactly zero weight, so those samples get plain self-attention.
    """
    batch_frames, length = hidden_states.shape[:2]
    hidden = ~rows.to(device=hidden_states.device, dtype=torch.bool).repeat_interleave(num_frames)
    mask = torch.zeros(batch_frames, 1, length + num_reference, device=hidden_states.device, dtype=hidden_states.dtype)
    mask[:, :, length:] = torch.where(hidden[:, None, None], float("-inf"), 0.0).to(mask.dtype)
    return mask


def reference_key_value(attn: Attention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's keys/values of `(B, T, C)` reference tokens, as its processor would project them."""
    if getattr(attn.processor, "fused", False) and hasattr(attn, "to_kv"):
        key, value = attn.to_kv(tokens).chunk(2, dim=-1)
        return key, value
    return attn.to_k(tokens), attn.to_v(tokens)


def check_reference_tokens(name: str, tokens: torch.Tensor | None, attn: Attention) -> None:
    if tokens is None:
        raise EMOInputError(
            f"reference_features.spatial has no entry for layer {name!r}; it must come from a ReferenceNet built "
            "from the same SD UNet as the backbone"
        )
    if tokens.ndim != 3 or tokens.shape[-1] != attn.to_k.in_features:
        raise EMOInputError(
            f"reference_features.spatial[{name!r}] must have shape (B, tokens, {attn.to_k.in_features}), "
            f"got {tuple(tokens.shape)}"
        )


def add_fused_key_value(attn: Attention) -> None:
    """Give a fused self-attention layer the fused `to_kv` that diffusers builds only for cross-attention.

    The reference hook passes the reference tokens to attn1 as `encoder_hidden_states`, which a fused processor
    projects with `to_kv`. A layer with quantized `to_k`/`to_v` (packed weights, no dense `.weight.data`) gets none:
    the processors then project with `to_k` and `to_v`.
    """
    if is_quantized(attn.to_k) or is_quantized(attn.to_v):
        return
    weight = torch.cat([attn.to_k.weight.data, attn.to_v.weight.data])
    attn.to_kv = torch.nn.Linear(
        weight.shape[1], weight.shape[0], bias=attn.use_bias, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        attn.to_kv.weight.copy_(weight)
        if attn.use_bias:
            attn.to_kv.bias.copy_(torch.cat([attn.to_k.bias.data, attn.to_v.bias.data]))

"""Step caching for the EMO backbone: DeepCache (Ma et al. 2023, arXiv 2312.00858), training-free and opt-in.

Adjacent denoising steps change the UNet's deep, low-resolution features little. DeepCache runs the whole UNet at
one step in every `interval` ("full" steps) and, at the steps between ("cached" steps), only its shallow path:
`conv_in`, the first down block, the last up block and `conv_out`. The last up block gets the fresh skip features of
the first down block and, in place of the output of the up block below it, that output as computed at the last full
step (DeepCache's branch 0). The deep blocks (down blocks 1.., the mid block, up blocks ..-2) do not run at all.

It rides on diffusers' model-hook registry (`diffusers.hooks.HookRegistry`), which swaps a module's `forward` and
puts it back on removal, so diffusers' `UNetMotionModel.forward` runs unchanged and no UNet code is copied:

* a hook on the backbone decides, before every call, whether the step is full or cached;
* a hook on each deep block runs it and keeps its output on a full step, and returns the kept output on a cached
  step without running the block.

diffusers' own step caches (first-block cache, FasterCache, TaylorSeer, MagCache, ...) look for the transformer-block
lists of DiT models and do not apply to a UNet; its pyramid attention broadcast does, but skips only attention, a
small share of a UNet's work at EMO's resolutions.

A cached step reuses features computed from the same conditioning: the cache holds the conditioning objects of its
last full step (reference features, audio tokens, face features, speed embeddings, sample shape) and makes the
step full whenever one of them is not the very same object (a new clip, a callback's new motion frames, guidance
switched off, which halves the batch). The conditioned layers inside a skipped block are therefore marked as
reached for the backbone's conditioning check: their conditioning is in the reused features.

The result is an approximation: frames differ from the uncached run (see benchmarks/README.md for how much).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from emo_pipeline.errors import EMOInputError

__all__ = ["StepCache", "StepCacheConfig", "check_step_cache_interval", "with_step_cache"]

_HOOK_NAME = "emo_step_cache"
# Inputs of the backbone that define a step's conditioning; a cached step needs the same objects as its full step.
_CONDITIONING_INPUTS = (
    "reference_features",
    "audio_tokens",
    "audio_features",
    "face_features",
    "face_mask",
    "speed_embeddings",
    "speed",
)


def check_step_cache_interval(interval: Any) -> None:
    """Raise `EMOInputError` unless `interval` is None (off) or an int >= 1 (1: every step full, the same output)."""
    if interval is None:
        return
    if not isinstance(interval, numbers.Integral) or isinstance(interval, bool) or interval < 1:
        raise EMOInputError(
            f"step_cache must be None (off) or an int >= 1, the number of denoising steps one full backbone run "
            f"serves (e.g. 2 or 3), got {interval!r}"
        )


@dataclass
class StepCacheConfig:
    """EMO's step cache through diffusers' cache API: `pipe.unet.enable_cache(StepCacheConfig(interval=2))`,
    `pipe.unet.disable_cache()`. The hooks stay installed across videos (reset at the end of each); the same as
    passing `step_cache=interval` to every call. Works with a regionally compiled backbone (`pipe.compile()`)."""

    interval: int = 2

    def __post_init__(self) -> None:
        check_step_cache_interval(self.interval)
        if self.interval is None:
            raise EMOInputError("StepCacheConfig needs an interval (int >= 1)")


class StepCache:
    """DeepCache on an `EMOUNet3DConditionModel`: while installed, the deep blocks run at one step in `interval`.

    Use as a context manager (`with StepCache(unet, 3): ...`) or `install()` / `remove()`; removal restores the
    backbone exactly. `reset()` makes the next step full (it also happens by itself when the conditioning changes).
    `full_steps` and `cached_steps` count the backbone calls of each kind since installation.
    """

    def __init__(self, unet: torch.nn.Module, interval: int):
        check_step_cache_interval(interval)
        if interval is None:
            raise EMOInputError("StepCache needs an interval (int >= 1); pass step_cache=None to the pipeline for off")
        if getattr(unet, "_compiled_call_impl", None) is not None:
            # The hooks' Python bookkeeping (which step is full, the kept outputs) is not traced or tested under
            # torch.compile: refuse rather than risk a recompilation per step or a silently stale graph.
            raise EMOInputError(
                "step_cache does not work with a backbone compiled whole (pipe.compile(regional=False), "
                "torch.compile(unet)); compile it regionally (pipe.compile(), the default) or not at all"
            )
        self.unet = unet
        self.interval = int(interval)
        self.full_steps = 0
        self.cached_steps = 0
        self.reusing = False  # whether the backbone call in progress is a cached step
        self._since_full = 0
        self._key: tuple | None = None
        self._blocks: list[torch.nn.Module] = []
        self._installed = False

    # --------------------------------------------------------------------------------------------- install

    def deep_blocks(self) -> dict[str, torch.nn.Module]:
        """The blocks a cached step skips, by name: down blocks 1.., the mid block and up blocks ..-2."""
        unet = self.unet
        blocks = {f"down_blocks.{i}": block for i, block in enumerate(unet.down_blocks) if i > 0}
        if unet.mid_block is not None:
            blocks["mid_block"] = unet.mid_block
        blocks.update({f"up_blocks.{i}": block for i, block in enumerate(unet.up_blocks[:-1])})
        return blocks

    def install(self) -> StepCache:
        if self._installed:
            return self
        for module in (self.unet, *self.deep_blocks().values()):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(_HOOK_NAME) is not None:
                raise RuntimeError(
                    "a step cache is already installed on this backbone (another generation still running?)"
                )
        conditioned = [*self.unet.reference_layer_names, *self.unet.temporal_layers]
        HookRegistry.check_if_exists_or_initialize(self.unet).register_hook(_StepHook(self), _HOOK_NAME)
        self._blocks = [self.unet]
        for name, block in self.deep_blocks().items():
            inside = [layer for layer in conditioned if layer.startswith(name + ".")]
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_DeepBlockHook(self, inside), _HOOK_NAME)
            self._blocks.append(block)
        self._installed = True
        self.reset()
        return self

    def remove(self) -> None:
        """Take the hooks off: the backbone is as before `install` (and the kept features are freed)."""
        for module in self._blocks:
            module._diffusers_hook.remove_hook(_HOOK_NAME, recurse=False)
        self._blocks = []
        self._installed = False
        self.reset()

    def __enter__(self) -> StepCache:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.remove()

    # ------------------------------------------------------------------------------------------------ steps

    def reset(self) -> None:
        """Forget the kept features: the next backbone call is a full step."""
        self._key = None
        self._since_full = 0
        self.reusing = False
        for module in self._blocks[1:]:
            module._diffusers_hook.get_hook(_HOOK_NAME).output = None

    def begin_step(self, args: tuple, kwargs: dict) -> None:
        """Decide whether the backbone call with these inputs is a full or a cached step."""
        sample = args[0] if args else kwargs["sample"]
        key = (tuple(sample.shape), sample.dtype, sample.device, *(kwargs.get(name) for name in _CONDITIONING_INPUTS))
        same = self._key is not None and len(key) == len(self._key)
        same = same and key[:3] == self._key[:3] and all(a is b for a, b in zip(key[3:], self._key[3:]))
        self.reusing = same and self._since_full < self.interval - 1
        if self.reusing:
            self._since_full += 1
            self.cached_steps += 1
        else:
            self._key = key
            self._since_full = 0
            self.full_steps += 1

    def end_step(self) -> None:
        self.reusing = False


class _StepHook(ModelHook):
    """On the backbone: one decision per call (full or cached step). Stateful for diffusers: the pipeline's
    `maybe_free_model_hooks` (end of every video) resets it, so a next video starts with a full step."""

    _is_stateful = True

    def __init__(self, cache: StepCache):
        super().__init__()
        self.cache = cache

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.cache.reset()
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.cache.begin_step(args, kwargs)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.cache.end_step()


class _DeepBlockHook(ModelHook):
    """On a deep block: run and keep its output on a full step, return the kept output on a cached one."""

    def __init__(self, cache: StepCache, conditioned_layers: list[str]):
        super().__init__()
        self.cache = cache
        self.conditioned_layers = conditioned_layers
        self.output: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.cache.reusing and self.output is not None:
            state = self.cache.unet._conditioning
            for name in self.conditioned_layers:  # their conditioning is in the kept features (same objects)
                state.mark(name)
            return self.output
        self.output = self.fn_ref.original_forward(*args, **kwargs)
        return self.output


def with_step_cache(unet: torch.nn.Module, interval: int | None, clips: Iterator) -> Iterator:
    """Run the clip generator `clips` with a `StepCache` of `interval` on `unet` (None: as it is), removed after.

    Checks the interval and the backbone now (an `EMOInputError` at call time); installs the hooks when the first
    clip is requested and removes them when the generator ends, fails or is closed.
    """
    if interval is None:
        return clips
    cache = StepCache(unet, interval)

    def run() -> Iterator:
        with cache:
            yield from clips

    return run()


# diffusers' cache configs that do not fit EMO's UNet backbone, and why (`enable_cache` refuses them with this text).
_BLOCK_LIST = (
    "it works on a DiT's top-level list of identical transformer blocks, and EMO's backbone is a UNet (down, mid "
    "and up blocks of changing resolution joined by skip connections)"
)
UNFIT_DIFFUSERS_CACHES = {
    "FirstBlockCacheConfig": _BLOCK_LIST,
    "MagCacheConfig": _BLOCK_LIST + " (it finds no blocks to hook and would change nothing)",
    "SeaCacheConfig": _BLOCK_LIST,
    "FasterCacheConfig": (
        "its attention identifiers name a DiT's top-level blocks and its guidance approximation splits the batch of "
        "the denoiser inputs diffusers knows, not EMO's conditioning (audio tokens, reference keys/values, motion "
        "frames); on this backbone it changed nothing. PyramidAttentionBroadcastConfig is its attention broadcast "
        "without the guidance part"
    ),
    "TextKVCacheConfig": (
        "it caches a text prompt's cross-attention keys/values; EMO's audio tokens change with every clip and the "
        "reference keys/values are already projected once per video"
    ),
}
#: `TaylorSeerCacheConfig(cache_identifiers=TAYLORSEER_IDENTIFIERS)`: EMO's spatial attention layers (diffusers'
#: default identifiers name a DiT's blocks and match nothing in the UNet).
TAYLORSEER_IDENTIFIERS = [r".*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]"]


def check_diffusers_cache(config: Any) -> None:
    """Raise `EMOInputError` for a diffusers cache config that does not fit EMO's backbone (the reasons:
    `UNFIT_DIFFUSERS_CACHES`)."""
    reason = UNFIT_DIFFUSERS_CACHES.get(type(config).__name__)
    if reason is not None:
        raise EMOInputError(
            f"{type(config).__name__} does not fit EMO's backbone: {reason}. Fitting caches: "
            "PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig(cache_identifiers="
            "emo_pipeline.models.step_cache.TAYLORSEER_IDENTIFIERS), StepCacheConfig (README, Speed "
            "switches)"
        )


def hooked_layers(model: torch.nn.Module) -> list[str]:
    """Names of the submodules of `model` carrying a diffusers hook (the model itself excluded)."""
    return [
        name
        for name, module in model.named_modules()
        if name and getattr(module, "_diffusers_hook", None) is not None and module._diffusers_hook.hooks
    ]

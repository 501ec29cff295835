"""Where a module computes, read at call time, under any of diffusers' offloading schemes.

With `pipe.enable_model_cpu_offload()` a model is parked on the CPU until its `forward` moves it to the
accelerator; with `enable_sequential_cpu_offload()` its weights sit on the "meta" device and each leaf module's
hook loads them for its own call; with group offloading (`enable_group_offload`) groups of layers are moved to the
onload device by hooks. In every case `next(module.parameters()).device` says where the weights are parked, not
where the computation runs. Code that calls a submodule directly, or builds an input for a model, asks here.
"""

from __future__ import annotations

import torch

__all__ = ["compute_device", "has_offload_hooks", "offloaded_tensor"]


def _accelerate_hooks(module: torch.nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # accelerate's SequentialHook holds several


def compute_device(module: torch.nn.Module) -> torch.device:
    """The device `module`'s forward runs on: an offload hook's execution/onload device (accelerate's model or
    sequential CPU offload, diffusers' group offloading) on the module or one of its submodules, else the device of
    its first parameter or buffer (CPU for a module without either)."""
    for submodule in module.modules():
        for hook in _accelerate_hooks(submodule):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return torch.device(device)
    try:
        from diffusers.hooks.group_offloading import _get_group_onload_device
    except ImportError:  # pragma: no cover - older diffusers without group offloading
        pass
    else:
        try:
            return _get_group_onload_device(module)
        except ValueError:  # no group offloading on this module
            pass
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def offloaded_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """`module.<name>` (a direct parameter or buffer) with real data, for use outside the module's forward.

    Under accelerate's sequential offload the attribute is an empty "meta" tensor between calls, and the weights
    live in the module's hook (`weights_map`); this returns them from there. Elsewhere it is the attribute itself.
    """
    tensor = getattr(module, name)
    if tensor is None or not tensor.is_meta:
        return tensor
    for hook in _accelerate_hooks(module):
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is not None and name in weights_map:
            return weights_map[name]
    raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device and no offload hook holds its data")


def has_offload_hooks(module: torch.nn.Module) -> bool:
    """Whether an offload hook (accelerate's model or sequential CPU offload, diffusers' group offloading) manages
    `module` or one of its submodules: then its weights are only guaranteed present inside its hooked forwards."""
    for submodule in module.modules():
        if _accelerate_hooks(submodule):
            return True
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is not None and any(
            registry.get_hook(name) is not None for name in ("group_offloading", "lazy_prefetch_group_offloading")
        ):
            return True
    return False

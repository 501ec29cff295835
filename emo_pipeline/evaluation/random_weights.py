"""Seeded stand-in weights for the metric networks (tests and golden generators, where the published files are absent).

Every tensor of a state dict is filled from its own generator, seeded by `seed` and the tensor's name, so that two
modules with the same parameter names and shapes (ours and a reference implementation's) get identical values
whatever order they build their layers in.
"""

from __future__ import annotations

import zlib

import torch

__all__ = ["fill_seeded"]


@torch.no_grad()
def fill_seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every float parameter and buffer of `module` with name-seeded values; returns `module` (in eval mode).

    Weights get `N(0, 2/fan_in)` (He), biases `N(0, 0.02^2)`, normalisation scales `1 + N(0, 0.1^2)`, running means
    `N(0, 0.1^2)` and running variances `U(0.5, 1.5)`, so activations stay finite through deep stacks.
    """
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        leaf = name.rsplit(".", 1)[-1]
        shape = tensor.shape
        if leaf == "running_var":
            value = 0.5 + torch.rand(shape, generator=generator)
        elif leaf == "running_mean":
            value = 0.1 * torch.randn(shape, generator=generator)
        elif tensor.ndim >= 2:
            fan_in = max(1, tensor[0].numel())
            value = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif leaf == "weight":
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            value = 0.02 * torch.randn(shape, generator=generator)
        tensor.data.copy_(value.to(tensor.dtype))
    return module.eval()

"""The EchoMimic goldens' random weights, regenerated from a seed (pure torch; shared by the generator and tests).

Every tensor named in the goldens' `metadata.json` `weight_spec` (in that order) is drawn from one seeded CPU
generator and rounded to fp16 values, so the committed goldens need not carry ~15 MB of weights. Only the motion
modules' stored sinusoid tables (`pos_encoder.pe`, EchoMimic's buffers, saved in its checkpoints) are kept as built
and committed (`buffers.safetensors`).
"""

from __future__ import annotations

import torch

WEIGHT_GAIN = 0.7  # std of a matrix = WEIGHT_GAIN / sqrt(fan_in): keeps the tiny nets' activations O(1)


def random_tensor(name: str, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    """Matrices: N(0, gain^2 / fan_in); 1-d `*weight` (norm scales): 1 + 0.1 N; other 1-d: 0.1 N; fp16 values."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(shape) >= 2:
        fan_in = 1
        for size in shape[1:]:
            fan_in *= size
        value = WEIGHT_GAIN * noise / fan_in**0.5
    elif name.endswith("weight"):
        value = 1.0 + 0.1 * noise
    else:
        value = 0.1 * noise
    return value.half().float()


def random_state_dict(spec: list[list], seed: int) -> dict[str, torch.Tensor]:
    """`[[name, shape], ...]` -> `{name: tensor}`, drawn in order from `torch.Generator().manual_seed(seed)`."""
    generator = torch.Generator().manual_seed(seed)
    return {name: random_tensor(name, list(shape), generator) for name, shape in spec}


def checksum(state: dict[str, torch.Tensor], prefix: str) -> float:
    """Sum of |values| of the tensors under `prefix` (detects a spec or RNG mismatch)."""
    return float(sum(v.double().abs().sum() for k, v in state.items() if k.startswith(prefix)))

"""Named quantization recipes for `EMOPipeline.from_pretrained(..., quantization_config=...)` and `--quantize`.

They build diffusers' `PipelineQuantizationConfig` for the two UNets (the backbone and the ReferenceNet hold nearly all
weights; the VAE, wav2vec2 and the small projections stay in the load dtype). torchao's configs are passed as objects
(`TorchAoConfig(Int8WeightOnlyConfig())`), the form torchao >= 0.13 wants.

| name | backend | runs on | notes |
| --- | --- | --- | --- |
| `int8` | torchao int8 weight-only | CPU and GPU | tested in CI (frames vs unquantized: tests/test_quantization.py) |
| `fp8` | torchao float8 weight-only | GPU (compute capability >= 8.9) | GPU path, not run in CI |
| `int4` | torchao int4 weight-only | GPU (CUDA) | GPU path, not run in CI |
| `bnb-8bit`, `bnb-4bit` | bitsandbytes | GPU (CUDA/XPU) | extra `.[bitsandbytes]`; refused on a machine without one |

bitsandbytes (>= 0.46) has a CPU backend, but diffusers 0.42's bitsandbytes quantizer refuses to load without a GPU
("No GPU found. A GPU is needed for quantization."), so `EMOPipeline.from_pretrained(..., quantization_config=...)`
with a bitsandbytes config is refused up front on such a machine (`EMOInputError` naming the CPU recipe, `int8`).
`replace_linear_with_bitsandbytes` builds the same layers in place on any device (what the GPU loader produces):
the tests run EMO's networks, fused projections included, on them on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from emo_pipeline.errors import EMOInputError

__all__ = [
    "QUANTIZATION_RECIPES",
    "check_quantization",
    "check_quantization_config",
    "quantization_config",
    "replace_linear_with_bitsandbytes",
]

QUANTIZATION_RECIPES = ("int8", "fp8", "int4", "bnb-8bit", "bnb-4bit")
COMPONENTS = ("unet", "reference_net")


def check_quantization(name: str | None) -> None:
    """Raise `EMOInputError` unless `name` is None or a recipe whose library is installed."""
    if name is None:
        return
    if name not in QUANTIZATION_RECIPES:
        raise EMOInputError(f"quantize: unknown recipe {name!r}; choose one of {list(QUANTIZATION_RECIPES)}")
    if name.startswith("bnb"):
        _check_bitsandbytes_device(f"quantize={name!r}")
    library, extra = ("bitsandbytes", "bitsandbytes") if name.startswith("bnb") else ("torchao", "quantization")
    try:
        __import__(library)
    except ImportError as error:
        raise EMOInputError(f"quantize={name!r} needs {library}: pip install emo-pipeline[{extra}]") from error


def _has_bitsandbytes_gpu() -> bool:
    """Whether diffusers' bitsandbytes quantizer accepts this machine (its own test: CUDA or XPU)."""
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _check_bitsandbytes_device(what: str) -> None:
    if not _has_bitsandbytes_gpu():
        raise EMOInputError(
            f"{what}: diffusers' bitsandbytes quantizer loads only onto a GPU (CUDA or XPU) and this machine has "
            "none (bitsandbytes' own CPU backend is not used by diffusers' loader); on a CPU use the torchao recipe: "
            "quantization_config('int8') / --quantize int8"
        )


def _uses_bitsandbytes(config: Any) -> bool:
    """Whether a `PipelineQuantizationConfig` (or a single model's config) quantizes with bitsandbytes."""
    configs = [config, *(getattr(config, "quant_mapping", None) or {}).values()]
    names = [str(getattr(config, "quant_backend", None) or "")]
    names += [str(getattr(getattr(c, "quant_method", ""), "value", getattr(c, "quant_method", ""))) for c in configs]
    return any("bitsandbytes" in name for name in names)


def check_quantization_config(config: Any) -> None:
    """Raise `EMOInputError` for a `quantization_config` this machine cannot load (bitsandbytes without a GPU:
    diffusers' loader would fail deep inside with `RuntimeError: No GPU found`)."""
    if config is not None and _uses_bitsandbytes(config):
        _check_bitsandbytes_device("quantization_config uses bitsandbytes")


def quantization_config(name: str, components: tuple[str, ...] = COMPONENTS) -> Any:
    """diffusers' `PipelineQuantizationConfig` for recipe `name` (see the module table) on `components`."""
    from diffusers import PipelineQuantizationConfig

    check_quantization(name)
    if name.startswith("bnb"):
        from diffusers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_8bit=True) if name == "bnb-8bit" else BitsAndBytesConfig(load_in_4bit=True)
    else:
        from diffusers import TorchAoConfig
        from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig

        recipe = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig, "int4": Int4WeightOnlyConfig}[name]
        config = TorchAoConfig(recipe())
    return PipelineQuantizationConfig(quant_mapping=dict.fromkeys(components, config))


def replace_linear_with_bitsandbytes(model: torch.nn.Module, recipe: str) -> torch.nn.Module:
    """Swap every `nn.Linear` of `model` for bitsandbytes' layer of `recipe` ("bnb-8bit": `Linear8bitLt`, LLM.int8
    without outliers kept in fp16; "bnb-4bit": `Linear4bit` NF4 computing in the weights' dtype), the weights quantized
    on `model`'s device: the layers diffusers' loader builds on a GPU, here on any device bitsandbytes supports (its
    CPU backend included). In place; returns `model`."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            bias = child.bias is not None
            if recipe == "bnb-8bit":
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias, has_fp16_weights=False)
            elif recipe == "bnb-4bit":
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias, compute_dtype=child.weight.dtype, quant_type="nf4"
                )
            else:
                raise EMOInputError(f"recipe must be 'bnb-8bit' or 'bnb-4bit', got {recipe!r}")
            layer.load_state_dict(child.state_dict())
            setattr(module, child_name, layer.to(child.weight.device).requires_grad_(False))
    return model

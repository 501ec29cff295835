"""Named quantization recipes for `EMOPipeline.from_pretrained(..., quantization_config=...)` and `--quantize`.

They build diffusers' `PipelineQuantizationConfig` for the two UNets (the backbone and the ReferenceNet hold nearly all
weights; the VAE, wav2vec2 and the small projections stay in the load dtype). torchao's configs are passed as objects
(`TorchAoConfig(Int8WeightOnlyConfig())`), the form torchao >= 0.13 wants.

| name | backend | runs on | notes |
| --- | --- | --- | --- |
| `int8` | torchao int8 weight-only | CPU and GPU | tested in CI (frames vs unquantized: tests/test_quantization.py) |
| `fp8` | torchao float8 weight-only | GPU (compute capability >= 8.9) | GPU path, not run in CI |
| `int4` | torchao int4 weight-only | GPU (CUDA) | GPU path, not run in CI |
| `bnb-8bit`, `bnb-4bit` | bitsandbytes | GPU | needs `pip install bitsandbytes`; not run in CI |
"""

from __future__ import annotations

from typing import Any

from emo_pipeline.errors import EMOInputError

__all__ = ["QUANTIZATION_RECIPES", "check_quantization", "quantization_config"]

QUANTIZATION_RECIPES = ("int8", "fp8", "int4", "bnb-8bit", "bnb-4bit")
COMPONENTS = ("unet", "reference_net")


def check_quantization(name: str | None) -> None:
    """Raise `EMOInputError` unless `name` is None or a recipe whose library is installed."""
    if name is None:
        return
    if name not in QUANTIZATION_RECIPES:
        raise EMOInputError(f"quantize: unknown recipe {name!r}; choose one of {list(QUANTIZATION_RECIPES)}")
    library = "bitsandbytes" if name.startswith("bnb") else "torchao"
    try:
        __import__(library)
    except ImportError as error:
        raise EMOInputError(
            f"quantize={name!r} needs {library}: pip install {library} (or emo-pipeline[quantization])"
        ) from error


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

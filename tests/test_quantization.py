"""Quantized loading as diffusers users do it: `EMOPipeline.from_pretrained(..., quantization_config=...)`.

torchao int8 weight-only runs on a CPU, so CI compares the frames of the quantized pipeline with the unquantized one
(bound below, measured: max 0.023, mean 0.0017 on [0, 1] frames of the tiny random pipeline). fp8 and int4 are GPU
paths (README, "Speed switches"). bitsandbytes: diffusers' loader refuses it without a GPU, so on a CPU it is refused
up front with the fix named; its layers (built in place, `replace_linear_with_bitsandbytes`) are checked against EMO's
networks where bitsandbytes is installed (extra `.[bitsandbytes]`, not in `test`). Memory:
benchmarks/results/quantization_tiny.json (`benchmarks/bench_quantization.py`).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("torchao")  # in the test extra; skipped only where a user runs the tests without it

from emo_pipeline import EMOPipeline  # noqa: E402
from emo_pipeline.errors import EMOInputError  # noqa: E402
from emo_pipeline.models.attention import is_quantized  # noqa: E402
from emo_pipeline.quantization import (  # noqa: E402
    check_quantization,
    quantization_config,
    replace_linear_with_bitsandbytes,
)
from tests.pipeline_settings import IMAGE, settings, speech  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from emo_pipeline.testing import tiny_emo_pipeline

    path = tmp_path_factory.mktemp("tiny")
    tiny_emo_pipeline().save_pretrained(path)
    return path


def load(folder, **kwargs):
    pipe = EMOPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_int8_weight_only_pipeline_makes_nearly_the_same_frames_with_half_the_memory(folder):
    plain = load(folder)
    quantized = load(folder, quantization_config=quantization_config("int8"))
    for name in ("unet", "reference_net"):
        model = getattr(quantized, name)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(is_quantized(m) for m in linears), name
        assert model.get_memory_footprint() < 0.6 * getattr(plain, name).get_memory_footprint()
    expected = plain(IMAGE, speech(0.2), **settings()).frames
    frames = quantized(IMAGE, speech(0.2), **settings()).frames
    difference = np.abs(frames - expected)
    assert difference.max() < 0.05 and difference.mean() < 0.005
    # fused QKV on packed int8 weights: the quantized layers stay unfused instead of failing in torch.cat
    quantized.unet.fuse_qkv_projections()
    quantized.reference_net.fuse_qkv_projections()
    attn1 = quantized.unet.get_submodule(quantized.unet.reference_layer_names[0])
    assert not hasattr(attn1, "to_kv") and not hasattr(attn1, "to_qkv")
    np.testing.assert_array_equal(quantized(IMAGE, speech(0.2), **settings()).frames, frames)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_bitsandbytes_without_a_gpu_is_refused_up_front_naming_the_cpu_recipe(folder):
    """diffusers' own bitsandbytes loader fails deep inside `from_pretrained` ("No GPU found"); ours says so first."""
    from diffusers import PipelineQuantizationConfig

    for recipe in ("bnb-8bit", "bnb-4bit"):
        with pytest.raises(EMOInputError, match="loads only onto a GPU .* quantization_config\\('int8'\\)"):
            check_quantization(recipe)
    config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_8bit", quant_kwargs={"load_in_8bit": True}, components_to_quantize=["unet"]
    )
    with pytest.raises(EMOInputError, match="quantization_config uses bitsandbytes: .* GPU"):
        EMOPipeline.from_pretrained(folder, quantization_config=config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_emo_animate_quantize_bnb_without_a_gpu_exits_2_before_loading(folder, tmp_path, capsys):
    from emo_pipeline.cli import animate
    from emo_pipeline.testing import demo_assets

    portrait, speech_file = demo_assets()
    output = tmp_path / "out.mp4"
    code = animate.main(
        ["--image", str(portrait), "--audio", str(speech_file), "--output", str(output), "--model", str(folder),
         "--quantize", "bnb-4bit", "--no-progress"]
    )  # fmt: skip
    assert code == 2 and not output.exists()
    assert "loads only onto a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["bnb-8bit", "bnb-4bit"])
@torch.no_grad()
def test_bitsandbytes_layers_run_in_emos_networks_and_stay_unfused(folder, recipe):
    """The layers diffusers' loader builds on a GPU, built on this CPU by bitsandbytes' CPU backend: both networks
    run on them (frames near the unquantized ones: measured max 0.0011 / 0.039, mean 0.00012 / 0.0032 for 8 / 4 bit)
    and the fused key/value and QKV paths leave their packed weights unfused."""
    bnb = pytest.importorskip("bitsandbytes")
    plain = load(folder)
    quantized = load(folder)
    for name in ("unet", "reference_net"):
        replace_linear_with_bitsandbytes(getattr(quantized, name), recipe)
    layer = {"bnb-8bit": bnb.nn.Linear8bitLt, "bnb-4bit": bnb.nn.Linear4bit}[recipe]
    attn1 = quantized.unet.get_submodule(quantized.unet.reference_layer_names[0])
    assert isinstance(attn1.to_k, layer) and is_quantized(attn1.to_k)
    assert quantized.unet.get_memory_footprint() < 0.7 * plain.unet.get_memory_footprint()
    expected = plain(IMAGE, speech(0.2), **settings()).frames
    frames = quantized(IMAGE, speech(0.2), **settings()).frames
    difference = np.abs(frames - expected)
    assert 0 < difference.max() < 0.1 and difference.mean() < 0.01
    quantized.unet.fuse_qkv_projections()
    quantized.reference_net.fuse_qkv_projections()
    assert not hasattr(attn1, "to_kv") and not hasattr(attn1, "to_qkv")
    np.testing.assert_array_equal(quantized(IMAGE, speech(0.2), **settings()).frames, frames)

"""Quantized loading as diffusers users do it: `EMOPipeline.from_pretrained(..., quantization_config=...)`.

torchao int8 weight-only runs on a CPU, so CI compares the frames of the quantized pipeline with the unquantized one
(bound below, measured: max 0.023, mean 0.0017 on [0, 1] frames of the tiny random pipeline). fp8 and int4 are GPU
paths (README, "Quantized loading"); memory is measured in benchmarks/results/quantization_sd15.json.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("torchao")  # in the test extra; skipped only where a user runs the tests without it

from emo_pipeline import EMOPipeline  # noqa: E402
from emo_pipeline.models.attention import is_quantized  # noqa: E402
from emo_pipeline.quantization import quantization_config  # noqa: E402
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

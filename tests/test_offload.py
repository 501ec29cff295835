"""Offloading: model, sequential and group offload give the plain pipeline's frames.

These run on the CPU, with the CPU as the "accelerator". Two offload forms still show on a CPU what breaks on CUDA:
sequential offload (accelerate's `cpu_offload`) parks every weight on the "meta" device between calls, so a device
read outside a forward fails; block-level group offloading to disk parks weights as uninitialised placeholders that
only a hooked forward loads, so a layer called directly computes garbage (on CUDA, model or block-level offload would
give a CPU weight next to CUDA inputs there instead). Not exercised without an accelerator: real transfers, CUDA
streams (`use_stream=True`), and the CPU-parked-model vs CUDA-input mismatch itself.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from diffusers.hooks import apply_group_offloading
from pipeline_settings import IMAGE, settings

from emo_pipeline.audio import extract_audio_features
from emo_pipeline.devices import compute_device
from emo_pipeline.testing import randomize_zero_initialized_layers, tiny_emo_pipeline, tiny_wav2vec2

AUDIO = (np.random.default_rng(0).standard_normal(round(0.3 * 16000)) * 0.1).astype(np.float32)  # 8 frames, 2 clips


def make_pipe():
    pipe = tiny_emo_pipeline()
    randomize_zero_initialized_layers(pipe.unet)  # so motion frames, speed and the mask all act
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def plain_frames():
    return make_pipe()(IMAGE, AUDIO, **settings()).frames


def sequential_cpu_offload(pipe):
    """What `pipe.enable_sequential_cpu_offload(device="cpu")` does, with the device "cpu" rather than "cpu:0".

    diffusers turns device="cpu" into "cpu:0", with which accelerate 1.x's hooks fail on the first call (its
    `set_module_tensor_to_device` rebuilds a parameter from a plain tensor); on CUDA the index is harmless.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            cpu_offload(component, torch.device("cpu"), offload_buffers=len(component._parameters) > 0)


def count_calls(pipe, name):
    calls = []
    method = getattr(pipe, name)
    setattr(pipe, name, lambda *args, **kwargs: (calls.append(1), method(*args, **kwargs))[1])
    return calls


def test_model_cpu_offload_gives_the_same_frames_and_frees_the_hooks(plain_frames):
    pipe = make_pipe()
    pipe.enable_model_cpu_offload(device="cpu")
    frees = count_calls(pipe, "maybe_free_model_hooks")
    frames = pipe(IMAGE, AUDIO, **settings()).frames
    np.testing.assert_allclose(frames, plain_frames, atol=1e-5, rtol=0)
    assert len(frees) == 1  # as in diffusers' pipelines: the models go back to the CPU after the call

    clips = pipe.iter_clips(IMAGE, AUDIO, **settings())
    next(clips)
    clips.close()  # the consumer stops after the first clip: the hooks are reset all the same
    assert len(frees) == 2


def test_sequential_cpu_offload_gives_the_same_frames(plain_frames):
    pipe = make_pipe()
    sequential_cpu_offload(pipe)
    assert next(pipe.audio_encoder.parameters()).is_meta and next(pipe.unet.parameters()).is_meta
    frames = pipe(IMAGE, AUDIO, **settings()).frames
    np.testing.assert_allclose(frames, plain_frames, atol=1e-5, rtol=0)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_gives_the_same_frames(plain_frames, offload_type):
    pipe = make_pipe()
    cpu = torch.device("cpu")
    pipe.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type, num_blocks_per_group=1)
    assert pipe._execution_device == cpu
    frames = pipe(IMAGE, AUDIO, **settings()).frames
    np.testing.assert_allclose(frames, plain_frames, atol=1e-5, rtol=0)


def group_offload_to_disk(module, folder, offload_type="block_level"):
    """Group offloading to disk: parked weights are uninitialised placeholders until a hooked forward loads them,
    so a layer called directly (bypassing its group's hook) computes garbage. One folder per component: with one
    shared folder diffusers mixes up groups of the same name in the ReferenceNet and the backbone."""
    cpu = torch.device("cpu")
    kwargs = {"onload_device": cpu, "offload_device": cpu, "offload_type": offload_type, "num_blocks_per_group": 1}
    if hasattr(module, "enable_group_offload"):
        module.enable_group_offload(**kwargs, offload_to_disk_path=str(folder))
    else:
        apply_group_offloading(module, **kwargs, offload_to_disk_path=str(folder))


def test_block_level_group_offload_to_disk_gives_the_same_frames(plain_frames, tmp_path):
    """The backbone's per-video and per-clip precomputation (reference keys/values, audio tokens) calls its layers
    directly; under this offload it must happen inside the hooked forward."""
    pipe = make_pipe()
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            group_offload_to_disk(component, tmp_path / name)
    frames = pipe(IMAGE, AUDIO, **settings()).frames
    np.testing.assert_allclose(frames, plain_frames, atol=1e-5, rtol=0)


def test_long_audio_features_under_sequential_offload_read_the_device_at_call_time():
    """Windows shorter than the audio take the whole-input GroupNorm statistics path (its first conv called
    directly, its GroupNorm redone in a hook) while every weight of the encoder is parked on "meta"."""
    audio = (np.random.default_rng(1).standard_normal(16000) * 0.1).astype(np.float32)
    model, extractor = tiny_wav2vec2()
    kwargs = {"fps": 25, "chunk_seconds": 0.2, "context_seconds": 0.1}
    expected = extract_audio_features(audio, model, extractor, **kwargs)
    cpu_offload(model, torch.device("cpu"), offload_buffers=True)
    assert next(model.parameters()).is_meta and compute_device(model) == torch.device("cpu")
    features = extract_audio_features(audio, model, extractor, **kwargs)
    assert features.device == torch.device("cpu") and features.shape == expected.shape
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_long_audio_features_under_block_level_disk_offload(tmp_path):
    """The whole-input GroupNorm statistics run wav2vec2's first conv layer outside the encoder's forward: through
    the layer's own (hooked) forward, so its group's weights are loaded."""
    audio = (np.random.default_rng(1).standard_normal(16000) * 0.1).astype(np.float32)
    model, extractor = tiny_wav2vec2()
    kwargs = {"fps": 25, "chunk_seconds": 0.2, "context_seconds": 0.1}
    expected = extract_audio_features(audio, model, extractor, **kwargs)
    group_offload_to_disk(model, tmp_path)
    features = extract_audio_features(audio, model, extractor, **kwargs)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_compute_device_reads_offload_hooks():
    model, _ = tiny_wav2vec2()
    conv = model.feature_extractor.conv_layers[0].conv
    assert compute_device(model) == compute_device(conv) == torch.device("cpu")
    model.to("meta")  # parked weights without a hook: the parameters' device is all there is to go by
    assert compute_device(model) == torch.device("meta")

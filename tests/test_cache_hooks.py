"""diffusers' cache API on the backbone (`CacheMixin`): pyramid attention broadcast reads `pipe.current_timestep`;
EMO's step cache goes through the same `enable_cache`, also on a regionally compiled backbone."""

import numpy as np
import pytest
import torch
from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
from pipeline_settings import IMAGE
from pipeline_settings import settings as fast_settings

from emo_pipeline.models.step_cache import StepCacheConfig
from emo_pipeline.testing import randomize_zero_initialized_layers, tiny_emo_pipeline

AUDIO = (np.random.default_rng(0).standard_normal(int(0.2 * 16000)) * 0.1).astype(np.float32)  # 5 frames: 2 clips


def settings(**overrides) -> dict:
    return fast_settings(0, num_frames_per_clip=3, num_motion_frames=1, num_inference_steps=4, **overrides)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_emo_pipeline()
    randomize_zero_initialized_layers(pipe.unet)
    return pipe


@pytest.fixture(scope="module")
def uncached(pipe):
    return pipe(IMAGE, AUDIO, **settings()).frames


def test_pyramid_attention_broadcast_skips_attention_and_reads_the_current_timestep(pipe, uncached):
    seen, computed = [], []
    attn1 = pipe.unet.get_submodule(pipe.unet.reference_layer_names[0])
    attn1.to_q.register_forward_hook(lambda *_: computed.append(1))  # runs only when attention is computed

    def current_timestep():
        seen.append(pipe.current_timestep)
        return pipe.current_timestep

    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=current_timestep,
    )
    pipe.unet.enable_cache(config)
    try:
        frames = pipe(IMAGE, AUDIO, **settings()).frames
    finally:
        pipe.unet.disable_cache()
    assert len(computed) == 4  # 2 clips x 4 steps, every second one computed
    assert {int(t) for t in seen} == {int(t) for t in pipe.scheduler.timesteps}  # every step's own timestep
    assert pipe.current_timestep is None  # outside a call
    difference = np.abs(frames - uncached)
    assert 0 < difference.max() < 0.2  # an approximation (random tiny weights: the bound is loose)
    np.testing.assert_array_equal(pipe(IMAGE, AUDIO, **settings()).frames, uncached)  # disabled: exact again


def test_step_cache_through_enable_cache_equals_the_step_cache_argument(pipe):
    expected = pipe(IMAGE, AUDIO, **settings(step_cache=2)).frames
    pipe.unet.enable_cache(StepCacheConfig(interval=2))
    try:
        assert pipe.unet.is_cache_enabled
        np.testing.assert_array_equal(pipe(IMAGE, AUDIO, **settings()).frames, expected)
        np.testing.assert_array_equal(pipe(IMAGE, AUDIO, **settings()).frames, expected)  # reset between videos
    finally:
        pipe.unet.disable_cache()
    assert not pipe.unet._diffusers_hook.hooks


@torch.no_grad()
def test_step_cache_on_a_regionally_compiled_backbone():
    """`pipe.compile()` (regional) leaves the backbone hookable: the step cache runs on it, same frames as eager.
    Dynamo's "eager" backend keeps this fast; it traces the same block graphs as inductor."""
    torch._dynamo.reset()
    pipe = tiny_emo_pipeline()
    randomize_zero_initialized_layers(pipe.unet)
    expected = pipe(IMAGE, AUDIO, **settings(step_cache=2)).frames
    pipe.compile(components=("unet",), backend="eager")
    pipe.unet.enable_cache(StepCacheConfig(interval=2))
    assert np.abs(pipe(IMAGE, AUDIO, **settings()).frames - expected).max() < 1e-4


def test_dit_only_caches_say_so():
    """First-block cache (like FasterCache, TaylorSeer, MagCache) looks for a DiT's top-level block list."""
    pipe = tiny_emo_pipeline()
    with pytest.raises(Exception):  # noqa: B017 - diffusers' own error, whichever it is
        pipe.unet.enable_cache(FirstBlockCacheConfig(threshold=0.1))

"""diffusers' cache API on the backbone (`CacheMixin`): pyramid attention broadcast reads `pipe.current_timestep`,
TaylorSeer runs on EMO's attention layers (in a cache context, reset at every clip); the configs that do not fit a UNet
are refused with the reason; EMO's step cache goes through the same `enable_cache`, also on a regionally compiled
backbone."""

import numpy as np
import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)
from pipeline_settings import IMAGE
from pipeline_settings import settings as fast_settings

from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.step_cache import TAYLORSEER_IDENTIFIERS, StepCacheConfig
from emo_pipeline.testing import randomize_zero_initialized_layers, tiny_emo_pipeline

AUDIO = (np.random.default_rng(0).standard_normal(int(0.2 * 16000)) * 0.1).astype(np.float32)  # 5 frames: 2 clips


def settings(**overrides) -> dict:
    return fast_settings(
        0, **{"num_frames_per_clip": 3, "num_motion_frames": 1, "num_inference_steps": 4, **overrides}
    )


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


def attention_spy(pipe) -> tuple[list, list]:
    """Counts the spatial attention layers actually computed (their `to_q` runs only then); returns the count list and
    the hook handles."""
    computed = []
    handles = [
        module.register_forward_hook(lambda *_: computed.append(1))
        for name, module in pipe.unet.named_modules()
        if name.endswith(("attn1.to_q", "attn2.to_q"))
    ]
    return computed, handles


def test_every_clip_starts_a_new_cache_trajectory(pipe):
    """3 steps per clip, attention broadcast every second step: each clip computes its steps 0 and 2. Without the
    per-clip reset the second clip's step 0 would reuse the first clip's last attention output (3 computed, not 4)."""
    computed = []
    attn1 = pipe.unet.get_submodule(pipe.unet.reference_layer_names[0])
    hook = attn1.to_q.register_forward_hook(lambda *_: computed.append(1))
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
    )
    pipe.unet.enable_cache(config)
    try:
        pipe(IMAGE, AUDIO, **settings(num_inference_steps=3))
    finally:
        pipe.unet.disable_cache()
        hook.remove()
    assert len(computed) == 4


def test_taylorseer_on_emos_attention_layers_skips_computation_and_stays_close(pipe):
    """TaylorSeer (diffusers' own default identifiers name a DiT's blocks: refused below) with EMO's identifiers:
    after its warm-up step, every second step predicts the attention outputs instead of computing them."""
    computed, handles = attention_spy(pipe)
    uncached = pipe(IMAGE, AUDIO, **settings(num_inference_steps=6)).frames
    full = len(computed)
    computed.clear()
    config = TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, cache_identifiers=TAYLORSEER_IDENTIFIERS,
        taylor_factors_dtype=torch.float32,
    )  # fmt: skip
    pipe.unet.enable_cache(config)
    try:
        frames = pipe(IMAGE, AUDIO, **settings(num_inference_steps=6)).frames
    finally:
        pipe.unet.disable_cache()
        for handle in handles:
            handle.remove()
    assert 0 < len(computed) < 0.9 * full  # measured 336 of 408 layer calls (2 clips x 6 steps)
    difference = np.abs(frames - uncached)
    assert 0 < difference.max() < 0.05  # measured 0.004 max, 0.0003 mean on [0, 1] frames
    assert difference.mean() < 0.005


@pytest.mark.parametrize(
    "config",
    [
        FirstBlockCacheConfig(threshold=0.1),
        MagCacheConfig(calibrate=True, num_inference_steps=4),
        SeaCacheConfig(),
        FasterCacheConfig(spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 0),
        TextKVCacheConfig(),
    ],
    ids=lambda config: type(config).__name__,
)
def test_caches_that_do_not_fit_a_unet_are_refused_with_the_reason(config):
    unet = tiny_emo_pipeline().unet
    with pytest.raises(
        EMOInputError, match="does not fit EMO's backbone: .+ Fitting caches: PyramidAttentionBroadcastConfig"
    ):
        unet.enable_cache(config)
    assert not unet.is_cache_enabled


def test_a_cache_that_hooks_no_layer_is_refused_instead_of_changing_nothing():
    unet = tiny_emo_pipeline().unet
    with pytest.raises(EMOInputError, match="matched no layer .*TAYLORSEER_IDENTIFIERS"):
        unet.enable_cache(TaylorSeerCacheConfig())  # diffusers' default identifiers: a DiT's block names
    assert not unet.is_cache_enabled and not [m for m in unet.modules() if getattr(m, "_diffusers_hook", None)
                                               and m._diffusers_hook.hooks]  # fmt: skip


def test_a_joint_window_schedule_refuses_diffusers_caches():
    """EchoMimic calls the backbone on several shifting windows per step: a cached output would be other frames'."""
    from echomimic_goldens import golden_call, golden_pipeline

    echomimic = golden_pipeline()
    echomimic.unet.enable_cache(
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: echomimic.current_timestep
        )
    )
    with pytest.raises(EMOInputError, match="context windows"):
        golden_call(echomimic, "acc")

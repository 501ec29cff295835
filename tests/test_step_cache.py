"""Step caching (DeepCache, `emo_pipeline.models.step_cache`): off by default and exact, on: fewer deep-block runs,
a bounded difference from the uncached frames, and the backbone restored afterwards."""

import numpy as np
import pytest
import torch
from pipeline_settings import IMAGE
from pipeline_settings import settings as fast_settings

from emo_pipeline import EMOInputError
from emo_pipeline.models.step_cache import StepCache
from emo_pipeline.testing import randomize_zero_initialized_layers, tiny_emo_pipeline

AUDIO = (np.random.default_rng(0).standard_normal(int(0.2 * 16000)) * 0.1).astype(np.float32)  # 5 frames: 2 clips


def settings(seed: int = 0, **overrides) -> dict:
    """3-frame clips, 1 motion frame, 4 steps (so a cache interval has steps to skip), with head speed."""
    cache_run = {"num_frames_per_clip": 3, "num_motion_frames": 1, "num_inference_steps": 4, "speed": 0.5}
    return fast_settings(seed, **{**cache_run, **overrides})


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_emo_pipeline()
    randomize_zero_initialized_layers(pipe.unet)  # motion frames, speed and the face mask all act
    return pipe


@pytest.fixture(scope="module")
def uncached(pipe):
    return pipe(IMAGE, AUDIO, **settings()).frames


def real_runs(module: torch.nn.Module) -> list:
    """Grows by one each time `module` really computes (a forward hook on its first resnet, inside the block)."""
    calls = []
    module.resnets[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_off_by_default_and_interval_one_give_the_uncached_frames(pipe, uncached):
    assert pipe.__call__.__signature__.parameters["step_cache"].default is None
    again = pipe(IMAGE, AUDIO, **settings()).frames
    np.testing.assert_array_equal(again, uncached)
    every_step = pipe(IMAGE, AUDIO, **settings(step_cache=1)).frames  # a full run at every step
    np.testing.assert_array_equal(every_step, uncached)


def test_cache_skips_the_deep_blocks_between_full_steps(pipe, uncached):
    unet = pipe.unet
    deep = {"down_blocks.1": unet.down_blocks[1], "mid_block": unet.mid_block, "up_blocks.0": unet.up_blocks[0]}
    shallow = {"down_blocks.0": unet.down_blocks[0], "up_blocks.1": unet.up_blocks[-1]}
    runs = {name: real_runs(block) for name, block in {**deep, **shallow}.items()}
    cached = pipe(IMAGE, AUDIO, **settings(step_cache=2)).frames
    # 2 clips x 4 steps; interval 2: full steps 0 and 2 of each clip, the shallow path at all 8
    assert {name: len(calls) for name, calls in runs.items()} == {
        "down_blocks.1": 4,
        "mid_block": 4,
        "up_blocks.0": 4,
        "down_blocks.0": 8,
        "up_blocks.1": 8,
    }
    assert cached.shape == uncached.shape and np.isfinite(cached).all()
    difference = np.abs(cached - uncached).mean()
    other_seed = np.abs(pipe(IMAGE, AUDIO, **settings(seed=1)).frames - uncached).mean()
    # an approximation: not the uncached frames, but much closer to them than another seed's frames
    assert 0 < difference < 0.25 * other_seed, (difference, other_seed)


def test_turning_it_off_restores_the_backbone(pipe, uncached):
    forward = pipe.unet.forward
    pipe(IMAGE, AUDIO, **settings(step_cache=3))
    assert pipe.unet.forward == forward and not pipe.unet._diffusers_hook.hooks
    np.testing.assert_array_equal(pipe(IMAGE, AUDIO, **settings()).frames, uncached)
    clips = pipe.iter_clips(IMAGE, AUDIO, **settings(step_cache=2))
    next(clips)
    clips.close()  # a stream abandoned after its first clip takes its hooks away too
    np.testing.assert_array_equal(pipe(IMAGE, AUDIO, **settings()).frames, uncached)


def test_conditioning_change_forces_a_full_step(pipe):
    """Guidance switched off mid-clip halves the batch; new motion frames from a callback change the reference."""
    deep_runs = real_runs(pipe.unet.mid_block)

    def switch(pipe, step, timestep, tensors):
        if step == 0:
            pipe._guidance_scale = 1.0
        if step == 1:
            return {"motion_latents": torch.zeros_like(tensors["motion_latents"])}
        return {}

    frames = pipe(
        IMAGE,
        AUDIO,
        **settings(step_cache=4, callback_on_step_end=switch),
        callback_on_step_end_tensor_inputs=["latents", "motion_latents"],
    ).frames
    assert np.isfinite(frames).all()
    # per clip: step 0 full (new clip), step 1 full (batch 2 -> 1), step 2 full (new motion frames), step 3 cached
    assert len(deep_runs) == 2 * 3


def test_a_cached_step_still_checks_the_layers_it_runs(pipe):
    """The reach check stays on at cached steps: a shallow layer that loses its conditioning there is an error."""
    attn1 = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    saved = dict(attn1._forward_pre_hooks)

    def drop_reference_attention(pipe, step, timestep, tensors):
        attn1._forward_pre_hooks.clear()  # after full step 0: step 1, a cached one, runs attn1 without it
        return {}

    try:
        with pytest.raises(RuntimeError, match="conditioning did not reach 1 layers"):
            pipe(IMAGE, AUDIO, **settings(step_cache=2, callback_on_step_end=drop_reference_attention))
    finally:
        attn1._forward_pre_hooks.update(saved)
    assert not pipe.unet._diffusers_hook.hooks  # removed after the error too


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "2"])
def test_bad_interval_is_refused_naming_it(pipe, bad):
    with pytest.raises(EMOInputError, match="step_cache"):
        pipe.iter_clips(IMAGE, AUDIO, **settings(step_cache=bad))


def test_second_cache_on_the_same_backbone_is_refused(pipe):
    with StepCache(pipe.unet, 2), pytest.raises(RuntimeError, match="already installed"):
        StepCache(pipe.unet, 2).install()
    assert not pipe.unet._diffusers_hook.hooks


def test_compiled_backbone_is_refused(pipe):
    pipe.unet.compile()  # lazy: nothing is compiled until a call
    try:
        with pytest.raises(EMOInputError, match="backbone compiled whole"):
            pipe.iter_clips(IMAGE, AUDIO, **settings(step_cache=2))
    finally:
        pipe.unet._compiled_call_impl = None

"""The one denoising loop of every weight family (DESIGN section 6; a family: `emo_pipeline.families.base`).

`sample_clips` drives an autoregressive schedule (EMO, Hallo: clips chained by motion frames), `sample_windows` a joint
context-window schedule (EchoMimic: the whole video's latents, overlapping windows averaged). Both share one step core
(`_predict`, then `scheduler.step`): `scheduler.scale_model_input`, one backbone call with both guidance branches
batched (the unconditional branch skipped entirely at `guidance_scale <= 1`), the guidance combination,
`scheduler.step` with the keyword arguments its signature accepts, and the callback contract of `EMOPipeline`:
`callback_on_step_end(pipe, step, timestep, tensors) -> dict` may return `latents` (and `motion_latents` for a clip
schedule) to replace them, set `pipe._guidance_scale` (read at every step) or `pipe._interrupt = True` (the clip or
video in progress is returned as it stands and the loop ends).

Latents, guidance and the scheduler's update stay in float32 whatever the models' dtype (schedulers do their
arithmetic in the latents' dtype, and bf16's 8-bit mantissa would round each step's small update away); only the
backbone's input is cast. The noise is drawn in float32 with diffusers' `randn_tensor`, so a seed gives the same
noise in every dtype and on every device, from a generator on any device or a list of them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from emo_pipeline.errors import EMOInputError
from emo_pipeline.families.base import AutoregressiveRun, BranchInputs, Clip, WindowRun
from emo_pipeline.models.step_cache import StepCacheConfig

__all__ = ["initial_noise", "sample_clips", "sample_windows", "scheduler_step_kwargs"]


def scheduler_step_kwargs(scheduler: Any, generator: Any, eta: float) -> dict:
    """`eta` and `generator` for `scheduler.step`, each only where its signature takes it (DDIM takes both: with
    `eta > 0` its variance noise then comes from the seeded generator, as in diffusers' pipelines)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def initial_noise(scheduler: Any, shape: tuple[int, ...], generator: Any, device: torch.device) -> torch.Tensor:
    """Float32 Gaussian noise of `shape` on `device`, scaled by the scheduler's `init_noise_sigma`.

    Drawn by `randn_tensor`: a CPU generator draws on the CPU and the noise moves (the same noise on every device),
    a generator on the latents' device draws there, and a list gives one generator per batch row."""
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * scheduler.init_noise_sigma


def diffusers_cache_enabled(unet: Any) -> bool:
    """Whether one of diffusers' cache hooks (`unet.enable_cache(config)`, not EMO's step cache) is on the backbone."""
    config = getattr(unet, "_cache_config", None)
    return config is not None and not isinstance(config, StepCacheConfig)


def _predict(pipe: Any, latents: torch.Tensor, timestep: torch.Tensor, inputs: BranchInputs) -> torch.Tensor:
    """The guided noise prediction for `latents`, in `latents.dtype`: one backbone call, both branches batched
    `[unconditional, conditional]` while `pipe.do_classifier_free_guidance`, else the conditional branch alone."""
    pipe._current_timestep = timestep  # `pipe.current_timestep`: what diffusers' cache hooks read
    guided = pipe.do_classifier_free_guidance  # read every step: a callback may change the guidance
    model_input = torch.cat([latents] * 2) if guided else latents
    model_input = pipe.scheduler.scale_model_input(model_input, timestep).to(pipe.unet.dtype)
    kwargs = inputs.get(guided)
    # diffusers' stateful cache hooks (TaylorSeer, first-block cache) keep their state per cache context, as in
    # diffusers' pipelines; both guidance branches are one batch, hence one context
    cached = diffusers_cache_enabled(pipe.unet)
    with pipe.unet.cache_context("emo") if cached else contextlib.nullcontext():
        noise = pipe.unet(model_input, timestep, **kwargs, return_dict=False)[0].to(latents.dtype)
    if not guided:
        return noise
    unconditional, conditional = noise.chunk(2)
    return unconditional + pipe.guidance_scale * (conditional - unconditional)


def _run_callback(pipe: Any, callback: Callable, step: int, timestep: torch.Tensor, tensors: dict) -> dict:
    returned = callback(pipe, step, timestep, tensors)
    if not isinstance(returned, dict):
        raise TypeError(f"callback_on_step_end must return a dict of tensors, got {type(returned).__name__}")
    return returned


def sample_clips(pipe: Any, run: AutoregressiveRun, settings: Any) -> Iterator[tuple[int, torch.Tensor, Any]]:
    """Denoise an autoregressive schedule clip by clip: yields `(clip index, latents (1, C, f, h, w), frames)`,
    `frames` None unless the family decoded the clip itself (`run.end_clip`); the pipeline decodes the rest."""
    device = pipe._execution_device
    steps = settings.num_inference_steps
    callback, tensor_inputs = settings.callback_on_step_end, list(settings.callback_on_step_end_tensor_inputs)
    step_kwargs = scheduler_step_kwargs(pipe.scheduler, settings.generator, settings.eta)
    pipe._interrupt = False
    pipe._num_timesteps = None
    with pipe.progress_bar(total=run.num_clips * steps) as progress:
        for index in range(run.num_clips):
            pipe.clip_index = index
            pipe._guidance_scale = settings.guidance_scale  # a callback's change lasts for its clip only
            clip: Clip = run.start_clip(index)
            if diffusers_cache_enabled(pipe.unet):  # a new trajectory: nothing cached from the previous clip's steps
                pipe.unet._reset_stateful_cache()
            pipe.scheduler.set_timesteps(steps, device=device)
            pipe._num_timesteps = len(pipe.scheduler.timesteps)
            latents = initial_noise(pipe.scheduler, clip.latent_shape, settings.generator, device)
            latents = latents.to(clip.latent_dtype)
            for step, timestep in enumerate(pipe.scheduler.timesteps):
                if pipe.interrupt:
                    break
                noise = _predict(pipe, latents, timestep, clip.inputs)
                latents = pipe.scheduler.step(noise, timestep, latents, **step_kwargs, return_dict=False)[0]
                if callback is not None:
                    local = {"latents": latents, "motion_latents": clip.motion_latents}
                    returned = _run_callback(pipe, callback, step, timestep, {k: local[k] for k in tensor_inputs})
                    latents = returned.pop("latents", latents).to(clip.latent_dtype)
                    motion = returned.get("motion_latents", clip.motion_latents)
                    if motion is not clip.motion_latents:  # this clip's motion frames from now on
                        clip.motion_latents = motion
                        clip.inputs = run.replace_motion_latents(clip, motion)
                progress.update()
            frames = run.end_clip(index, latents)
            yield index, latents, frames
            if pipe.interrupt:  # as in diffusers: the interrupted clip is returned as it stands, then stop
                return


def sample_windows(pipe: Any, run: WindowRun, settings: Any) -> torch.Tensor:
    """Denoise a joint context-window schedule: the whole video's latents `run.latent_shape` `(1, C, N, h, w)`,
    every step predicted window by window (`run.windows`) with the same step core as `sample_clips`, the windows'
    predictions summed and combined per frame (`run.combine`, by default averaged), one scheduler step for all
    frames. Returns the latents; callbacks get `latents` (the whole video's) and may replace them."""
    device = pipe._execution_device
    callback, tensor_inputs = settings.callback_on_step_end, list(settings.callback_on_step_end_tensor_inputs)
    if diffusers_cache_enabled(pipe.unet):
        raise EMOInputError(
            f"{type(pipe.unet._cache_config).__name__}: diffusers' cache hooks reuse a layer's output from the "
            "previous step, but this family's joint schedule calls the backbone on several shifting context windows "
            "per step (a cached output would belong to other frames); pipe.unet.disable_cache() first"
        )
    step_kwargs = scheduler_step_kwargs(pipe.scheduler, settings.generator, settings.eta)
    pipe._interrupt = False
    pipe.clip_index = 0
    pipe._guidance_scale = settings.guidance_scale
    pipe.scheduler.set_timesteps(settings.num_inference_steps, device=device)
    pipe._num_timesteps = len(pipe.scheduler.timesteps)
    latents = run.transform_noise(initial_noise(pipe.scheduler, run.latent_shape, settings.generator, device))
    latents = latents.to(run.latent_dtype)
    with pipe.progress_bar(total=pipe._num_timesteps) as progress:
        for step, timestep in enumerate(pipe.scheduler.timesteps):
            if pipe.interrupt:
                break
            noise = torch.zeros_like(latents)
            count = torch.zeros(latents.shape[2], device=latents.device, dtype=latents.dtype)
            for window in run.windows(step, timestep):
                index = torch.as_tensor(list(window.frames), device=latents.device)
                noise[:, :, index] += _predict(pipe, latents[:, :, index], timestep, window.inputs)
                count[index] += 1
            noise = run.combine(noise, count, pipe.do_classifier_free_guidance)
            latents = pipe.scheduler.step(noise, timestep, latents, **step_kwargs, return_dict=False)[0]
            if callback is not None:
                local = {"latents": latents}
                returned = _run_callback(pipe, callback, step, timestep, {k: local[k] for k in tensor_inputs})
                latents = returned.pop("latents", latents).to(run.latent_dtype)
            progress.update()
    return latents


def average_windows(noise: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """`WindowRun.combine`'s default: each frame's summed window predictions divided by its window count."""
    return noise / count.clamp(min=1).view(1, 1, -1, 1, 1)


def context_windows(num_frames: int, length: int, stride: int, shift: int = 0) -> list[list[int]]:
    """Windows of `length` frames every `stride` frames over `num_frames` (the last wraps around to the start),
    all shifted by `shift` frames (EchoMimic shifts by 2 x the step index): lists of frame indices mod
    `num_frames`. A video no longer than one window is one window of its frames."""
    if num_frames <= length:
        return [list(range(num_frames))]
    starts = range(0, num_frames - length + stride, stride)
    return [[(start + shift + offset) % num_frames for offset in range(length)] for start in starts]

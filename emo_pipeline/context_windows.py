"""Joint context-window denoising: the whole video's latents are denoised together, one window of frames per
backbone call, overlapping predictions averaged (AnimateDiff-style "uniform" schedule; EchoMimic's sampler).

Generic over the family: the family gives `predict(window_latents, t, frame_indices) -> (rows, C, f, h, w)` (rows =
guidance branches, uncond first); this module owns the window schedule, the accumulation and the scheduler step.
Memory: the video's latents and one prediction accumulator of the same size (no decoded frames, no per-frame
conditioning beyond a window).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["context_windows", "denoise_context_windows", "shifted_windows"]


def _ordered_halving(value: int) -> float:
    """The bit-reversed fraction of `value` (AnimateDiff's `ordered_halving`): 0 for step 0."""
    return int(f"{value:064b}"[::-1], 2) / (1 << 64)


def context_windows(
    num_frames: int, context_frames: int = 12, context_overlap: int = 3, context_stride: int = 1, step: int = 0
) -> list[list[int]]:
    """AnimateDiff's `uniform` schedule (closed loop: windows wrap around the end), as EchoMimic calls it once, at
    step 0 (pipeline_echo_mimic.py:454-463): windows of `context_frames` starting every
    `context_frames - context_overlap` frames; the whole video as one window when it is not longer than that."""
    if num_frames <= context_frames:
        return [list(range(num_frames))]
    stride = min(context_stride, int(np.ceil(np.log2(num_frames / context_frames))) + 1)
    windows = []
    for context_step in 1 << np.arange(stride):
        pad = int(round(num_frames * _ordered_halving(step)))
        start = int(_ordered_halving(step) * context_step) + pad
        for j in range(start, num_frames + pad, context_frames * context_step - context_overlap):
            windows.append([e % num_frames for e in range(j, j + context_frames * context_step, int(context_step))])
    return windows


def shifted_windows(windows: list[list[int]], step_index: int, num_frames: int, shift: int = 2) -> list[list[int]]:
    """The windows of denoising step `step_index`: every frame index moved by `shift * step_index`, wrapping
    (EchoMimic: `(c + t_i * 2) % video_length`), so window seams fall on other frames at every step."""
    return [[(c + step_index * shift) % num_frames for c in window] for window in windows]


def _step_kwargs(scheduler, generator, eta: float | None) -> dict:
    names = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in names and eta is not None:
        kwargs["eta"] = eta
    if "generator" in names:
        kwargs["generator"] = generator
    return kwargs


@torch.no_grad()
def denoise_context_windows(
    latents: torch.Tensor,
    scheduler,
    timesteps: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor],
    guidance_scale: float = 1.0,
    context_frames: int = 12,
    context_overlap: int = 3,
    shift: int = 2,
    divide_unguided: bool = True,
    generator: torch.Generator | None = None,
    eta: float | None = 0.0,
    callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Denoise `latents (1, C, F, h, w)` jointly over all F frames; returns the final latents.

    At step i every window of `shifted_windows(context_windows(F), i)` is predicted by `predict(x, t, frames)`
    (x = the window's latents after `scheduler.scale_model_input`; it returns `(rows, C, f, h, w)`, rows = 2 with
    guidance, uncond first); each frame's predictions are summed and divided by how many windows held it, then
    guidance `uncond + g (cond - uncond)` is applied and the scheduler steps the whole video.
    `divide_unguided=False` reproduces EchoMimic's plain pipeline without guidance (CFG <= 1), which sums the
    overlapping predictions without dividing (pipeline_echo_mimic.py:524-533; its acc pipeline divides).
    `callback(i, t, latents)` may return replacement latents.
    """
    num_frames = latents.shape[2]
    windows = context_windows(num_frames, context_frames, context_overlap)
    guided = guidance_scale > 1.0
    rows = 2 if guided else 1
    step_kwargs = _step_kwargs(scheduler, generator, eta)
    for i, t in enumerate(timesteps):
        total = latents.new_zeros((rows, *latents.shape[1:]))
        count = latents.new_zeros((1, 1, num_frames, 1, 1))
        for frames in shifted_windows(windows, i, num_frames, shift):
            window = scheduler.scale_model_input(latents[:, :, frames], t)
            total[:, :, frames] += predict(window, t, frames)
            count[:, :, frames] += 1
        if guided:
            uncond, cond = (total / count).chunk(2)
            prediction = uncond + guidance_scale * (cond - uncond)
        else:
            prediction = total / count if divide_unguided else total
        latents = scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
        if callback is not None:
            replaced = callback(i, t, latents)
            if replaced is not None:
                latents = replaced
    return latents

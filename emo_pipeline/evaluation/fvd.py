"""FVD features: the I3D network of StyleGAN-V / common_metrics_on_video_quality (`i3d_torchscript.pt`).

That TorchScript file (universome/fvd-comparison's export of the Kinetics-400 I3D of the original FVD) is called as
common_metrics_on_video_quality's `fvd/styleganv/fvd.py` does: each RGB clip in [0, 1], `(C, T, H, W)`, has its
shorter side scaled to 224 (bilinear, `align_corners=False`, longer side rounded up), is centre-cropped to 224x224 and
mapped to [-1, 1]; the batch `(B, 3, T, 224, 224)` goes through `detector(x, rescale=False, resize=False,
return_features=True)`, giving 400-d features. Clips are 16 consecutive frames (non-overlapping; a shorter tail is
dropped).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from emo_pipeline.errors import EMOInputError

__all__ = ["CLIP_FRAMES", "I3D_KWARGS", "I3DFeatures", "frames_to_i3d_clips", "load_i3d"]

CLIP_FRAMES = 16
I3D_KWARGS = {"rescale": False, "resize": False, "return_features": True}
I3D_RESOLUTION = 224


def load_i3d(path: str | os.PathLike[str]) -> Any:
    """The published `i3d_torchscript.pt` (`torch.jit.load`, on the CPU)."""
    try:
        return torch.jit.load(os.fspath(path), map_location="cpu").eval()
    except Exception as error:
        raise EMOInputError(f"I3D weights {os.fspath(path)!r} do not load as TorchScript: {error}") from error


def frames_to_i3d_clips(frames: np.ndarray, clip_frames: int = CLIP_FRAMES) -> torch.Tensor:
    """`(T, H, W, 3)` uint8 RGB -> `(T // 16, 3, 16, 224, 224)` float clips in [-1, 1] (shorter side scaled to 224,
    centre crop)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise EMOInputError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
    count = len(frames) // clip_frames
    if count == 0:
        raise EMOInputError(f"FVD needs at least {clip_frames} frames per video, got {len(frames)}")
    clips = torch.from_numpy(np.ascontiguousarray(frames[: count * clip_frames]))
    clips = clips.reshape(count, clip_frames, *frames.shape[1:]).permute(0, 4, 1, 2, 3).float().div(255.0)
    height, width = frames.shape[1:3]
    scale = I3D_RESOLUTION / min(height, width)
    if height < width:
        size = (I3D_RESOLUTION, math.ceil(width * scale))
    else:
        size = (math.ceil(height * scale), I3D_RESOLUTION)
    resized = []
    for clip in clips:  # (C, T, H, W): interpolate sees C as the batch and T as the channels, as the reference does
        clip = torch.nn.functional.interpolate(clip, size=size, mode="bilinear", align_corners=False)
        top, left = (clip.shape[2] - I3D_RESOLUTION) // 2, (clip.shape[3] - I3D_RESOLUTION) // 2
        resized.append(clip[:, :, top : top + I3D_RESOLUTION, left : left + I3D_RESOLUTION])
    return (torch.stack(resized) - 0.5) * 2


class I3DFeatures:
    """Callable: `(T, H, W, 3)` uint8 RGB frames -> `(T // 16, D)` float64 I3D features of its 16-frame clips."""

    def __init__(self, model: Any, batch_size: int = 4, device: str | torch.device = "cpu"):
        self.model = model.to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        clips = frames_to_i3d_clips(frames)
        outputs = [
            self.model(clips[start : start + self.batch_size].to(self.device), **I3D_KWARGS).double().cpu().numpy()
            for start in range(0, len(clips), self.batch_size)
        ]
        return np.concatenate(outputs)

"""FVD features: the I3D network of StyleGAN-V / common_metrics_on_video_quality (`i3d_torchscript.pt`).

That TorchScript file is the Kinetics-400 I3D; StyleGAN-V's `metrics/frechet_video_distance.py` and
common_metrics_on_video_quality's `fvd/styleganv/fvd.py` call it as `detector(videos, rescale=False, resize=True,
return_features=True)` on `(B, 3, T, H, W)` float videos in [-1, 1] (RGB; the network resizes to 224x224 itself) and
take the 400-d logits-layer features. Clips are 16 consecutive frames (non-overlapping; a shorter tail is dropped).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from emo_pipeline.errors import EMOInputError

__all__ = ["CLIP_FRAMES", "I3D_KWARGS", "I3DFeatures", "frames_to_i3d_clips", "load_i3d"]

CLIP_FRAMES = 16
I3D_KWARGS = {"rescale": False, "resize": True, "return_features": True}


def load_i3d(path: str | os.PathLike[str]) -> Any:
    """The published `i3d_torchscript.pt` (`torch.jit.load`, on the CPU)."""
    try:
        return torch.jit.load(os.fspath(path), map_location="cpu").eval()
    except Exception as error:
        raise EMOInputError(f"I3D weights {os.fspath(path)!r} do not load as TorchScript: {error}") from error


def frames_to_i3d_clips(frames: np.ndarray, clip_frames: int = CLIP_FRAMES) -> torch.Tensor:
    """`(T, H, W, 3)` uint8 RGB -> `(T // 16, 3, 16, H, W)` float clips in [-1, 1]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise EMOInputError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
    count = len(frames) // clip_frames
    if count == 0:
        raise EMOInputError(f"FVD needs at least {clip_frames} frames per video, got {len(frames)}")
    clips = torch.from_numpy(np.ascontiguousarray(frames[: count * clip_frames]))
    clips = clips.reshape(count, clip_frames, *frames.shape[1:]).permute(0, 4, 1, 2, 3)
    return clips.float().div(255.0).mul(2.0).sub(1.0)


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

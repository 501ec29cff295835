"""Synthetic talking-face videos and seeded metric weights for the emo-evaluate tests."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import torch

SIZE = 160
FPS = 25
FRAMES = 30


def portrait(size: int = SIZE) -> np.ndarray:
    import cv2

    from emo_pipeline.face import load_image

    image = np.asarray(load_image(importlib.resources.files("emo_pipeline") / "assets" / "portrait.png"))
    return cv2.resize(image[:300, 100:400], (size, size), interpolation=cv2.INTER_AREA)  # the face fills the frame


def mouth_box(image: np.ndarray) -> tuple[int, int, int, int]:
    from emo_pipeline.evaluation.face_metrics import MouthTracker, mouth_indices

    points = MouthTracker().track([image])[0][mouth_indices()]
    x0, y0 = np.floor(points.min(0)).astype(int) - 4
    x1, y1 = np.ceil(points.max(0)).astype(int) + 4
    return x0, y0, x1, y1


def shift_mouth(image: np.ndarray, box: tuple[int, int, int, int], pixels: int) -> np.ndarray:
    """The mouth region moved down by `pixels` (the rest of the face unchanged)."""
    x0, y0, x1, y1 = box
    out = image.copy()
    out[y0 + pixels : y1 + pixels, x0:x1] = image[y0:y1, x0:x1]
    return out


def speech(seconds: float) -> np.ndarray:
    from emo_pipeline.audio import load_audio

    audio = load_audio(importlib.resources.files("emo_pipeline") / "assets" / "speech.wav")
    return audio[: int(seconds * 16000)]


def write_video(path: Path, frames: np.ndarray, audio: np.ndarray | None) -> Path:
    from emo_pipeline.media import VideoWriter

    with VideoWriter(path, fps=FPS, audio=audio, crf=12, preset="ultrafast") as writer:
        writer.write(frames)
    return path


def seeded_weights(folder: Path) -> Path:
    """The metric networks' files under their published names, with seeded random values (FVD: a small TorchScript
    3D-conv network with the I3D call convention stands in: the I3D TorchScript is published without its source)."""
    from emo_pipeline.evaluation.fid import seeded_inception_state_dict
    from emo_pipeline.evaluation.sync import load_syncnet

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(seeded_inception_state_dict(0), folder / "pt_inception-2015-12-05-6726825d.pth")
    torch.save(load_syncnet(random_seed=0).state_dict(), folder / "syncnet_v2.model")
    torch.jit.script(ProbeI3D()).save(str(folder / "i3d_torchscript.pt"))
    return folder


class ProbeI3D(torch.nn.Module):
    """I3D's call convention (`(B, 3, T, H, W)` in [-1, 1], rescale/resize/return_features flags) on a small seeded
    3D conv; its features also report the input's range and clip length so tests can check the pre-processing."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.2)

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = False, return_features: bool = False):
        pooled = torch.relu(self.conv(x)).mean(dim=(2, 3, 4))
        flags = torch.tensor([float(rescale), float(resize), float(return_features)]).expand(x.shape[0], 3)
        stats = torch.stack(
            [x.amin(dim=(1, 2, 3, 4)), x.amax(dim=(1, 2, 3, 4)), x.new_full((x.shape[0],), x.shape[2])], 1
        )
        return torch.cat([pooled, flags, stats, x[:, 0].mean(dim=(1, 2, 3))[:, None]], 1)

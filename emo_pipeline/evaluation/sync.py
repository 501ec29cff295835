"""Sync-C, Sync-D and the audio-video offset: SyncNet v2 of joonson/syncnet_python, with its pre-processing.

* The network (`SyncNetV2`): syncnet_python's `SyncNetModel.S` architecture, with the same parameter names, so its
  published `syncnet_v2.model` state dict loads as is.
* Video: the face track cropped as syncnet_python's `run_pipeline.crop_video` does (box half-size `s` = half the
  larger side, centre and size median-filtered over 13 frames, the frame padded by `s * (1 + 2 * 0.4)` with grey 110,
  the crop `[cy - s, cy + s * 1.8] x [cx - 1.4 s, cx + 1.4 s]` resized to 224x224), in BGR (its frames come from
  `cv2.imread`), as 0-255 floats, 5-frame windows at 25 fps. Face boxes come from mediapipe (syncnet_python uses its
  S3FD detector; both give a tight face box).
* Audio: 16 kHz mono as 16-bit PCM (ffmpeg's `pcm_s16le` rounding), `python_speech_features.mfcc` (13 coefficients,
  100 per second), 20-coefficient windows (4 per video frame).
* Offset search: `SyncNetInstance.evaluate`: for every video window, the L2 distances to the audio windows shifted by
  -15..15 frames; their mean over the video per shift; offset = 15 - argmin; Sync-D = the minimum mean distance;
  Sync-C (confidence) = median - minimum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from emo_pipeline.errors import EMOInputError

__all__ = [
    "SYNC_FPS",
    "SYNC_SAMPLE_RATE",
    "SyncNetV2",
    "SyncResult",
    "audio_to_mfcc",
    "crop_face_track",
    "load_syncnet",
    "sync_offset_search",
    "sync_scores",
]

SYNC_FPS = 25
SYNC_SAMPLE_RATE = 16000
CROP_SCALE = 0.4
CROP_SIZE = 224
PAD_VALUE = 110
SMOOTH_KERNEL = 13

# (kind, in, out, kernel, stride, padding) per layer; "pool" rows are max-pools. Layer indices (and so the state dict
# keys `netcnnaud.<i>.weight`, ...) follow syncnet_python's nn.Sequential: conv, batch norm, ReLU, [pool].
_AUDIO_CNN = [
    ("conv", 1, 64, (3, 3), (1, 1), (1, 1)), ("pool", (1, 1), (1, 1), 0),
    ("conv", 64, 192, (3, 3), (1, 1), (1, 1)), ("pool", (3, 3), (1, 2), 0),
    ("conv", 192, 384, (3, 3), (1, 1), (1, 1)),
    ("conv", 384, 256, (3, 3), (1, 1), (1, 1)),
    ("conv", 256, 256, (3, 3), (1, 1), (1, 1)), ("pool", (3, 3), (2, 2), 0),
    ("conv", 256, 512, (5, 4), (1, 1), (0, 0)),
]  # fmt: skip
_LIP_CNN = [
    ("conv", 3, 96, (5, 7, 7), (1, 2, 2), 0), ("pool", (1, 3, 3), (1, 2, 2), 0),
    ("conv", 96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), ("pool", (1, 3, 3), (1, 2, 2), (0, 1, 1)),
    ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
    ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
    ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("pool", (1, 3, 3), (1, 2, 2), 0),
    ("conv", 256, 512, (1, 6, 6), (1, 1, 1), 0),
]  # fmt: skip


def _cnn(spec: list[tuple], dims: int) -> nn.Sequential:
    conv, norm, pool = (
        (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)
    )
    layers: list[nn.Module] = []
    for row in spec:
        if row[0] == "pool":
            layers.append(pool(kernel_size=row[1], stride=row[2], padding=row[3]))
        else:
            _, cin, cout, kernel, stride, padding = row
            layers += [conv(cin, cout, kernel_size=kernel, stride=stride, padding=padding), norm(cout), nn.ReLU()]
    return nn.Sequential(*layers)


def _head(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, width))


class SyncNetV2(nn.Module):
    """SyncNet v2: `forward_aud` `(N, 1, 13, 20)` MFCC windows and `forward_lip` `(N, 3, 5, 224, 224)` BGR 0-255
    windows -> `(N, 1024)` embeddings whose L2 distance is small for in-sync pairs."""

    def __init__(self, embedding_dim: int = 1024):
        super().__init__()
        self.netcnnaud = _cnn(_AUDIO_CNN, 2)
        self.netfcaud = _head(embedding_dim)
        self.netfclip = _head(embedding_dim)
        self.netcnnlip = _cnn(_LIP_CNN, 3)

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(frames).flatten(1))


def load_syncnet(weights_path: str | os.PathLike[str] | None = None, random_seed: int | None = None) -> SyncNetV2:
    """SyncNet v2 from the published `syncnet_v2.model` (a state dict), or seeded random weights (tests)."""
    model = SyncNetV2()
    if weights_path is not None:
        try:
            state = torch.load(os.fspath(weights_path), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as error:
            raise EMOInputError(f"SyncNet weights {os.fspath(weights_path)!r} do not load: {error}") from error
    elif random_seed is not None:
        from emo_pipeline.evaluation.random_weights import fill_seeded

        fill_seeded(model, random_seed)
    else:
        raise EMOInputError("load_syncnet needs weights_path (syncnet_v2.model) or random_seed (tests)")
    return model.eval()


def audio_to_mfcc(audio: np.ndarray, sample_rate: int = SYNC_SAMPLE_RATE) -> np.ndarray:
    """`(13, N)` MFCCs of float mono audio as syncnet_python computes them from its 16-bit wav."""
    import python_speech_features

    if sample_rate != SYNC_SAMPLE_RATE:
        raise EMOInputError(f"SyncNet needs {SYNC_SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    pcm = np.clip(np.rint(np.asarray(audio, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    return python_speech_features.mfcc(pcm, SYNC_SAMPLE_RATE).T


def crop_face_track(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """syncnet_python's face-track crop: `(T, H, W, 3)` RGB frames + `(T, 4)` boxes (x0, y0, x1, y1) ->
    `(T, 224, 224, 3)` uint8 BGR crops."""
    import cv2
    from scipy import signal

    boxes = np.asarray(boxes, dtype=np.float64)
    if len(frames) < SMOOTH_KERNEL or boxes.shape != (len(frames), 4):
        raise EMOInputError(
            f"SyncNet's face track needs at least {SMOOTH_KERNEL} frames (the span of its box median filter) "
            f"and one (x0, y0, x1, y1) box per frame; got {len(frames)} frames, boxes {boxes.shape}"
        )
    size = signal.medfilt(np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2, SMOOTH_KERNEL)
    centre_y = signal.medfilt((boxes[:, 1] + boxes[:, 3]) / 2, SMOOTH_KERNEL)
    centre_x = signal.medfilt((boxes[:, 0] + boxes[:, 2]) / 2, SMOOTH_KERNEL)
    crops = np.empty((len(frames), CROP_SIZE, CROP_SIZE, 3), np.uint8)
    for index, frame in enumerate(frames):
        half = size[index]
        pad = int(half * (1 + 2 * CROP_SCALE))
        padded = np.pad(frame[..., ::-1], ((pad, pad), (pad, pad), (0, 0)), "constant", constant_values=PAD_VALUE)
        my, mx = centre_y[index] + pad, centre_x[index] + pad
        face = padded[
            int(my - half) : int(my + half * (1 + 2 * CROP_SCALE)),
            int(mx - half * (1 + CROP_SCALE)) : int(mx + half * (1 + CROP_SCALE)),
        ]
        crops[index] = cv2.resize(face, (CROP_SIZE, CROP_SIZE))
    return crops


def sync_offset_search(video_features: torch.Tensor, audio_features: torch.Tensor, vshift: int = 15) -> dict:
    """syncnet_python's offset search on `(N, D)` video and audio window embeddings.

    Returns `offset` (frames, as syncnet_python reports it: positive when the sound of frame `i` is heard at frame
    `i - offset`, i.e. the audio leads), `min_dist` (Sync-D),
    `confidence` (Sync-C), `mean_dists` (per offset, index `i` is offset `vshift - i`) and `frame_dists` `(N, 2v+1)`.
    """
    window = 2 * vshift + 1
    padded = torch.nn.functional.pad(audio_features, (0, 0, vshift, vshift))
    dists = torch.stack(
        [
            torch.nn.functional.pairwise_distance(video_features[[i]].repeat(window, 1), padded[i : i + window])
            for i in range(len(video_features))
        ]
    )
    mean_dists = dists.mean(0)
    min_dist, min_index = torch.min(mean_dists, 0)
    return {
        "offset": int(vshift - min_index),
        "min_dist": float(min_dist),
        "confidence": float(torch.median(mean_dists) - min_dist),
        "mean_dists": mean_dists.numpy(),
        "frame_dists": dists.numpy(),
    }


@dataclass
class SyncResult:
    """Sync-C (`confidence`), Sync-D (`min_dist`), the `offset` in frames and the distance per offset."""

    confidence: float
    min_dist: float
    offset: int
    offsets: list[int] = field(default_factory=list)
    mean_dists: list[float] = field(default_factory=list)


@torch.no_grad()
def sync_scores(
    model: SyncNetV2, crops_bgr: np.ndarray, audio: np.ndarray, vshift: int = 15, batch_size: int = 20
) -> SyncResult:
    """Sync-C / Sync-D / offset of 25 fps `(T, 224, 224, 3)` BGR face crops and their 16 kHz audio, as
    `SyncNetInstance.evaluate` computes them."""
    mfcc = audio_to_mfcc(audio)
    if not np.any(np.asarray(audio)):
        raise EMOInputError("the audio track is silent: SyncNet scores need speech")
    video = torch.from_numpy(np.ascontiguousarray(crops_bgr).astype(np.float32)).permute(3, 0, 1, 2)[None]
    mfcc_t = torch.from_numpy(mfcc.astype(np.float32))[None, None]
    min_length = min(len(crops_bgr), len(audio) // (SYNC_SAMPLE_RATE // SYNC_FPS))
    last = min_length - 5
    if last < 1:
        raise EMOInputError(f"SyncNet needs at least 6 frames of video with audio, got {min_length}")
    video_feats, audio_feats = [], []
    for start in range(0, last, batch_size):
        frames = range(start, min(last, start + batch_size))
        video_feats.append(model.forward_lip(torch.cat([video[:, :, i : i + 5] for i in frames])))
        audio_feats.append(model.forward_aud(torch.cat([mfcc_t[:, :, :, i * 4 : i * 4 + 20] for i in frames])))
    found = sync_offset_search(torch.cat(video_feats), torch.cat(audio_feats), vshift)
    return SyncResult(
        confidence=found["confidence"],
        min_dist=found["min_dist"],
        offset=found["offset"],
        offsets=[vshift - i for i in range(2 * vshift + 1)],
        mean_dists=[float(d) for d in found["mean_dists"]],
    )


def face_track_boxes(frames: Any) -> np.ndarray:
    """mediapipe face box (largest face) per RGB frame, linearly interpolated over frames without one.

    Raises:
        EMOInputError when no frame has a face.
    """
    from emo_pipeline.face import detect_faces

    boxes = np.full((len(frames), 4), np.nan)
    for index, frame in enumerate(frames):
        found = detect_faces(frame)
        if len(found):
            boxes[index] = found.boxes[0]
    seen = np.flatnonzero(~np.isnan(boxes[:, 0]))
    if len(seen) == 0:
        raise EMOInputError("no face found in any frame")
    for column in range(4):
        boxes[:, column] = np.interp(np.arange(len(frames)), seen, boxes[seen, column])
    return boxes

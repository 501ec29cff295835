"""Inputs shared by tests/goldens/make_metric_goldens.py and the metric parity tests: seeded, so both sides of a
comparison see the same frames and audio without storing them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

GOLDENS = Path(__file__).parent / "goldens" / "metrics"
SYNC_SEED = 0  # emo_pipeline.evaluation.random_weights.fill_seeded(SyncNet, SYNC_SEED) on both sides
SYNC_FRAMES = 20  # 15 five-frame windows


def sync_inputs() -> tuple[np.ndarray, np.ndarray]:
    """`(20, 224, 224, 3)` uint8 BGR face crops (smooth blobs + noise, so features differ between frames) and
    0.8 s of 16 kHz float32 audio (a chirp + noise)."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    frames = []
    for index in range(SYNC_FRAMES):
        phase = index / SYNC_FRAMES * 2 * np.pi
        base = np.stack([np.sin(6 * xx + phase), np.cos(5 * yy - phase), np.sin(4 * (xx + yy) + 2 * phase)], -1)
        frames.append(np.clip(127 + 90 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    t = np.arange(int(0.8 * 16000)) / 16000
    audio = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) * (1 + np.sin(2 * np.pi * 3 * t)) + rng.normal(
        0, 0.02, t.shape
    )
    return np.stack(frames), audio.astype(np.float32)


def crop_inputs() -> tuple[np.ndarray, np.ndarray]:
    """15 `(160, 200, 3)` uint8 RGB frames (smooth, coordinate-coded colours) and a face box per frame that drifts and
    jumps once (so the 13-frame median filter of syncnet_python's crop matters)."""
    yy, xx = np.mgrid[0:160, 0:200].astype(np.float64)
    frames, boxes = [], []
    for index in range(15):
        frames.append(
            np.stack([xx * 1.2, yy * 1.5, 128 + 60 * np.sin((xx + yy + 7 * index) / 9)], -1).astype(np.uint8)
        )
        jump = 25.0 if index == 7 else 0.0
        boxes.append([60 + index + jump, 40 + 0.5 * index, 120 + index + jump, 110 + 0.5 * index])
    return np.stack(frames), np.asarray(boxes)

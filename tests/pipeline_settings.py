"""Inputs and settings for fast end-to-end runs of the tiny pipeline, shared by the pipeline-level tests."""

import contextlib
import logging

import numpy as np
import torch

FPS, F, N = 25, 4, 2  # frame rate, frames per clip, motion frames
IMAGE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
FACE_BOX = (16, 12, 48, 52)  # given by hand: these tests need no face detector


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise standing in for speech: `seconds` at 16 kHz, float32."""
    return (np.random.default_rng(seed).standard_normal(round(seconds * 16000)) * 0.1).astype(np.float32)


def settings(seed: int = 0, **overrides) -> dict:
    """Keyword arguments for `pipe(...)`: 64 px, 4-frame clips, 2 motion frames, 2 steps, no watermark."""
    base = {
        "height": 64,
        "width": 64,
        "fps": FPS,
        "num_frames_per_clip": F,
        "num_motion_frames": N,
        "num_inference_steps": 2,
        "face_box": FACE_BOX,
        "watermark": False,
        "generator": torch.Generator().manual_seed(seed),
    }
    return {**base, **overrides}


@contextlib.contextmanager
def diffusers_log():
    """The log records of diffusers' loggers during the block (they do not propagate to pytest's `caplog`)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)

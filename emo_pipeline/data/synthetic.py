"""Synthetic talking-head source videos with a known head motion, for tests and benchmarks of `emo-preprocess`.

The bundled portrait (`emo_pipeline.testing.demo_assets`) rolls back and forth about its face centre at a known
angular speed (a triangle wave of the roll angle, so the speed is constant between turnarounds) while drifting
sideways, with the bundled speech looped as the audio track. A video can have several *shots* separated by hard
cuts (each shot zoomed and tinted differently, as a change of camera would be), each with its own speed, so the
scene-cut detector and the speed measurement can both be checked against the truth.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from emo_pipeline.audio import load_audio
from emo_pipeline.media import VideoWriter
from emo_pipeline.testing import demo_assets

__all__ = ["PORTRAIT_FACE_CENTRE", "SyntheticVideo", "write_synthetic_video"]

#: Centre of the portrait asset's face (pixels of the 512x512 image): the pivot of the synthetic head roll.
PORTRAIT_FACE_CENTRE = (226.0, 120.0)

# Per shot: (side of the portrait region around the face that fills the frame in pixels, RGB gain). The gains
# change the colour histogram like a cut to another camera does; the faces stay detectable.
_SHOT_LOOKS = (
    (300.0, (1.0, 1.0, 1.0)),
    (230.0, (0.55, 0.8, 1.25)),
    (360.0, (1.2, 1.0, 0.6)),
)


@dataclass
class SyntheticVideo:
    """What was written: `path`, `fps`, `num_frames`, `shot_starts` (first frame of each shot) and the true head
    rotation speed per frame, `speed (num_frames,)` rad/s (|d roll / dt|; 0 when `faces == 0`)."""

    path: str
    fps: int
    num_frames: int
    shot_starts: list[int]
    speed: np.ndarray


def _triangle(t: np.ndarray, speed: float, amplitude: float) -> np.ndarray:
    """Roll angle (rad) of a head turning at constant `speed` rad/s between -amplitude and +amplitude."""
    if speed == 0:
        return np.zeros_like(t)
    period = 4 * amplitude / speed
    phase = np.mod(t / period + 0.25, 1.0)  # start at 0 rad, turning positive
    return amplitude * (1 - 4 * np.abs(phase - 0.5))


def write_synthetic_video(
    path: str | os.PathLike[str],
    shots: Sequence[tuple[float, float]] = ((5.0, 0.5),),
    fps: int = 25,
    size: int | tuple[int, int] = 160,
    faces: int = 1,
    audio: bool = True,
    amplitude: float = 0.35,
    drift: float = 4.0,
    seed: int = 0,
) -> SyntheticVideo:
    """Write a synthetic talking-head mp4 (H.264, AAC speech) and return its ground truth.

    Args:
        path: the mp4 to write.
        shots: `(seconds, roll speed in rad/s)` per shot; shots are joined by hard cuts.
        fps: frames per second.
        size: frame side in pixels, or `(width, height)`.
        faces: 1 = one head; 2 = two heads side by side (each in half of the width); 0 = no face (coloured
            noise), the speed truth is then 0.
        audio: mux the bundled speech (looped to the video length); False writes a silent video without an audio
            stream.
        amplitude: roll amplitude (rad) of the back-and-forth turn.
        drift: sideways motion of the head in output pixels per second (the union face box grows with it).
        seed: noise seed (`faces == 0`).
    """
    import cv2

    portrait_path, speech_path = demo_assets()
    portrait = cv2.cvtColor(cv2.imread(os.fspath(portrait_path)), cv2.COLOR_BGR2RGB)
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    frames_per_shot = [round(seconds * fps) for seconds, _ in shots]
    total = sum(frames_per_shot)
    samples = None
    if audio:
        speech = load_audio(speech_path)
        need = round(total / fps * 16000)
        samples = np.tile(speech, need // speech.size + 1)[:need].astype(np.float32)

    truth, shot_starts, start = [], [], 0
    path = os.fspath(path)
    with VideoWriter(path, fps=fps, audio=samples, crf=20, preset="veryfast") as writer:
        for shot_index, ((_, speed), count) in enumerate(zip(shots, frames_per_shot)):
            shot_starts.append(start)
            region, gain = _SHOT_LOOKS[shot_index % len(_SHOT_LOOKS)]
            times = np.arange(count) / fps
            angles = _triangle(times, speed, amplitude)
            truth.append(np.abs(np.gradient(angles, 1.0 / fps)) if faces and count > 1 else np.zeros(count))
            batch = []
            for t, angle in zip(times, angles):
                if faces == 0:
                    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                else:
                    tile_width = width // faces
                    tile = _head(portrait, angle, region, tile_width, height, drift * t, cv2)
                    frame = np.concatenate([tile] * faces, axis=1)
                    if frame.shape[1] < width:
                        frame = np.pad(frame, ((0, 0), (0, width - frame.shape[1]), (0, 0)), mode="edge")
                    frame = np.clip(frame * np.asarray(gain), 0, 255).astype(np.uint8)
                batch.append(frame)
            writer.write(np.stack(batch))
            start += count
    return SyntheticVideo(path=path, fps=fps, num_frames=total, shot_starts=shot_starts, speed=np.concatenate(truth))


def _head(portrait: np.ndarray, angle: float, region: float, width: int, height: int, shift: float, cv2) -> np.ndarray:
    """The portrait rolled by `angle` rad about its face centre, the `region`-pixel square around the face scaled
    to fill `width` x `height`, shifted right by `shift` output pixels."""
    cx, cy = PORTRAIT_FACE_CENTRE
    rotation = np.vstack([cv2.getRotationMatrix2D((cx, cy), float(np.rad2deg(angle)), 1.0), [0.0, 0.0, 1.0]])
    scale = max(width, height) / region
    # Face centre lands slightly above the middle of the frame, as in a talking-head shot.
    place = np.array([[scale, 0.0, width / 2 - cx * scale + shift], [0.0, scale, 0.45 * height - cy * scale]])
    return cv2.warpAffine(
        portrait, place @ rotation, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )

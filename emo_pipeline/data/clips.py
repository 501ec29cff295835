"""One training clip of an `emo-preprocess` dataset: face-track checks, the fixed square crop, and the atomic write
of the clip folder (EMO, arXiv 2402.17485, Sec. 4.1 data: clips of 3-12 s, 512x512 face crops).

Layout of `<dataset>/clips/<clip_id>/` (every file appears together, by one directory rename, or not at all):

* `frames.mp4`: the `F` cropped `size` x `size` frames at the dataset fps, H.264 (crf 18), the clip's audio muxed
  as AAC for viewing.
* `audio.wav`: the clip's audio, 16 kHz mono 16-bit PCM (the training input; the features are computed from
  exactly these samples).
* `features.safetensors`: `"audio_features"` `(F, L, D)` wav2vec2 hidden states per frame (float32, or float16
  with `features_fp16`), from `emo_pipeline.audio.extract_audio_features` on `audio.wav`, the function inference
  uses. Absent when the dataset was made without an audio encoder.
* `annotations.safetensors`: `"face_boxes"` `(F, 4)` float32 `x0, y0, x1, y1` in crop pixels (the detector's box;
  interpolated where `"face_missing"` is 1), `"face_missing"` `(F,)` uint8, `"mask"` `(size, size)` uint8 {0, 1}
  (EMO's face-region mask: the union of the face boxes), `"poses"` `(F, 3)` float32 `yaw, pitch, roll` rad from
  face mesh on the cropped frames (NaN where the mesh found no face), `"pose_missing"` `(F,)` uint8, `"speed"`
  `(F,)` float32 head rotation speed in rad/s (`emo_pipeline.face.head_rotation_speed`).
* `meta.json`: the clip's manifest row.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import wave
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from emo_pipeline.errors import EMOInputError

__all__ = [
    "ANNOTATIONS_FILE",
    "AUDIO_FILE",
    "CLIPS_DIR",
    "FEATURES_FILE",
    "FEATURES_KEY",
    "FRAMES_FILE",
    "META_FILE",
    "REJECTION_REASONS",
    "FaceTrack",
    "boxes_to_crop",
    "check_face_track",
    "crop_frames",
    "crop_region",
    "load_annotations",
    "write_clip",
]

CLIPS_DIR = "clips"
FRAMES_FILE = "frames.mp4"
AUDIO_FILE = "audio.wav"
FEATURES_FILE = "features.safetensors"
FEATURES_KEY = "audio_features"
ANNOTATIONS_FILE = "annotations.safetensors"
META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"  # clip folders being written: `.tmp-<clip_id>-<pid>`, renamed onto `<clip_id>` when complete

#: Why a candidate clip is not in the dataset. Counted per reason in `stats.json` and per video in
#: `failures.jsonl` (a video none of whose clips survive fails with its most frequent reason).
REJECTION_REASONS = {
    "scene_too_short": "a shot (between scene cuts) shorter than min_seconds, or the remainder of one",
    "no_face": "too many frames without a detected face (more than max_bad_frame_fraction)",
    "multiple_faces": "too many frames with two or more detected faces (more than max_bad_frame_fraction)",
    "face_too_small": "the median face box side is below min_face pixels (in the source video)",
    "face_jump": "the face box jumps between consecutive frames by more than max_jump face sizes",
    "no_face_mesh": "face mesh found no face in any cropped frame, so no head pose or speed",
}


# ----------------------------------------------------------------------------------------------------------------
# Face track
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FaceTrack:
    """The face of one candidate clip.

    boxes: `(F, 4)` float32 `x0, y0, x1, y1` source pixels, the largest detection per frame, linearly interpolated
        over frames without one (ends held).
    missing: `(F,)` bool, True where the detector found no face.
    reason: a `REJECTION_REASONS` key, or None when the clip is usable; `detail` says what was measured.
    """

    boxes: np.ndarray
    missing: np.ndarray
    reason: str | None = None
    detail: str = ""


def check_face_track(
    detections: Sequence[np.ndarray], min_face: float, max_jump: float, max_bad_frame_fraction: float
) -> FaceTrack:
    """Check the per-frame face detections of a candidate clip and fill its face track.

    Args:
        detections: per frame, `(k, 4)` boxes `x0, y0, x1, y1` in source pixels, largest first (`detect_faces`).
        min_face: smallest accepted median face size, the larger side of the box in source pixels.
        max_jump: largest accepted change between consecutive frames with a face, per frame, as a fraction of the
            face size: of the box centre (distance) and of the box size (|ratio - 1|).
        max_bad_frame_fraction: fraction of frames allowed to have no face, and separately two or more faces.

    Returns:
        `FaceTrack`; its `reason` is checked in the order no_face, multiple_faces, face_too_small, face_jump.
    """
    count = len(detections)
    if count == 0:
        raise ValueError("a clip needs at least one frame")
    faces = np.array([len(boxes) for boxes in detections])
    missing = faces == 0
    boxes = np.full((count, 4), np.nan, np.float64)
    for index, frame_boxes in enumerate(detections):
        if len(frame_boxes):
            boxes[index] = frame_boxes[0]
    allowed = max_bad_frame_fraction * count
    if missing.all() or missing.sum() > allowed:
        return FaceTrack(np.zeros((count, 4), np.float32), missing, "no_face", f"{missing.sum()}/{count} frames")
    known = np.nonzero(~missing)[0]
    for k in range(4):
        boxes[:, k] = np.interp(np.arange(count), known, boxes[known, k])
    track = FaceTrack(boxes.astype(np.float32), missing)
    if (faces >= 2).sum() > allowed:
        track.reason, track.detail = "multiple_faces", f"{(faces >= 2).sum()}/{count} frames"
        return track
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    median_side = float(np.median(sides[known]))
    if median_side < min_face:
        track.reason, track.detail = "face_too_small", f"median face {median_side:.0f} px < {min_face:g} px"
        return track
    if known.size > 1:
        gaps = np.diff(known)
        centres = (boxes[known, :2] + boxes[known, 2:]) / 2
        mean_side = (sides[known][1:] + sides[known][:-1]) / 2
        shift = np.linalg.norm(np.diff(centres, axis=0), axis=1) / mean_side / gaps
        growth = np.abs(sides[known][1:] / sides[known][:-1] - 1.0) / gaps
        worst = int(np.argmax(np.maximum(shift, growth)))
        if max(shift[worst], growth[worst]) > max_jump:
            track.reason = "face_jump"
            track.detail = (
                f"frame {known[worst + 1]}: centre moved {shift[worst]:.2f} and size changed {growth[worst]:.2f} "
                f"face sizes per frame (max_jump {max_jump:g})"
            )
    return track


# ----------------------------------------------------------------------------------------------------------------
# Crop
# ----------------------------------------------------------------------------------------------------------------


def crop_region(box: Sequence[float], crop_scale: float, width: int, height: int) -> tuple[int, int, int]:
    """The clip's fixed square crop `(left, top, side)` in source pixels: side = `crop_scale` x the larger side of
    `box` (the union of the clip's face boxes), centred on it and shifted back inside the frame where it can be;
    where the frame is smaller than the square it stays centred and the outside is edge-replicated by
    `crop_frames`. The same placement rule as `emo_pipeline.face.crop_to_face`, so training crops are framed like
    the inference portrait."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(2, int(round(crop_scale * max(x1 - x0, y1 - y0))))

    def place(centre: float, extent: int) -> int:
        start = int(round(centre - side / 2))
        return int(np.clip(start, min(0, extent - side), max(0, extent - side)))

    return place((x0 + x1) / 2, width), place((y0 + y1) / 2, height), side


def crop_frames(frames: np.ndarray, region: tuple[int, int, int], size: int) -> np.ndarray:
    """`(N, H, W, 3)` uint8 -> `(N, size, size, 3)` uint8: the square `region` (`crop_region`), edge-replicated
    where it leaves the frame, resized with area averaging (shrinking) or Lanczos (enlarging)."""
    import cv2

    left, top, side = region
    height, width = frames.shape[1:3]
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)
    pads = (y0 - top, top + side - y1, x0 - left, left + side - x1)  # top, bottom, left, right
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LANCZOS4
    out = np.empty((frames.shape[0], size, size, 3), np.uint8)
    for index, frame in enumerate(frames):
        window = frame[y0:y1, x0:x1]
        if any(pads):
            window = cv2.copyMakeBorder(window, *pads, cv2.BORDER_REPLICATE)
        out[index] = window if side == size else cv2.resize(window, (size, size), interpolation=interpolation)
    return out


def boxes_to_crop(boxes: np.ndarray, region: tuple[int, int, int], size: int) -> np.ndarray:
    """`(F, 4)` boxes in source pixels -> `(F, 4)` float32 in the pixels of the `size` x `size` crop."""
    left, top, side = region
    scale = size / side
    return ((np.asarray(boxes, np.float64) - [left, top, left, top]) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    with wave.open(path, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(samples.astype("<i2").tobytes())


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.write("\n")


def _rounded(value: float) -> float:
    return round(float(value), 6)


def write_clip(
    clip_dir: str,
    frame_windows: Iterable[np.ndarray],
    region: tuple[int, int, int],
    track: FaceTrack,
    audio: np.ndarray,
    fps: Fraction,
    size: int,
    row: dict[str, Any],
    audio_encoder: tuple[Any, Any] | None = None,
    features_fp16: bool = False,
    crf: int = 18,
    sample_rate: int = 16000,
) -> tuple[dict[str, Any] | None, str]:
    """Write one clip folder atomically; return `(manifest row, "")`, or `(None, detail)` for `no_face_mesh`.

    Args:
        clip_dir: the final folder, `<dataset>/clips/<clip_id>`; it is written as `.tmp-<clip_id>-<pid>` next to
            it and renamed when complete, so a killed process never leaves a partial clip under its real name.
        frame_windows: the clip's `F` source frames, `(n, H, W, 3)` uint8 RGB windows in order (streamed: cropped,
            encoded and given to face mesh window by window).
        region: the fixed crop `(left, top, side)` (`crop_region`).
        track: the clip's checked `FaceTrack` (`F` boxes in source pixels).
        audio: `(num_samples,)` float32 mono at `sample_rate`, the clip's time range.
        fps: the dataset frame rate.
        size: output side in pixels.
        row: the manifest row so far (clip_id, path, source, start, end, ...); completed here.
        audio_encoder: `(Wav2Vec2Model, Wav2Vec2FeatureExtractor)`, or None to write no features.
        features_fp16: store the features as float16.
        crf: x264 quality of `frames.mp4`.
    """
    from safetensors.numpy import save_file

    from emo_pipeline.face import estimate_head_poses, head_rotation_speed
    from emo_pipeline.media import VideoWriter

    parent, clip_id = os.path.split(os.path.abspath(clip_dir))
    tmp = os.path.join(parent, f"{TMP_PREFIX}{clip_id}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        num_frames = track.boxes.shape[0]
        pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
        _write_wav(os.path.join(tmp, AUDIO_FILE), pcm, sample_rate)
        clip_audio = pcm.astype(np.float32) / 32768.0  # exactly what load_audio reads back from audio.wav

        written = 0
        with VideoWriter(
            os.path.join(tmp, FRAMES_FILE), fps=fps, audio=clip_audio, sample_rate=sample_rate, crf=crf, preset="fast"
        ) as writer:

            def cropped() -> Iterator[np.ndarray]:
                nonlocal written
                for window in frame_windows:
                    crops = crop_frames(window, region, size)
                    writer.write(crops)
                    written += crops.shape[0]
                    yield from crops

            poses = estimate_head_poses(cropped())
            if written != num_frames:
                raise RuntimeError(f"clip {clip_id}: got {written} frames, expected {num_frames}")
        pose_missing = ~np.isfinite(poses).all(axis=1)
        if pose_missing.all():
            shutil.rmtree(tmp, ignore_errors=True)
            return None, f"face mesh found no face in the {num_frames} cropped frames"
        speed = head_rotation_speed(poses, float(fps)).speed

        feature_shape = None
        if audio_encoder is not None:
            from emo_pipeline.audio import extract_audio_features

            model, extractor = audio_encoder
            features = extract_audio_features(clip_audio, model, extractor, fps=fps, num_frames=num_frames)
            array = features.detach().float().cpu().numpy().astype(np.float16 if features_fp16 else np.float32)
            feature_shape = list(array.shape)
            save_file(
                {FEATURES_KEY: np.ascontiguousarray(array)},
                os.path.join(tmp, FEATURES_FILE),
                metadata={"fps": str(fps), "sample_rate": str(sample_rate), "layout": "(frames, layers, dim)"},
            )

        boxes = boxes_to_crop(track.boxes, region, size)
        from emo_pipeline.face import face_region_mask

        mask = face_region_mask(boxes, size).astype(np.uint8)
        save_file(
            {
                "face_boxes": boxes,
                "face_missing": track.missing.astype(np.uint8),
                "mask": mask,
                "poses": poses.astype(np.float32),
                "pose_missing": pose_missing.astype(np.uint8),
                "speed": speed.astype(np.float32),
            },
            os.path.join(tmp, ANNOTATIONS_FILE),
        )
        rms = float(np.sqrt(np.mean(np.square(clip_audio, dtype=np.float64)))) if clip_audio.size else 0.0
        row = {
            **row,
            "num_frames": int(num_frames),
            "fps": _rounded(fps),
            "duration": _rounded(Fraction(num_frames) / fps),
            "size": int(size),
            "speed_mean": _rounded(speed.mean()),
            "speed_max": _rounded(speed.max()),
            "speed_p90": _rounded(np.percentile(speed, 90)),
            "crop": [int(v) for v in region],
            "face_missing": int(track.missing.sum()),
            "pose_missing": int(pose_missing.sum()),
            "audio_rms": _rounded(rms),
            "feature_shape": feature_shape,
        }
        _write_json(os.path.join(tmp, META_FILE), row)
        os.rename(tmp, clip_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return row, ""


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def load_annotations(clip_dir: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of a clip's `annotations.safetensors` (see the module docstring for keys and shapes)."""
    from safetensors.numpy import load_file

    path = os.path.join(os.fspath(clip_dir), ANNOTATIONS_FILE)
    if not os.path.exists(path):
        raise EMOInputError(
            f"clip folder {os.fspath(clip_dir)!r} has no {ANNOTATIONS_FILE}; is it an emo-preprocess dataset?"
        )
    return load_file(path)


def clip_sample_range(start_frame: int, num_frames: int, fps: Fraction, sample_rate: int) -> tuple[int, int]:
    """Audio samples `[lo, hi)` of video frames `[start_frame, start_frame + num_frames)`, rounded to the nearest
    sample (exact at 25 fps and 16 kHz: 640 samples per frame)."""
    lo = math.floor(Fraction(start_frame) * sample_rate / fps + Fraction(1, 2))
    hi = math.floor(Fraction(start_frame + num_frames) * sample_rate / fps + Fraction(1, 2))
    return lo, hi

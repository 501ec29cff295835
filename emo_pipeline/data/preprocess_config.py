"""`PreprocessConfig`: the settings of an `emo-preprocess` dataset, with the reason for each default, and the
constants every stage of the preprocessing shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any

from emo_pipeline.data.scenes import DEFAULT_SCENE_THRESHOLD
from emo_pipeline.errors import EMOInputError
from emo_pipeline.face import DEFAULT_FACE_SCALE

__all__ = [
    "ANALYSIS_SIDE",
    "DEFAULT_AUDIO_ENCODER",
    "SAMPLE_RATE",
    "VIDEO_EXTENSIONS",
    "WINDOW",
    "PreprocessConfig",
]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
DEFAULT_AUDIO_ENCODER = "facebook/wav2vec2-base-960h"
SAMPLE_RATE = 16000  # wav2vec2's rate
WINDOW = 32  # frames decoded per decord call: bounded memory, few calls
ANALYSIS_SIDE = 640  # long side of the copy face detection runs on (mediapipe's models see 128-192 px anyway)


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of a dataset. All but the last two shape the output, and a dataset folder keeps the ones it was
    made with (`preprocess_config.json`): a re-run with different ones is refused."""

    fps: float = 25.0  # EMO's training videos are 25 fps (its inference runs at 25-30)
    size: int = 512  # EMO's training and inference resolution
    min_seconds: float = 3.0  # EMO's clips are 3-12 s
    max_seconds: float = 12.0
    crop_scale: float = DEFAULT_FACE_SCALE  # crop side / union face box side: inference's portrait framing
    # Smallest median face (larger box side) in source pixels: at 100 px the 512 crop (crop_scale 2.5) is a ~2x
    # upscale; smaller faces make blurry training targets.
    min_face: float = 100.0
    # A face box whose centre moves, or whose size changes, by more than this fraction of the face size in one
    # frame is a detector switch or a missed cut, not head motion (0.25 = 6 face sizes a second at 25 fps).
    max_jump: float = 0.25
    # Frames of a clip allowed without a face (boxes interpolated over them) and, separately, with a second face.
    max_bad_frame_fraction: float = 0.05
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD
    detection_confidence: float = 0.5  # mediapipe face detection score threshold
    audio_encoder: str | None = DEFAULT_AUDIO_ENCODER  # wav2vec2 hub id or folder; None: no features
    features_fp16: bool = False
    crf: int = 18  # x264 quality of frames.mp4: visually lossless
    speed_buckets: int = 9  # buckets suggested in speed_buckets.yaml (SpeedEncoder's default count)
    # Not part of the output:
    frame_cache_mb: float = 1024.0  # per process; frames past it are decoded again when their clip is written
    device: str = "cpu"  # where wav2vec2 runs

    _RUNTIME_FIELDS = ("frame_cache_mb", "device")

    @property
    def fps_fraction(self) -> Fraction:
        return Fraction(self.fps).limit_denominator(1_000_000)

    @property
    def min_frames(self) -> int:
        return max(1, math.ceil(self.min_seconds * self.fps - 1e-9))

    @property
    def max_frames(self) -> int:
        return max(1, math.floor(self.max_seconds * self.fps + 1e-9))

    def validate(self) -> None:
        """Raise `EMOInputError` naming the first bad setting."""
        if not (isinstance(self.fps, (int, float)) and 0 < self.fps <= 240):
            raise EMOInputError(f"fps must be in (0, 240], got {self.fps!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 16 or self.size % 2:
            raise EMOInputError(f"size must be an even int >= 16 (H.264 needs even sides), got {self.size!r}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise EMOInputError(
                f"need 0 < min_seconds <= max_seconds, got min_seconds={self.min_seconds!r}, "
                f"max_seconds={self.max_seconds!r}"
            )
        if self.min_frames > self.max_frames:
            raise EMOInputError(f"min_seconds..max_seconds holds no whole number of frames at {self.fps:g} fps")
        if not self.crop_scale >= 1.0:
            raise EMOInputError(f"crop_scale must be >= 1 (the crop contains the face box), got {self.crop_scale!r}")
        if not self.min_face >= 0:
            raise EMOInputError(f"min_face must be >= 0 pixels, got {self.min_face!r}")
        if not self.max_jump > 0:
            raise EMOInputError(f"max_jump must be > 0, got {self.max_jump!r}")
        if not 0 <= self.max_bad_frame_fraction < 1:
            raise EMOInputError(f"max_bad_frame_fraction must be in [0, 1), got {self.max_bad_frame_fraction!r}")
        if not 0 < self.scene_threshold <= 1:
            raise EMOInputError(f"scene_threshold must be in (0, 1], got {self.scene_threshold!r}")
        if not 0 <= self.detection_confidence <= 1:
            raise EMOInputError(f"detection_confidence must be in [0, 1], got {self.detection_confidence!r}")
        if not 0 <= self.crf <= 51:
            raise EMOInputError(f"crf must be in 0..51, got {self.crf!r}")
        if self.speed_buckets < 1:
            raise EMOInputError(f"speed_buckets must be >= 1, got {self.speed_buckets!r}")
        if not self.frame_cache_mb >= 0:
            raise EMOInputError(f"frame_cache_mb must be >= 0, got {self.frame_cache_mb!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape the output (JSON-able)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._RUNTIME_FIELDS}

"""`emo-preprocess`: a folder of raw talking-head videos -> the clip dataset EMO's training reads.

EMO (Tian et al. 2024, arXiv 2402.17485, Sec. 4.1) trains on 3-12 s clips of one talking or singing person,
cropped square around the face at 512x512, with wav2vec2 audio features, the face-region mask (union of the face
boxes) and the head rotation speed. For each video (mp4/mov/mkv/webm/avi/m4v, any size and frame rate, with an
audio track) `process_video`:

1. probes the streams (PyAV) and decodes the audio once as 16 kHz mono (`emo_pipeline.audio.load_audio`);
2. reads the frames with decord in windows of `WINDOW` frames, resampled to the target fps by nearest frame
   (target frame k shows the source frame on screen at its centre time `(k + 0.5) / fps`, at the stream's average
   frame rate), never the whole video at once;
3. per frame: the histogram scene-cut detector (`scenes.SceneCutDetector`) and mediapipe face detection
   (`emo_pipeline.face.detect_faces`, on a copy at most `ANALYSIS_SIDE` px on its long side); shots are cut into
   clips of `min_seconds..max_seconds` as the frames arrive (`scenes.ClipSplitter`);
4. per candidate clip: the face checks (`clips.check_face_track`: no face, several faces, face too small, face
   box jump); a usable clip gets one square crop fixed over the clip around the union of its face boxes
   (`crop_scale` x its larger side), and is written atomically (`clips.write_clip`): cropped frames, audio,
   wav2vec2 features of the clip's own audio, face boxes and mask, and head pose/speed from face mesh on the
   cropped frames.

Frames of the clip being assembled are kept in memory up to `frame_cache_mb` (at most `max_seconds +
min_seconds` of video is ever pending); frames past the budget are decoded a second time, by index, when their
clip is written. So each frame is decoded once unless the video is large, and memory stays bounded.

`preprocess_videos` runs the videos (in `workers` spawn processes), and keeps the dataset resumable: a video's
result is recorded in `.state/` when it is done; a re-run skips done videos and clips already written, and retries
failed videos only with `retry_failed`. `manifest.jsonl`, `failures.jsonl`, `stats.json` and
`speed_buckets.yaml` are rebuilt from those records, sorted, so an interrupted and resumed run produces the same
files as an uninterrupted one. See `emo_pipeline/data/clips.py` for the clip folder layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from emo_pipeline.data.clips import (
    CLIPS_DIR,
    META_FILE,
    REJECTION_REASONS,
    TMP_PREFIX,
    check_face_track,
    clip_sample_range,
    crop_region,
    load_annotations,
    write_clip,
)
from emo_pipeline.data.scenes import DEFAULT_SCENE_THRESHOLD, ClipSplitter, SceneCutDetector
from emo_pipeline.data.stats import dataset_statistics, write_speed_buckets_yaml
from emo_pipeline.errors import EMOInputError
from emo_pipeline.face import DEFAULT_FACE_SCALE

__all__ = [
    "ANALYSIS_SIDE",
    "DEFAULT_AUDIO_ENCODER",
    "FAILURE_REASONS",
    "VIDEO_EXTENSIONS",
    "WINDOW",
    "PreprocessConfig",
    "PreprocessSummary",
    "VideoResult",
    "find_videos",
    "preprocess_videos",
    "process_video",
    "video_key",
]

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
DEFAULT_AUDIO_ENCODER = "facebook/wav2vec2-base-960h"
SAMPLE_RATE = 16000  # wav2vec2's rate
WINDOW = 32  # frames decoded per decord call: bounded memory, few calls
ANALYSIS_SIDE = 640  # long side of the copy face detection runs on (mediapipe's models see 128-192 px anyway)

MANIFEST_FILE = "manifest.jsonl"
FAILURES_FILE = "failures.jsonl"
STATS_FILE = "stats.json"
SPEED_BUCKETS_FILE = "speed_buckets.yaml"
CONFIG_FILE = "preprocess_config.json"
STATE_DIR = ".state"
LOCK_FILE = ".lock"
_MANIFEST_INTERVAL = 30.0  # seconds between rewrites of the manifest during a run (it is always written at the end)

#: Why a video contributed no clips (or stopped early), the `reason` of its `failures.jsonl` row. A video all of
#: whose candidate clips were rejected fails with the most frequent `clips.REJECTION_REASONS` key instead.
FAILURE_REASONS = {
    "unreadable": "not a media file FFmpeg/decord can open (corrupt, truncated header, not a video)",
    "no_video": "the file has no video stream",
    "no_audio": "the file has no audio stream (EMO needs the speech)",
    "bad_audio": "the audio stream cannot be decoded or is empty",
    "decode_error": "the video stream fails to decode part-way; clips before the failure are kept",
    "too_short": "shorter than min_seconds (the shorter of the video and audio streams), or no shot is that long",
    "error": "an unexpected error (a bug or an environment problem); the message has the details",
    "crashed": "the worker process died on this video (e.g. a decoder segfault), twice",
}


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


@dataclass
class VideoResult:
    """What `process_video` did with one video.

    source: the video's path relative to the input folder (posix). status: "done" or "failed". reason/message:
    why it failed (`FAILURE_REASONS` or a rejection reason). clips: manifest rows of its clips (new and reused).
    rejected: rejected candidate clips per reason; rejections: `(clip index, reason, detail)` of each.
    frames: resampled frames analysed. reused: clips found already written. timings: seconds spent in
    "analysis" (decode, scene cuts, face detection) and "clips" (crop, face mesh, encoding, features).
    """

    source: str
    status: str = "done"
    reason: str | None = None
    message: str = ""
    clips: list[dict[str, Any]] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    rejections: list[tuple[int, str, str]] = field(default_factory=list)
    frames: int = 0
    reused: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def reject(self, clip_index: int, reason: str, detail: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.rejections.append((clip_index, reason, detail))

    def fail(self, reason: str, message: str) -> None:
        self.status, self.reason, self.message = "failed", reason, message


@dataclass
class PreprocessSummary:
    """Outcome of a `preprocess_videos` run. `videos`: videos found; `processed`/`skipped`: this run; `failed`:
    videos listed in failures.jsonl; `clips`/`hours`: the whole manifest; `rejected`: rejected candidate clips
    per reason; `failures`: failed videos per reason."""

    output_dir: str
    videos: int
    processed: int
    skipped: int
    failed: int
    clips: int
    hours: float
    rejected: dict[str, int]
    failures: dict[str, int]
    seconds: float

    def describe(self) -> str:
        lines = [
            f"{self.videos} videos: {self.processed} processed, {self.skipped} already done; {self.failed} failed "
            f"(see {FAILURES_FILE})",
            f"{self.clips} clips, {self.hours * 60:.1f} min, in {self.output_dir}/{MANIFEST_FILE} "
            f"({self.seconds:.1f} s)",
        ]
        if self.rejected:
            lines.append("rejected clips: " + ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())))
        if self.failures:
            lines.append("failed videos: " + ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items())))
        return "\n".join(lines)


class _VideoFailure(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# One video
# ----------------------------------------------------------------------------------------------------------------


def video_key(source: str) -> str:
    """Stable id of a source video from its path relative to the input folder: `<stem>-<8 hex of sha1(path)>`."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).stem)[:60] or "video"
    return f"{stem}-{hashlib.sha1(source.encode('utf-8')).hexdigest()[:8]}"


class _FrameCache:
    """Resampled frames by index, up to `budget` bytes; frames that do not fit are decoded again on demand."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget, self.used, self.frames = budget_bytes, 0, {}

    def put(self, index: int, frame: np.ndarray) -> None:
        if self.used + frame.nbytes <= self.budget:
            self.frames[index] = frame.copy()  # a copy, so the decoded batch it came from can be freed
            self.used += frame.nbytes

    def drop_before(self, index: int) -> None:
        for key in [k for k in self.frames if k < index]:
            self.used -= self.frames.pop(key).nbytes


def _load_audio_encoder(name_or_path: str | os.PathLike[str] | None, device: str) -> tuple[Any, Any] | None:
    if name_or_path is None:
        return None
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    try:
        model = Wav2Vec2Model.from_pretrained(os.fspath(name_or_path)).eval().to(device)
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(os.fspath(name_or_path))
    except (OSError, ValueError) as error:
        raise EMOInputError(
            f"cannot load the audio encoder {os.fspath(name_or_path)!r} (a wav2vec2 hub id or a folder with "
            f"config.json, weights and preprocessor_config.json): {error}"
        ) from error
    return model, extractor


def process_video(
    path: str | os.PathLike[str],
    source: str,
    output_dir: str | os.PathLike[str],
    config: PreprocessConfig,
    audio_encoder: tuple[Any, Any] | None = None,
    decode_threads: int = 0,
) -> VideoResult:
    """Turn one video into clip folders under `<output_dir>/clips/` (see the module docstring for the steps).

    Args:
        path: the video file.
        source: its name in the dataset (path relative to the input folder); clip ids derive from it.
        output_dir: the dataset folder.
        config: the dataset settings.
        audio_encoder: `(Wav2Vec2Model, Wav2Vec2FeatureExtractor)`; None writes no features.
        decode_threads: decord decoder threads (0 = decord's default).

    Returns:
        A `VideoResult`. Never raises for a bad video (the reason is in the result), only for KeyboardInterrupt
        and the like. Clips already present (a resumed run) are reused, not rewritten.
    """
    result = VideoResult(source=source)
    start = time.perf_counter()
    clip_seconds = [0.0]
    try:
        _process(
            os.fspath(path), source, os.fspath(output_dir), config, audio_encoder, decode_threads, result, clip_seconds
        )
    except _VideoFailure as failure:
        result.fail(failure.reason, str(failure))
    except Exception as error:  # one bad video never stops the run: record it with the traceback's last frame
        where = traceback.extract_tb(error.__traceback__)[-1]
        result.fail("error", f"{type(error).__name__}: {error} ({os.path.basename(where.filename)}:{where.lineno})")
        logger.debug("unexpected error on %s", source, exc_info=True)
    if result.status == "done" and not result.clips:
        if result.rejected:
            order = list(REJECTION_REASONS)
            reason = max(result.rejected, key=lambda r: (result.rejected[r], -order.index(r)))
            detail = next(d for _, r, d in result.rejections if r == reason)
            summary = ", ".join(f"{k} {v}" for k, v in sorted(result.rejected.items()))
            result.fail(reason, f"no usable clip ({summary}); e.g. {detail}")
        else:
            result.fail("too_short", f"no shot of at least {config.min_seconds:g} s")
    total = time.perf_counter() - start
    result.timings = {
        "analysis": round(total - clip_seconds[0], 4),
        "clips": round(clip_seconds[0], 4),
        "total": round(total, 4),
    }
    return result


def _probe(path: str) -> None:
    import av

    try:
        container = av.open(path, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise _VideoFailure("unreadable", f"cannot open as a media file ({error})") from error
    with container:
        kinds = {stream.type for stream in container.streams}
    if "video" not in kinds:
        raise _VideoFailure("no_video", f"no video stream (streams: {', '.join(sorted(kinds)) or 'none'})")
    if "audio" not in kinds:
        raise _VideoFailure("no_audio", "no audio stream; EMO trains on speech/singing with its video")


def _decord_message(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text)[:300]


def _process(
    path: str,
    source: str,
    output_dir: str,
    config: PreprocessConfig,
    audio_encoder: tuple[Any, Any] | None,
    decode_threads: int,
    result: VideoResult,
    clip_seconds: list[float],
) -> None:
    import cv2
    import decord

    from emo_pipeline.audio import load_audio
    from emo_pipeline.face import detect_faces

    _probe(path)
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=decode_threads)
        source_frames, source_fps = len(reader), float(reader.get_avg_fps())
        if source_frames == 0 or not source_fps > 0:
            raise _VideoFailure("unreadable", f"no frames (count {source_frames}, fps {source_fps:g})")
        reader.get_batch([0])  # a file truncated or corrupt near its start fails here, before the audio is read
    except (RuntimeError, decord.DECORDError) as error:
        raise _VideoFailure("unreadable", f"decord cannot read the video ({_decord_message(error)})") from error
    try:
        audio = load_audio(path, SAMPLE_RATE, max_duration=None)
    except EMOInputError as error:
        raise _VideoFailure("bad_audio", str(error)) from error
    fps = config.fps_fraction
    video_frames = math.floor(Fraction(source_frames) / Fraction(source_fps).limit_denominator(1_000_000) * fps)
    audio_frames = math.floor(Fraction(audio.size, SAMPLE_RATE) * fps)
    total = min(video_frames, audio_frames)
    if total < config.min_frames:
        raise _VideoFailure(
            "too_short",
            f"{float(total / fps):.2f} s usable (video {source_frames / source_fps:.2f} s, audio "
            f"{audio.size / SAMPLE_RATE:.2f} s) < min_seconds {config.min_seconds:g}",
        )
    # Target frame k shows the source frame on screen at the target frame's centre time.
    source_index = np.minimum(
        ((np.arange(total) + 0.5) * (source_fps / float(fps))).astype(np.int64), source_frames - 1
    )

    key = video_key(source)
    clips_dir = os.path.join(output_dir, CLIPS_DIR)
    os.makedirs(clips_dir, exist_ok=True)
    detector = SceneCutDetector(config.scene_threshold)
    splitter = ClipSplitter(config.min_frames, config.max_frames)
    cache = _FrameCache(int(config.frame_cache_mb * 2**20))
    detections: list[np.ndarray] = []
    frame_size: list[int] = []  # (height, width) of the source frames
    clip_count = [0]
    second_reader: list[Any] = []

    def decode(indices: np.ndarray) -> np.ndarray:
        """Source frames at resampled indices, from a second reader (the first one keeps its sequential place)."""
        if not second_reader:
            second_reader.append(decord.VideoReader(path, ctx=decord.cpu(0), num_threads=decode_threads))
        unique, inverse = np.unique(source_index[indices], return_inverse=True)
        try:
            return second_reader[0].get_batch(unique.tolist()).asnumpy()[inverse]
        except (RuntimeError, decord.DECORDError) as error:
            raise _VideoFailure("decode_error", f"frames failed to decode ({_decord_message(error)})") from error

    def windows(first: int, end: int) -> Iterator[np.ndarray]:
        for lo in range(first, end, WINDOW):
            indices = np.arange(lo, min(end, lo + WINDOW))
            if all(int(i) in cache.frames for i in indices):
                yield np.stack([cache.frames[int(i)] for i in indices])
            else:
                yield decode(indices)

    def handle(first: int, end: int) -> None:
        clip_index = clip_count[0]
        clip_count[0] += 1
        clip_id = f"{key}-{clip_index:04d}"
        clip_dir = os.path.join(clips_dir, clip_id)
        meta = os.path.join(clip_dir, META_FILE)
        if os.path.exists(meta):  # written by an earlier, interrupted run
            with open(meta, encoding="utf-8") as handle_:
                result.clips.append(json.load(handle_))
            result.reused += 1
            return
        track = check_face_track(
            detections[first:end], config.min_face, config.max_jump, config.max_bad_frame_fraction
        )
        if track.reason is not None:
            result.reject(clip_index, track.reason, f"frames {first}-{end - 1}: {track.detail}")
            return
        union = [*track.boxes[:, :2].min(axis=0), *track.boxes[:, 2:].max(axis=0)]
        region = crop_region(union, config.crop_scale, frame_size[1], frame_size[0])
        lo, hi = clip_sample_range(first, end - first, fps, SAMPLE_RATE)
        clip_audio = audio[lo:hi]
        if clip_audio.size < hi - lo:  # the last clip's audio may end a sample early after rounding
            clip_audio = np.pad(clip_audio, (0, hi - lo - clip_audio.size))
        row = {
            "clip_id": clip_id,
            "path": f"{CLIPS_DIR}/{clip_id}",
            "source": source,
            "clip_index": clip_index,
            "start": round(float(first / fps), 6),
            "end": round(float(end / fps), 6),
            "source_fps": round(source_fps, 6),
            "source_size": [frame_size[1], frame_size[0]],
        }
        began = time.perf_counter()
        written, detail = write_clip(
            clip_dir,
            windows(first, end),
            region,
            track,
            clip_audio,
            fps,
            config.size,
            row,
            audio_encoder=audio_encoder,
            features_fp16=config.features_fp16,
            crf=config.crf,
            sample_rate=SAMPLE_RATE,
        )
        clip_seconds[0] += time.perf_counter() - began
        if written is None:
            result.reject(clip_index, "no_face_mesh", f"frames {first}-{end - 1}: {detail}")
        else:
            result.clips.append(written)

    def emit(clips: list[tuple[int, int]], dropped: int = 0) -> None:
        if dropped:
            seconds = float(dropped / fps)
            result.reject(-1, "scene_too_short", f"{dropped} frames ({seconds:.2f} s) left over from a shot")
        for first, end in clips:
            handle(first, end)
        cache.drop_before(splitter.cursor)

    decode_error = None
    analysed = 0
    for lo in range(0, total, WINDOW):
        ks = np.arange(lo, min(total, lo + WINDOW))
        unique, inverse = np.unique(source_index[ks], return_inverse=True)
        try:
            batch = reader.get_batch(unique.tolist()).asnumpy()
        except (RuntimeError, decord.DECORDError) as error:
            decode_error = f"decoding stopped at {float(lo / fps):.2f} s ({_decord_message(error)})"
            break
        if not frame_size:
            frame_size.extend(batch.shape[1:3])
        height, width = frame_size
        scale = min(1.0, ANALYSIS_SIDE / max(height, width))
        for j, k in enumerate(ks.tolist()):
            frame = batch[inverse[j]]
            small = (
                frame
                if scale == 1.0
                else cv2.resize(frame, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
            )
            if detector.update(small):
                emit(*splitter.close(k))
                splitter.start_scene(k)
            detections.append(detect_faces(small, min_confidence=config.detection_confidence).boxes / scale)
            cache.put(k, frame)
        del batch
        analysed = int(ks[-1]) + 1
        emit(splitter.advance(analysed))
    emit(*splitter.close(analysed))
    result.frames = analysed
    if decode_error is not None:
        if analysed == 0:
            raise _VideoFailure("decode_error", decode_error)
        result.fail("decode_error", decode_error + f"; kept {len(result.clips)} clips before it")


# ----------------------------------------------------------------------------------------------------------------
# Many videos
# ----------------------------------------------------------------------------------------------------------------


def find_videos(input_dir: str | os.PathLike[str], exclude: str | os.PathLike[str] | None = None) -> list[str]:
    """Video files under `input_dir` (recursive, `VIDEO_EXTENSIONS`, any case; hidden files and folders and the
    `exclude` folder skipped), as sorted posix paths relative to `input_dir`."""
    root = Path(input_dir).resolve()
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and (skip is None or here / d != skip))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(VIDEO_EXTENSIONS):
                found.append((here / name).relative_to(root).as_posix())
    return sorted(found)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(output_dir: str) -> Iterator[None]:
    """One run per dataset folder at a time (an advisory lock the OS releases if the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no lock
        yield
        return
    handle = open(os.path.join(output_dir, LOCK_FILE), "w")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            raise EMOInputError(f"another emo-preprocess run is writing to {output_dir!r}; wait for it") from error
        yield
    finally:
        handle.close()


# Worker processes: one audio encoder each, loaded by the initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(config: PreprocessConfig, output_dir: str, threads: int) -> None:
    if sys.platform.startswith("linux"):  # die with the parent: a killed run must not leave writers behind
        with contextlib.suppress(Exception):
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    import torch

    torch.set_num_threads(threads)
    _WORKER.update(
        config=config,
        output_dir=output_dir,
        threads=threads,
        encoder=_load_audio_encoder(config.audio_encoder, config.device),
    )


def _worker_ping() -> int:
    return os.getpid()


def _worker_job(path: str, source: str) -> VideoResult:
    return process_video(
        path, source, _WORKER["output_dir"], _WORKER["config"], _WORKER["encoder"], decode_threads=_WORKER["threads"]
    )


def _run_pool(
    jobs: list[tuple[str, str]], workers: int, config: PreprocessConfig, output_dir: str, on_result: Any
) -> None:
    """Run jobs in `workers` spawn processes. A job whose worker dies (BrokenProcessPool) is retried alone in a
    fresh pool; if it kills that one too it fails as "crashed"."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // workers)
    pending = deque((path, source, 0) for path, source in jobs)

    def new_pool() -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(config, output_dir, threads),
        )
        try:  # a pool that cannot run a no-op is an environment problem, not a bad video: stop the run
            pool.submit(_worker_ping).result()
        except BrokenProcessPool as error:
            pool.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError(
                "emo-preprocess worker processes fail to start (see the errors above); when calling "
                'preprocess_videos(workers > 1) from a script, guard it with `if __name__ == "__main__":`'
            ) from error
        return pool

    pool = new_pool()
    inflight: dict[Any, tuple[str, str, int]] = {}

    def settle(future: Any, job: tuple[str, str, int]) -> bool:
        """Hand a finished job's result on; True if its pool broke (the job is then retried alone, or fails as
        "crashed" if it was already the retry)."""
        path, source, attempts = job
        try:
            result = future.result()
        except BrokenProcessPool:
            if not attempts:
                pending.appendleft((path, source, 1))
                return True
            result = VideoResult(source=source)
            result.fail("crashed", "the worker process died while processing this video, twice")
            on_result(result)
            return True
        on_result(result)
        return False

    try:
        while pending or inflight:
            isolating = any(job[2] for job in inflight.values())
            while pending and not isolating and len(inflight) < 2 * workers:
                if pending[0][2] and inflight:  # a job retried after a crash waits to run alone
                    break
                job = pending.popleft()
                inflight[pool.submit(_worker_job, job[0], job[1])] = job
                isolating = bool(job[2])
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                broken |= settle(future, inflight.pop(future))
            if broken:  # every other job of the broken pool finishes now, with a result or BrokenProcessPool
                wait(inflight)
                for future, job in list(inflight.items()):
                    settle(future, job)
                inflight.clear()
                pool.shutdown(wait=True)
                pool = new_pool()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def preprocess_videos(
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    fps: float = 25.0,
    size: int = 512,
    min_seconds: float = 3.0,
    max_seconds: float = 12.0,
    crop_scale: float = DEFAULT_FACE_SCALE,
    min_face: float = 100.0,
    max_jump: float = 0.25,
    max_bad_frame_fraction: float = 0.05,
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD,
    detection_confidence: float = 0.5,
    audio_encoder: str | os.PathLike[str] | None = DEFAULT_AUDIO_ENCODER,
    features_fp16: bool = False,
    crf: int = 18,
    speed_buckets: int = 9,
    frame_cache_mb: float = 1024.0,
    device: str = "cpu",
    workers: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
) -> PreprocessSummary:
    """Turn every video under `input_dir` into clips of an EMO training dataset in `output_dir` (resumable).

    The settings are `PreprocessConfig`'s fields (see there for the reasons behind the defaults); `audio_encoder`
    is a wav2vec2 hub id or a local folder (None: no features). `workers` > 1 runs videos in that many spawn
    processes (each loads its own audio encoder); 1 runs them in this process. `retry_failed` reprocesses
    the videos listed in `failures.jsonl` (otherwise a re-run skips them, as it skips finished videos).

    Writes `<output_dir>/clips/<clip_id>/` (layout: `emo_pipeline.data.clips`), `manifest.jsonl` (one row per
    clip, sorted by source and start time), `failures.jsonl` (one row per failed video: video, reason, message,
    rejected, clips), `stats.json` and `speed_buckets.yaml`.

    Raises:
        EMOInputError: missing input folder, no videos in it, a bad setting, an audio encoder that cannot be
            loaded, another run on the same output folder, or an output folder made with other settings. Bad
            videos never raise: they are recorded in `failures.jsonl`.
    """
    started = time.perf_counter()
    config = PreprocessConfig(
        fps=float(fps),
        size=size,
        min_seconds=float(min_seconds),
        max_seconds=float(max_seconds),
        crop_scale=float(crop_scale),
        min_face=float(min_face),
        max_jump=float(max_jump),
        max_bad_frame_fraction=float(max_bad_frame_fraction),
        scene_threshold=float(scene_threshold),
        detection_confidence=float(detection_confidence),
        audio_encoder=None if audio_encoder is None else os.fspath(audio_encoder),
        features_fp16=bool(features_fp16),
        crf=int(crf),
        speed_buckets=int(speed_buckets),
        frame_cache_mb=float(frame_cache_mb),
        device=str(device),
    )
    config.validate()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise EMOInputError(f"workers must be an int >= 1, got {workers!r}")
    input_path, output_path = Path(input_dir), Path(output_dir)
    if not input_path.is_dir():
        raise EMOInputError(f"input folder {os.fspath(input_dir)!r} does not exist or is not a folder")
    if output_path.exists() and not output_path.is_dir():
        raise EMOInputError(f"output {os.fspath(output_dir)!r} exists and is not a folder")
    sources = find_videos(input_path, exclude=output_path)
    if not sources:
        raise EMOInputError(
            f"no videos in {os.fspath(input_dir)!r} (looked for {', '.join(VIDEO_EXTENSIONS)}, in subfolders too)"
        )
    out = os.fspath(output_path.resolve())
    os.makedirs(os.path.join(out, CLIPS_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    with _locked(out):
        encoder = _load_audio_encoder(config.audio_encoder, config.device)  # fails early on a bad encoder
        _check_config(out, config)
        for name in os.listdir(os.path.join(out, CLIPS_DIR)):  # leftovers of a killed run
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(out, CLIPS_DIR, name), ignore_errors=True)

        states: dict[str, dict[str, Any]] = {}
        jobs: list[tuple[str, str]] = []
        for source in sources:
            state = _read_json(_state_path(out, source))
            if state is not None and _state_complete(out, state) and (state["status"] == "done" or not retry_failed):
                states[source] = state
            else:
                jobs.append((os.fspath(input_path.resolve() / source), source))
        skipped = len(sources) - len(jobs)
        processed = 0
        last_write = [time.monotonic()]

        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(
            total=len(sources),
            initial=skipped,
            desc="emo-preprocess",
            unit="video",
            disable=not progress,
            dynamic_ncols=True,
        )

        def on_result(video: VideoResult) -> None:
            nonlocal processed
            processed += 1
            for clip_index, reason, detail in video.rejections:
                where = f"clip {clip_index}" if clip_index >= 0 else "shot remainder"
                logger.info("%s: %s rejected: %s (%s)", video.source, where, reason, detail)
            if video.status == "failed":
                logger.warning("%s failed: %s (%s)", video.source, video.reason, video.message)
            state = {
                "source": video.source,
                "status": video.status,
                "reason": video.reason,
                "message": video.message,
                "clips": sorted(row["clip_id"] for row in video.clips),
                "rejected": dict(sorted(video.rejected.items())),
                "frames": video.frames,
                "timings": video.timings,
            }
            _write_atomic(_state_path(out, video.source), json.dumps(state, indent=1, sort_keys=True) + "\n")
            states[video.source] = state
            bar.update(1)
            bar.set_postfix(
                clips=sum(len(s["clips"]) for s in states.values()),
                failed=sum(s["status"] == "failed" for s in states.values()),
                refresh=False,
            )
            if time.monotonic() - last_write[0] > _MANIFEST_INTERVAL:
                _write_manifest(out, sources, states)
                last_write[0] = time.monotonic()

        try:
            with logging_redirect_tqdm() if progress else contextlib.nullcontext():
                if workers == 1:
                    for path, source in jobs:
                        on_result(process_video(path, source, out, config, encoder))
                elif jobs:
                    encoder = None  # each worker loads its own
                    _run_pool(jobs, workers, config, out, on_result)
        finally:
            bar.close()
            rows = _write_manifest(out, sources, states)
        stats = _write_statistics(out, sources, states, rows, config)
    failures = Counter(s["reason"] for s in (states.get(src) for src in sources) if s and s["status"] == "failed")
    return PreprocessSummary(
        output_dir=out,
        videos=len(sources),
        processed=processed,
        skipped=skipped,
        failed=sum(failures.values()),
        clips=len(rows),
        hours=stats["hours"],
        rejected=stats["rejected_clips"],
        failures=dict(sorted(failures.items())),
        seconds=round(time.perf_counter() - started, 3),
    )


def _state_path(output_dir: str, source: str) -> str:
    return os.path.join(output_dir, STATE_DIR, f"{video_key(source)}.json")


def _state_complete(output_dir: str, state: dict[str, Any]) -> bool:
    """A recorded video whose clip folders are all still there."""
    return state.get("status") in ("done", "failed") and all(
        os.path.exists(os.path.join(output_dir, CLIPS_DIR, clip_id, META_FILE)) for clip_id in state.get("clips", [])
    )


def _check_config(output_dir: str, config: PreprocessConfig) -> None:
    path = os.path.join(output_dir, CONFIG_FILE)
    wanted = config.fingerprint()
    existing = _read_json(path)
    if existing is None:
        _write_atomic(path, json.dumps(wanted, indent=1, sort_keys=True) + "\n")
        return
    differences = {k: (existing.get(k), v) for k, v in wanted.items() if existing.get(k) != v}
    if differences:
        listed = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in sorted(differences.items()))
        raise EMOInputError(
            f"output folder {output_dir!r} holds a dataset made with other settings ({listed}); use a new output "
            "folder, or the same settings to resume it"
        )


def _write_manifest(output_dir: str, sources: list[str], states: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rebuild manifest.jsonl and failures.jsonl from the recorded videos; return the manifest rows."""
    rows, failures = [], []
    for source in sources:
        state = states.get(source)
        if state is None:
            continue
        for clip_id in state["clips"]:
            row = _read_json(os.path.join(output_dir, CLIPS_DIR, clip_id, META_FILE))
            if row is not None:
                rows.append(row)
        if state["status"] == "failed":
            failures.append(
                {
                    "video": source,
                    "reason": state["reason"],
                    "message": state["message"],
                    "rejected": state["rejected"],
                    "clips": len(state["clips"]),
                }
            )
    rows.sort(key=lambda row: (row["source"], row["start"], row["clip_id"]))
    _write_atomic(
        os.path.join(output_dir, MANIFEST_FILE), "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    )
    _write_atomic(
        os.path.join(output_dir, FAILURES_FILE), "".join(json.dumps(row, sort_keys=True) + "\n" for row in failures)
    )
    return rows


def _write_statistics(
    output_dir: str,
    sources: list[str],
    states: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
    config: PreprocessConfig,
) -> dict[str, Any]:
    speeds = [load_annotations(os.path.join(output_dir, row["path"]))["speed"] for row in rows]
    stats = dataset_statistics(rows, speeds, num_buckets=config.speed_buckets)
    recorded = [states[s] for s in sources if s in states]
    rejected: Counter[str] = Counter()
    for state in recorded:
        rejected.update(state["rejected"])
    stats.update(
        videos=len(sources),
        videos_with_clips=sum(bool(s["clips"]) for s in recorded),
        videos_failed=sum(s["status"] == "failed" for s in recorded),
        videos_pending=len(sources) - len(recorded),
        failures=dict(sorted(Counter(s["reason"] for s in recorded if s["status"] == "failed").items())),
        rejected_clips=dict(sorted(rejected.items())),
        config=config.fingerprint(),
    )
    _write_atomic(os.path.join(output_dir, STATS_FILE), json.dumps(stats, indent=1, sort_keys=True) + "\n")
    buckets = stats["speed_buckets"]
    write_speed_buckets_yaml(
        os.path.join(output_dir, SPEED_BUCKETS_FILE), buckets["centers"], buckets["radii"], stats["frames"]
    )
    return stats

"""One source video -> clip folders of an `emo-preprocess` dataset (EMO, arXiv 2402.17485, Sec. 4.1).

For each video (mp4/mov/mkv/webm/avi/m4v, any size and frame rate, with an audio track) `process_video`:

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from emo_pipeline.data.clips import (
    CLIPS_DIR,
    META_FILE,
    REJECTION_REASONS,
    check_face_track,
    clip_sample_range,
    crop_region,
    write_clip,
)
from emo_pipeline.data.preprocess_config import ANALYSIS_SIDE, SAMPLE_RATE, WINDOW, PreprocessConfig
from emo_pipeline.data.scenes import ClipSplitter, SceneCutDetector
from emo_pipeline.errors import EMOInputError

__all__ = ["FAILURE_REASONS", "VideoResult", "load_audio_encoder", "process_video", "video_key"]

logger = logging.getLogger("emo_pipeline.data.preprocess")  # one logger for the whole of emo-preprocess

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


class _VideoFailure(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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


def load_audio_encoder(name_or_path: str | os.PathLike[str] | None, device: str) -> tuple[Any, Any] | None:
    """`(Wav2Vec2Model, Wav2Vec2FeatureExtractor)` from a hub id or folder on `device`; None for None."""
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
    job = _VideoJob(os.fspath(path), source, os.fspath(output_dir), config, audio_encoder, decode_threads, result)
    try:
        job.run()
    except _VideoFailure as failure:
        result.fail(failure.reason, str(failure))
    except Exception as error:  # one bad video never stops the run: record it with the traceback's last frame
        where = traceback.extract_tb(error.__traceback__)[-1]
        result.fail("error", f"{type(error).__name__}: {error} ({os.path.basename(where.filename)}:{where.lineno})")
        logger.debug("unexpected error on %s", source, exc_info=True)
    if result.status == "done" and not result.clips:
        _fail_without_clips(result, config)
    total = time.perf_counter() - start
    result.timings = {
        "analysis": round(total - job.clip_seconds, 4),
        "clips": round(job.clip_seconds, 4),
        "total": round(total, 4),
    }
    return result


def _fail_without_clips(result: VideoResult, config: PreprocessConfig) -> None:
    """A video that ran to its end without a clip fails with its most frequent rejection reason (ties: the order of
    `REJECTION_REASONS`), or as too short when no shot was long enough for a candidate clip."""
    if result.rejected:
        order = list(REJECTION_REASONS)
        reason = max(result.rejected, key=lambda r: (result.rejected[r], -order.index(r)))
        detail = next(d for _, r, d in result.rejections if r == reason)
        summary = ", ".join(f"{k} {v}" for k, v in sorted(result.rejected.items()))
        result.fail(reason, f"no usable clip ({summary}); e.g. {detail}")
    else:
        result.fail("too_short", f"no shot of at least {config.min_seconds:g} s")


class _VideoJob:
    """One video on its way through `process_video`: its readers and audio (`_open`), the frame-by-frame analysis
    (`_analyse`), and the candidate clips it hands to `_write_candidate` as shots are cut."""

    def __init__(
        self,
        path: str,
        source: str,
        output_dir: str,
        config: PreprocessConfig,
        audio_encoder: tuple[Any, Any] | None,
        decode_threads: int,
        result: VideoResult,
    ) -> None:
        self.path, self.source, self.config = path, source, config
        self.audio_encoder, self.decode_threads, self.result = audio_encoder, decode_threads, result
        self.clips_dir = os.path.join(output_dir, CLIPS_DIR)
        self.key = video_key(source)
        self.clip_seconds = 0.0  # time spent writing clips (the rest is analysis)
        self.detections: list[np.ndarray] = []  # face boxes per analysed frame, source pixels
        self.frame_size: tuple[int, int] | None = None  # (height, width) of the source frames
        self.clip_count = 0
        self.second_reader: Any = None

    def run(self) -> None:
        self._open()
        self._analyse()

    # -- opening -------------------------------------------------------------------------------------------

    def _open(self) -> None:
        """Probe the file, open the frame reader, decode the audio; fix the number of resampled frames and the
        source frame each shows. Raises `_VideoFailure` for an unusable file."""
        import decord

        from emo_pipeline.audio import load_audio

        _probe(self.path)
        try:
            self.reader = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=self.decode_threads)
            source_frames, self.source_fps = len(self.reader), float(self.reader.get_avg_fps())
            if source_frames == 0 or not self.source_fps > 0:
                raise _VideoFailure("unreadable", f"no frames (count {source_frames}, fps {self.source_fps:g})")
            self.reader.get_batch([0])  # a file truncated or corrupt near its start fails here, before the audio
        except (RuntimeError, decord.DECORDError) as error:
            raise _VideoFailure("unreadable", f"decord cannot read the video ({_decord_message(error)})") from error
        try:
            self.audio = load_audio(self.path, SAMPLE_RATE, max_duration=None)
        except EMOInputError as error:
            raise _VideoFailure("bad_audio", str(error)) from error
        self.fps = fps = self.config.fps_fraction
        source_fps = Fraction(self.source_fps).limit_denominator(1_000_000)
        video_frames = math.floor(Fraction(source_frames) / source_fps * fps)
        audio_frames = math.floor(Fraction(self.audio.size, SAMPLE_RATE) * fps)
        self.total = min(video_frames, audio_frames)
        if self.total < self.config.min_frames:
            raise _VideoFailure(
                "too_short",
                f"{float(self.total / fps):.2f} s usable (video {source_frames / self.source_fps:.2f} s, audio "
                f"{self.audio.size / SAMPLE_RATE:.2f} s) < min_seconds {self.config.min_seconds:g}",
            )
        # Target frame k shows the source frame on screen at the target frame's centre time.
        self.source_index = np.minimum(
            ((np.arange(self.total) + 0.5) * (self.source_fps / float(fps))).astype(np.int64), source_frames - 1
        )
        os.makedirs(self.clips_dir, exist_ok=True)
        self.detector = SceneCutDetector(self.config.scene_threshold)
        self.splitter = ClipSplitter(self.config.min_frames, self.config.max_frames)
        self.cache = _FrameCache(int(self.config.frame_cache_mb * 2**20))

    # -- analysis ------------------------------------------------------------------------------------------

    def _analyse(self) -> None:
        """Decode the resampled frames window by window; cut shots, detect faces, write clips as they complete.
        A decode failure part-way keeps the clips before it (the video fails as "decode_error")."""
        import decord

        decode_error = None
        analysed = 0
        for lo in range(0, self.total, WINDOW):
            ks = np.arange(lo, min(self.total, lo + WINDOW))
            unique, inverse = np.unique(self.source_index[ks], return_inverse=True)
            try:
                batch = self.reader.get_batch(unique.tolist()).asnumpy()
            except (RuntimeError, decord.DECORDError) as error:
                decode_error = f"decoding stopped at {float(lo / self.fps):.2f} s ({_decord_message(error)})"
                break
            if self.frame_size is None:
                self.frame_size = tuple(batch.shape[1:3])
            for j, k in enumerate(ks.tolist()):
                self._analyse_frame(k, batch[inverse[j]])
            del batch
            analysed = int(ks[-1]) + 1
            self._emit(self.splitter.advance(analysed))
        self._emit(*self.splitter.close(analysed))
        self.result.frames = analysed
        if decode_error is not None:
            if analysed == 0:
                raise _VideoFailure("decode_error", decode_error)
            self.result.fail("decode_error", decode_error + f"; kept {len(self.result.clips)} clips before it")

    def _analyse_frame(self, k: int, frame: np.ndarray) -> None:
        """Resampled frame `k`: scene cut (closing the shot before it), face boxes, frame cache."""
        import cv2

        from emo_pipeline.face import detect_faces

        height, width = self.frame_size
        scale = min(1.0, ANALYSIS_SIDE / max(height, width))
        small = (
            frame
            if scale == 1.0
            else cv2.resize(frame, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        )
        if self.detector.update(small):
            self._emit(*self.splitter.close(k))
            self.splitter.start_scene(k)
        self.detections.append(detect_faces(small, min_confidence=self.config.detection_confidence).boxes / scale)
        self.cache.put(k, frame)

    def _emit(self, clips: list[tuple[int, int]], dropped: int = 0) -> None:
        """Candidate clips `[(first, end), ...]` the splitter closed; `dropped` frames of a shot fit no clip."""
        if dropped:
            seconds = float(dropped / self.fps)
            self.result.reject(-1, "scene_too_short", f"{dropped} frames ({seconds:.2f} s) left over from a shot")
        for first, end in clips:
            self._write_candidate(first, end)
        self.cache.drop_before(self.splitter.cursor)

    # -- clips ---------------------------------------------------------------------------------------------

    def _write_candidate(self, first: int, end: int) -> None:
        """Frames `first..end-1` as a clip: reused if an earlier run wrote it, rejected by the face checks, or
        cropped and written."""
        config, result = self.config, self.result
        clip_index = self.clip_count
        self.clip_count += 1
        clip_id = f"{self.key}-{clip_index:04d}"
        clip_dir = os.path.join(self.clips_dir, clip_id)
        meta = os.path.join(clip_dir, META_FILE)
        if os.path.exists(meta):  # written by an earlier, interrupted run
            with open(meta, encoding="utf-8") as handle:
                result.clips.append(json.load(handle))
            result.reused += 1
            return
        track = check_face_track(
            self.detections[first:end], config.min_face, config.max_jump, config.max_bad_frame_fraction
        )
        if track.reason is not None:
            result.reject(clip_index, track.reason, f"frames {first}-{end - 1}: {track.detail}")
            return
        height, width = self.frame_size
        union = [*track.boxes[:, :2].min(axis=0), *track.boxes[:, 2:].max(axis=0)]
        region = crop_region(union, config.crop_scale, width, height)
        began = time.perf_counter()
        written, detail = write_clip(
            clip_dir,
            self._frames(first, end),
            region,
            track,
            self._clip_audio(first, end),
            self.fps,
            config.size,
            self._clip_row(clip_id, clip_index, first, end),
            audio_encoder=self.audio_encoder,
            features_fp16=config.features_fp16,
            crf=config.crf,
            sample_rate=SAMPLE_RATE,
        )
        self.clip_seconds += time.perf_counter() - began
        if written is None:
            result.reject(clip_index, "no_face_mesh", f"frames {first}-{end - 1}: {detail}")
        else:
            result.clips.append(written)

    def _clip_row(self, clip_id: str, clip_index: int, first: int, end: int) -> dict[str, Any]:
        """The manifest row of a clip as far as the video knows it (`write_clip` completes it)."""
        height, width = self.frame_size
        return {
            "clip_id": clip_id,
            "path": f"{CLIPS_DIR}/{clip_id}",
            "source": self.source,
            "clip_index": clip_index,
            "start": round(float(first / self.fps), 6),
            "end": round(float(end / self.fps), 6),
            "source_fps": round(self.source_fps, 6),
            "source_size": [width, height],
        }

    def _clip_audio(self, first: int, end: int) -> np.ndarray:
        """The audio samples of frames `first..end-1`."""
        lo, hi = clip_sample_range(first, end - first, self.fps, SAMPLE_RATE)
        clip_audio = self.audio[lo:hi]
        if clip_audio.size < hi - lo:  # the last clip's audio may end a sample early after rounding
            clip_audio = np.pad(clip_audio, (0, hi - lo - clip_audio.size))
        return clip_audio

    def _frames(self, first: int, end: int) -> Iterator[np.ndarray]:
        """Source frames `first..end-1` in windows: from the cache, or decoded again when they did not fit."""
        for lo in range(first, end, WINDOW):
            indices = np.arange(lo, min(end, lo + WINDOW))
            if all(int(i) in self.cache.frames for i in indices):
                yield np.stack([self.cache.frames[int(i)] for i in indices])
            else:
                yield self._decode(indices)

    def _decode(self, indices: np.ndarray) -> np.ndarray:
        """Source frames at resampled indices, from a second reader (the first one keeps its sequential place)."""
        import decord

        if self.second_reader is None:
            self.second_reader = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=self.decode_threads)
        unique, inverse = np.unique(self.source_index[indices], return_inverse=True)
        try:
            return self.second_reader.get_batch(unique.tolist()).asnumpy()[inverse]
        except (RuntimeError, decord.DECORDError) as error:
            raise _VideoFailure("decode_error", f"frames failed to decode ({_decord_message(error)})") from error


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


def _decord_message(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text)[:300]

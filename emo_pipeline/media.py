"""Video files: reading frames with decord, and a streaming, all-or-nothing mp4 writer with muxed audio (PyAV).

The pipeline generates a video clip by clip (EMO, arXiv 2402.17485, autoregressive clips); `VideoWriter` encodes
each clip as it arrives, so memory stays flat in the video length, interleaves the audio track as it goes, and
only puts a file at the target path once the whole video has been written. A failed or interrupted write leaves
nothing at the target path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import weakref
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

from emo_pipeline.audio import _fps_fraction, _is_torch_tensor
from emo_pipeline.errors import EMOInputError

__all__ = ["MP4_METADATA_KEYS", "X264_PRESETS", "VideoInfo", "VideoWriter", "read_video_frames", "read_video_info"]

#: Tags FFmpeg's mp4 muxer stores in the standard (iTunes-style) metadata boxes that players read. Any other key
#: makes the writer switch on `movflags=use_metadata_tags`, which stores arbitrary keys (as `mdta` entries, read
#: by FFmpeg/ffprobe and PyAV) instead of silently dropping them.
MP4_METADATA_KEYS = frozenset(
    {
        "title",
        "artist",
        "album_artist",
        "album",
        "composer",
        "date",
        "genre",
        "comment",
        "description",
        "synopsis",
        "copyright",
        "grouping",
        "lyrics",
        "encoder",
    }
)

#: x264's speed/size presets, fastest first.
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """A video file's stream properties: `fps` (frames/s, average), `num_frames`, `width`/`height` (pixels),
    `duration` (s, = num_frames / fps)."""

    fps: float
    num_frames: int
    width: int
    height: int
    duration: float


def _open_reader(path: str | os.PathLike[str]) -> Any:
    import decord

    name = os.fspath(path)
    if not os.path.exists(name):
        raise EMOInputError(f"video file {name!r} does not exist")
    if os.path.isdir(name):
        raise EMOInputError(f"video file {name!r} is a directory")
    try:
        return decord.VideoReader(name, ctx=decord.cpu(0))
    except (RuntimeError, decord.DECORDError) as error:  # DECORDError: no video stream, undecodable
        reason = _decord_reason(error)
        if "cannot find video stream" in reason:
            raise EMOInputError(f"video file {name!r} has no video stream") from error
        raise EMOInputError(f"video file {name!r} could not be read as a video ({reason})") from error


def _decord_reason(error: BaseException) -> str:
    """decord's message without its C++ source location prefix ("[12:00:00] src/video/video_reader.cc:83: ")."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text)


def read_video_info(path: str | os.PathLike[str]) -> VideoInfo:
    """fps, frame count, size and duration of a video file (decord).

    Raises:
        EMOInputError naming the file if it is missing or not a readable video.
    """
    reader = _open_reader(path)
    num_frames = len(reader)
    if num_frames == 0:
        raise EMOInputError(f"video file {os.fspath(path)!r} has no frames")
    height, width = reader[0].shape[:2]
    fps = float(reader.get_avg_fps())
    return VideoInfo(fps=fps, num_frames=num_frames, width=int(width), height=int(height), duration=num_frames / fps)


def read_video_frames(path: str | os.PathLike[str], indices: Any = None) -> np.ndarray:
    """Decode frames of a video file (decord, random access).

    Args:
        path: the video file.
        indices: frame indices to read, any order, repeats allowed (negative counts from the end); default all
            frames (memory grows with the video: pass indices for long videos).

    Returns:
        `(N, H, W, 3)` uint8 RGB.

    Raises:
        EMOInputError naming the file: missing, unreadable, or an index out of range.
    """
    import decord

    reader = _open_reader(path)
    num_frames = len(reader)
    if indices is None:
        index_array = np.arange(num_frames)
    else:
        index_array = np.asarray(indices).reshape(-1)
        if index_array.size and index_array.dtype.kind not in "iu":
            raise EMOInputError(f"frame indices for {os.fspath(path)!r} must be integers, got {index_array.dtype}")
        index_array = index_array.astype(np.int64)
        bad = (index_array < -num_frames) | (index_array >= num_frames)
        if bad.any():
            raise EMOInputError(
                f"frame index {int(index_array[bad][0])} out of range for video file {os.fspath(path)!r} with "
                f"{num_frames} frames (valid: {-num_frames}..{num_frames - 1})"
            )
        index_array = np.where(index_array < 0, index_array + num_frames, index_array)
    if index_array.size == 0:
        height, width = reader[0].shape[:2] if num_frames else (0, 0)
        return np.zeros((0, height, width, 3), np.uint8)
    try:
        return reader.get_batch(index_array.tolist()).asnumpy()
    except (RuntimeError, decord.DECORDError) as error:  # a file that is corrupt past its header
        reason = _decord_reason(error)
        raise EMOInputError(f"video file {os.fspath(path)!r} could not be decoded ({reason})") from error


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _disk_full_error(path: str, error: OSError) -> EMOInputError:
    """A clear message for a write that failed for lack of space (full disk, quota, file-size limit)."""
    return EMOInputError(
        f"cannot write video {path!r}: {error.strerror or error} (the disk is full or a size limit was reached); "
        "free some space or write elsewhere. Nothing was saved."
    )


def _remove_quietly(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


class VideoWriter:
    """Streaming mp4 writer: H.264 (yuv420p) video + optional AAC audio, written atomically.

    Use as a context manager::

        with VideoWriter("out.mp4", fps=25, audio=samples) as writer:
            for clip in clips:            # (N, H, W, 3) uint8 or float in [0, 1]
                writer.write(clip)

    * Frames are encoded as they are written; nothing is accumulated, so memory is flat in the video length.
    * The first frame fixes the size. Width and height must be even (4:2:0 chroma halves both); odd sizes raise
      `EMOInputError` rather than being silently cropped or padded.
    * `audio` (float mono at `sample_rate`) is encoded as AAC alongside the video, interleaved as frames arrive,
      and on close trimmed or zero-padded to exactly the video duration `frames_written / fps`.
    * The file is written to `.<stem>.partial<suffix>` in the target's directory and renamed onto `path` only when
      the writer closes without an exception. On an exception (KeyboardInterrupt included) or when the writer is
      garbage-collected unclosed, the partial file is deleted and nothing appears at `path`. A process killed
      outright (SIGKILL, power loss) can leave the clearly named `.partial` file, never a file at `path`.
    * `metadata` becomes container tags (e.g. `comment`, `description`, `title`; see `MP4_METADATA_KEYS`; other
      keys are kept too, as mp4 `mdta` tags).

    Args:
        path: target file (`.mp4`; the container format follows the suffix).
        fps: frames per second (a float like 29.97 is read as the nearest simple fraction, 2997/100).
        audio: `(num_samples,)` float mono samples nominally in [-1, 1], or None for a silent video.
        sample_rate: audio rate in Hz.
        crf: x264 constant rate factor (0 lossless .. 51; 18 is visually transparent).
        preset: x264 speed/size preset ("ultrafast" .. "veryslow").
        metadata: container tags, str -> str.
        c2pa_signer: a `emo_pipeline.provenance.C2PASigner`: on close the file is signed with a C2PA manifest
            (`c2pa_manifest`, by default `manifest_definition` of the file name) into a second temporary file,
            which is then renamed onto `path`; a failed signature leaves nothing at `path`.
        c2pa_manifest: the manifest definition to sign (`emo_pipeline.provenance.manifest_definition`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float | Fraction,
        audio: np.ndarray | None = None,
        sample_rate: int = 16000,
        crf: int = 18,
        preset: str = "medium",
        metadata: dict[str, str] | None = None,
        c2pa_signer: Any = None,
        c2pa_manifest: dict | None = None,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        directory, filename = os.path.split(self.path)
        if not os.path.isdir(directory):
            raise EMOInputError(f"cannot write video {self.path!r}: directory {directory!r} does not exist")
        if os.path.isdir(self.path):
            raise EMOInputError(f"cannot write video {self.path!r}: it is a directory")
        stem, suffix = os.path.splitext(filename)
        self.partial_path = os.path.join(directory, f".{stem}.partial{suffix or '.mp4'}")
        self.signing_path = os.path.join(directory, f".{stem}.signing{suffix or '.mp4'}")
        self.c2pa_signer, self.c2pa_manifest = c2pa_signer, c2pa_manifest
        self.fps = _fps_fraction(fps)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise EMOInputError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
        self.sample_rate = sample_rate
        self.audio = self._validate_audio(audio)
        if not 0 <= int(crf) <= 51:
            raise EMOInputError(f"crf must be in 0..51, got {crf!r}")
        self.crf = int(crf)
        if preset not in X264_PRESETS:
            raise EMOInputError(f"preset must be one of the x264 presets {', '.join(X264_PRESETS)}; got {preset!r}")
        self.preset = preset
        self.metadata = {str(key): str(value) for key, value in (metadata or {}).items()}

        self.frames_written = 0
        self.width: int | None = None
        self.height: int | None = None
        self._container: Any = None
        self._video_stream: Any = None
        self._audio_stream: Any = None
        self._audio_samples_sent = 0
        self._closed = False
        # Unclosed writer garbage-collected (or interpreter exit): delete the partial file, never publish it.
        self._finalizer = weakref.finalize(self, _remove_quietly, self.partial_path, self.signing_path)

    def _validate_audio(self, audio: np.ndarray | None) -> np.ndarray | None:
        if audio is None:
            return None
        if _is_torch_tensor(audio):
            audio = audio.detach().cpu().numpy()
        array = np.asarray(audio)
        if array.ndim != 1 or array.dtype.kind != "f":
            raise EMOInputError(
                f"audio for video {self.path!r} must be 1-D float mono samples (see load_audio), got shape "
                f"{array.shape} dtype {array.dtype}"
            )
        if not np.isfinite(array).all():
            raise EMOInputError(f"audio for video {self.path!r} contains NaN or infinite samples")
        return np.ascontiguousarray(array, dtype=np.float32)

    # -- context manager -----------------------------------------------------------------------------------

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- writing -------------------------------------------------------------------------------------------

    def _frames_as_uint8(self, frames: Any) -> np.ndarray:
        if _is_torch_tensor(frames):
            frames = frames.detach().cpu().numpy()
        array = np.asarray(frames)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise EMOInputError(
                f"frames for video {self.path!r} must be (N, H, W, 3) or (H, W, 3) RGB, got shape {array.shape}"
            )
        if array.dtype == np.uint8:
            return array
        if array.dtype.kind == "f":
            if array.size and not np.isfinite(array).all():
                raise EMOInputError(f"frames for video {self.path!r} contain NaN or infinite values")
            low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
            if low < 0.0 or high > 1.0:
                raise EMOInputError(
                    f"float frames for video {self.path!r} must lie in [0, 1], found [{low:g}, {high:g}]"
                )
            return np.round(array * 255.0).astype(np.uint8)
        raise EMOInputError(f"frames for video {self.path!r} must be uint8 or float in [0, 1], got {array.dtype}")

    def _open(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise EMOInputError(
                f"video {self.path!r}: frame size {width}x{height} has an odd side; H.264 yuv420p needs even width "
                "and height: crop or pad the frames by one pixel"
            )
        self.width, self.height = width, height
        options = {"movflags": "+faststart"}
        if set(self.metadata) - MP4_METADATA_KEYS:
            options["movflags"] += "+use_metadata_tags"
        try:
            self._container = av.open(self.partial_path, mode="w", options=options)
        except (av.error.FFmpegError, ValueError) as error:
            raise EMOInputError(f"cannot write video {self.path!r} ({error})") from error
        self._container.metadata.update(self.metadata)
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1) / self.fps
        stream.options = {"crf": str(self.crf), "preset": self.preset}
        self._video_stream = stream
        if self.audio is not None:
            self._audio_stream = self._container.add_stream("aac", rate=self.sample_rate, layout="mono")

    def write(self, frames: Any) -> None:
        """Encode frames now: `(N, H, W, 3)` or `(H, W, 3)`, uint8 or float in [0, 1], RGB."""
        if self._closed:
            raise RuntimeError(f"VideoWriter for {self.path!r} is closed")
        array = self._frames_as_uint8(frames)
        if array.shape[0] == 0:
            return
        height, width = array.shape[1:3]
        if self._container is None:
            self._open(height, width)
        elif (height, width) != (self.height, self.width):
            raise EMOInputError(
                f"video {self.path!r}: frame size {width}x{height} differs from the first frame's "
                f"{self.width}x{self.height}"
            )
        for pixels in array:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = self.frames_written
            self._mux(self._video_stream.encode(frame))
            self.frames_written += 1
        self._write_audio_until(self._audio_samples_for(self.frames_written))

    def _audio_samples_for(self, num_frames: int) -> int:
        """Audio samples spanning `num_frames` video frames (rounded to the nearest sample)."""
        return round(Fraction(num_frames) * self.sample_rate / self.fps)

    def _write_audio_until(self, end: int) -> None:
        """Encode audio samples [sent, end): real samples while there are any, then silence."""
        if self._audio_stream is None or end <= self._audio_samples_sent:
            return
        start = self._audio_samples_sent
        samples = self.audio[start:end]
        if samples.size < end - start:  # audio shorter than the video: pad with silence
            samples = np.concatenate([samples, np.zeros(end - start - samples.size, np.float32)])
        frame = av.AudioFrame.from_ndarray(samples[None].copy(), format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, self.sample_rate)
        self._mux(self._audio_stream.encode(frame))
        self._audio_samples_sent = end

    def _mux(self, packets: Any) -> None:
        try:
            for packet in packets:
                self._container.mux(packet)
        except OSError as error:
            if error.errno not in _DISK_FULL_ERRNOS:
                raise
            self.abort()
            raise _disk_full_error(self.path, error) from error

    # -- finishing -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush the encoders, fit the audio to the video duration and publish the file at `path`.

        Raises EMOInputError (and writes nothing) if no frame was written.
        """
        if self._closed:
            return
        if self.frames_written == 0:
            self.abort()
            raise EMOInputError(f"no frames were written to video {self.path!r}; nothing was saved")
        try:
            self._write_audio_until(self._audio_samples_for(self.frames_written))
            self._mux(self._video_stream.encode(None))
            if self._audio_stream is not None:
                self._mux(self._audio_stream.encode(None))
            try:
                self._container.close()
            except OSError as error:
                if error.errno not in _DISK_FULL_ERRNOS:
                    raise
                raise _disk_full_error(self.path, error) from error
            self._container = None
            if self.c2pa_signer is not None:
                from emo_pipeline.provenance import manifest_definition, sign_mp4

                manifest = self.c2pa_manifest or manifest_definition(os.path.basename(self.path))
                sign_mp4(self.partial_path, self.signing_path, self.c2pa_signer, manifest)
                os.replace(self.signing_path, self.path)
                _remove_quietly(self.partial_path)
            else:
                os.replace(self.partial_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._finalizer.detach()

    def abort(self) -> None:
        """Stop writing and delete the partial file; nothing is left at `path`. Safe to call more than once."""
        self._closed = True
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None
        _remove_quietly(self.partial_path, self.signing_path)
        self._finalizer.detach()

    @property
    def duration(self) -> float:
        """Seconds of video written so far (`frames_written / fps`)."""
        return float(self.frames_written / self.fps)

    def __repr__(self) -> str:
        return f"VideoWriter({self.path!r}, fps={float(self.fps):g}, frames_written={self.frames_written})"

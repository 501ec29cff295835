"""Hallo's audio front end: wav2vec2 features of every layer, one row per video frame, and Hallo2's cut of long audio.

Re-states `AudioProcessor.preprocess` (fudan-generative-vision/hallo `hallo/datasets/audio_processor.py`) and its
`Wav2VecModel` (`hallo/models/wav2vec.py`), and Hallo2's `cut_audio` + per-segment `preprocess`
(fudan-generative-vision/hallo2 `scripts/inference_long.py`), with the same transformers operations, so the features
equal Hallo's own (tests/test_hallo_inputs.py and tests/test_hallo_audio.py check them against goldens and Hallo's
arithmetic). Re-exported by `emo_pipeline.hallo_inputs`, the Hallo front end's public module.

Two modes (the pipeline's `mode`):

* ``"parity"``: Hallo's features exactly. Without `segment_seconds` the wav2vec2 transformer attends over the whole
  track at frame resolution (memory grows with the square of the track length: README, "Use Hallo / Hallo2
  weights"); with it, Hallo2's segments (cut in whole milliseconds, as pydub does).
* ``"fast"``: the same features computed in overlapping chunks (`chunk_seconds` of frames kept, `context_seconds`
  of audio either side seen and dropped), so the transformer's memory is bounded whatever the track's length; the
  frames differ slightly from the whole-track ones (measured in benchmarks/results/hallo_audio_chunking.json).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from emo_pipeline.errors import EMOInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

__all__ = [
    "HALLO_AUDIO_MODES",
    "HALLO_CHUNK_CONTEXT_SECONDS",
    "HALLO_CHUNK_SECONDS",
    "hallo2_segment_bounds",
    "hallo_audio_features",
    "hallo_audio_windows",
    "iter_hallo_audio_features",
]

#: `mode` values: "parity" (Hallo's whole-track / Hallo2's per-segment features) or "fast" (overlapping chunks).
HALLO_AUDIO_MODES = ("parity", "fast")
#: Fast mode: frames kept from each chunk (seconds of video), and audio seen on either side of them and dropped.
HALLO_CHUNK_SECONDS = 20.0
HALLO_CHUNK_CONTEXT_SECONDS = 5.0


def _interpolate_cnn_features(seq_len: int) -> Any:
    """A forward hook for `Wav2Vec2Model.feature_extractor`: Hallo's `linear_interpolation` (wav2vec.py) of the CNN
    features `(B, C, T_cnn)` to `seq_len` video frames, `align_corners=True`, before the feature projection."""
    import torch.nn.functional as F

    def hook(module: Any, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return F.interpolate(output, size=seq_len, align_corners=True, mode="linear")

    return hook


def _encode_track(input_values: np.ndarray, seq_len: int, audio_encoder: Wav2Vec2Model) -> torch.Tensor:
    """Hallo's `Wav2VecModel(input, seq_len, output_hidden_states=True)` then `stack(hidden_states[1:])`:
    `(seq_len, layers, hidden)` on the CPU, in the encoder's dtype.

    The stock `Wav2Vec2Model.forward` runs with a forward hook on its `feature_extractor` that interpolates the CNN
    features to `seq_len`: Hallo's subclass does exactly this between the same two submodules, and the library's
    own forward keeps `output_hidden_states` working (transformers 5 records hidden states around the model's
    forward, so calling `encoder` directly would lose them).
    """
    import torch

    from emo_pipeline.devices import compute_device

    parameter = next(audio_encoder.parameters())
    values = torch.from_numpy(input_values).to(device=compute_device(audio_encoder), dtype=parameter.dtype)[None]
    handle = audio_encoder.feature_extractor.register_forward_hook(_interpolate_cnn_features(seq_len))
    try:
        with torch.no_grad():
            output = audio_encoder(values, output_hidden_states=True, return_dict=True)
    finally:
        handle.remove()
    if output.hidden_states is None:  # pragma: no cover - a wav2vec2 implementation that cannot return them
        raise RuntimeError(f"{type(audio_encoder).__name__} returned no hidden_states with output_hidden_states=True")
    hidden = torch.stack(output.hidden_states[1:], dim=1)[0]  # (layers, seq_len, hidden)
    return hidden.transpose(0, 1).contiguous().cpu()


def _normalised_track(
    samples: np.ndarray,
    feature_extractor: Wav2Vec2FeatureExtractor,
    fps: int,
    clip_length: int,
    sample_rate: int,
    pad: bool,
    processed_length: int,
) -> tuple[torch.Tensor, int, int]:
    """`AudioProcessor.preprocess` of Hallo (audio_processor.py:106-125) on one track, or of Hallo2 on one segment,
    up to the encoder: `(normalised padded samples, frames with padding, audio frames)`.

    Hallo2's `preprocess(..., padding, processed_length)` pads only the last segment, by the frames that complete a
    whole number of clips over all segments (`processed_length` frames came before); it tests the segment's own
    length for divisibility, as Hallo2 does.
    """
    import torch
    import torch.nn.functional as F

    input_values = np.squeeze(feature_extractor(samples, sampling_rate=sample_rate).input_values)
    input_values = np.asarray(input_values, dtype=np.float32).reshape(-1)
    seq_len, audio_length = _segment_frames(len(input_values), fps, clip_length, sample_rate, pad, processed_length)
    values = torch.from_numpy(input_values).float()
    if seq_len > audio_length:  # Hallo pads the normalised samples by sample_rate // fps per missing frame
        values = F.pad(values, (0, (seq_len - audio_length) * (sample_rate // fps)), "constant", 0.0)
    return values, seq_len, audio_length


def _encode_chunked(
    values: torch.Tensor,
    seq_len: int,
    audio_encoder: Wav2Vec2Model,
    fps: int,
    sample_rate: int,
    chunk_frames: int,
    context_frames: int,
) -> Iterator[torch.Tensor]:
    """Fast mode: `_encode_track` over frames `[a - context, b + context)` for consecutive `[a, b)` of
    `chunk_frames`, keeping frames `[a, b)`. The samples of frame range `[lo, hi)` are `[lo, hi) * sample_rate /
    fps` (the last chunk runs to the end of the padded track, as the whole-track interpolation does). A track of at
    most one chunk is encoded whole: the result then equals `_encode_track(values, seq_len)`."""
    samples_per_frame = sample_rate / fps
    array = values.numpy()
    for start in range(0, seq_len, chunk_frames):
        stop = min(start + chunk_frames, seq_len)
        lo, hi = max(0, start - context_frames), min(seq_len, stop + context_frames)
        first = round(lo * samples_per_frame)
        last = array.size if hi == seq_len else round(hi * samples_per_frame)
        emb = _encode_track(array[first:last], hi - lo, audio_encoder)
        yield emb[start - lo : stop - lo]


def _check_audio_arguments(samples, audio_encoder, feature_extractor, fps, clip_length, sample_rate) -> None:
    if samples.ndim != 1 or samples.dtype.kind != "f" or samples.size == 0:
        raise EMOInputError(
            f"samples must be non-empty 1-D float mono audio (see load_audio), got shape {samples.shape} "
            f"dtype {samples.dtype}"
        )
    for name, value in (("fps", fps), ("sample_rate", sample_rate)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise EMOInputError(f"{name} must be a positive int, got {value!r}")
    if isinstance(clip_length, bool) or not isinstance(clip_length, (int, np.integer)):
        raise EMOInputError(f"clip_length must be an int (<= 0: no padding), got {clip_length!r}")
    if audio_encoder.training:
        raise EMOInputError("audio_encoder is in train mode (dropout, time masking): call audio_encoder.eval() first")
    expected_rate = getattr(feature_extractor, "sampling_rate", sample_rate)
    if expected_rate != sample_rate:
        raise EMOInputError(
            f"the feature extractor expects {expected_rate} Hz audio but sample_rate is {sample_rate}; resample "
            "with load_audio(..., sample_rate=...)"
        )


def hallo2_segment_bounds(num_samples: int, sample_rate: int, segment_seconds: float) -> list[tuple[int, int]]:
    """Hallo2's `cut_audio` (inference_long.py:141-161, pydub): `(start, stop)` sample bounds of each segment.

    pydub measures a track in whole milliseconds (`len(audio) = round(1000 * samples / rate)`) and slices at
    `int(ms * rate / 1000)` samples: a tail under 0.5 ms is dropped (19,205 samples at 16 kHz are 1200 ms: 19,200
    samples, 30 frames at 25 fps, not 31), and a track that rounds up ends past its last sample (pydub pads the
    missing samples with silence: `stop` may exceed `num_samples` by less than 0.5 ms). Here the cut is made on the
    samples given, at `sample_rate`; Hallo2 cuts the file at the file's own rate, which can move a bound by less than
    one sample of the 16 kHz track.
    """
    length_ms = round(1000 * (num_samples / sample_rate))  # AudioSegment.__len__
    segment_ms = segment_seconds * 1000  # cut_audio: segment_length = length * 1000
    count = int(length_ms // segment_ms) + (1 if length_ms % segment_ms != 0 else 0)
    bounds = []
    for index in range(count):
        start_ms, stop_ms = index * segment_ms, min((index + 1) * segment_ms, length_ms)
        # AudioSegment.__getitem__ -> _parse_position: int(frame_count(ms=...)) = int(ms * (rate / 1000.0))
        bounds.append((int(start_ms * (sample_rate / 1000.0)), int(stop_ms * (sample_rate / 1000.0))))
    return bounds


def hallo_audio_features(
    samples: np.ndarray,
    audio_encoder: Wav2Vec2Model,
    feature_extractor: Wav2Vec2FeatureExtractor,
    *,
    fps: int = 25,
    clip_length: int = 16,
    sample_rate: int = 16000,
    segment_seconds: float | None = None,
    mode: str = "parity",
) -> tuple[torch.Tensor, int]:
    """Hallo's per-frame wav2vec2 features: every transformer layer's hidden states, one row per video frame.

    Reproduces `AudioProcessor.preprocess` (hallo/datasets/audio_processor.py:106-125 with `wav2vec.features:
    all`) and `Wav2VecModel` (hallo/models/wav2vec.py): the feature extractor normalises the whole track (zero
    mean, unit variance); `audio_length = ceil(seconds * fps)` frames; the normalised samples are zero-padded
    by `sample_rate // fps` per missing frame up to a whole number of `clip_length` clips; the CNN features are
    linearly interpolated (`align_corners=True`) to that frame count BEFORE the feature projection and the
    transformer, which then runs over the whole track at `fps` steps per second.

    `segment_seconds` selects Hallo2's long-audio variant (hallo2 `scripts/inference_long.py`, `use_cut: true`,
    60 s segments): the audio is cut into `segment_seconds` pieces in whole milliseconds, as pydub does
    (`hallo2_segment_bounds`), and each is processed on its own (its own normalisation and transformer context, no
    attention across cuts); only the last is padded, so the total is a whole number of clips. With one segment (audio
    no longer than `segment_seconds`) the result is the whole-track result of the millisecond-cut track.

    Args:
        samples: `(N,)` float mono at `sample_rate` (Hallo: 16 kHz, vocals if separated).
        audio_encoder: a stock transformers `Wav2Vec2Model` in eval mode (Hallo: wav2vec2-base-960h).
        feature_extractor: its `Wav2Vec2FeatureExtractor`.
        fps: video frame rate (Hallo: 25).
        clip_length: frames per clip the features are padded to a multiple of (Hallo: 16); <= 0: no padding.
        sample_rate: rate of `samples` in Hz (Hallo: 16000).
        segment_seconds: None (Hallo: one pass over the whole track) or Hallo2's segment length in seconds (60).
        mode: "parity" (Hallo's features; memory grows with the square of the track or segment length) or "fast"
            (overlapping chunks of `HALLO_CHUNK_SECONDS`, bounded memory, frames slightly different).

    Returns:
        `(features, audio_length)`: features `(T, layers, hidden)` on the CPU in the encoder's dtype, T the padded
        frame count (a multiple of `clip_length`); `audio_length` the frames the audio really covers (Hallo cuts the
        video to it).
    """
    import torch

    chunks, _, audio_length = iter_hallo_audio_features(
        samples,
        audio_encoder,
        feature_extractor,
        fps=fps,
        clip_length=clip_length,
        sample_rate=sample_rate,
        segment_seconds=segment_seconds,
        mode=mode,
    )
    return torch.cat(list(chunks)), audio_length


def _segment_frames(num_samples: int, fps: int, clip_length: int, sample_rate: int, pad: bool, processed: int):
    """`(frames with padding, audio frames)` of one track or segment (Hallo's `preprocess`; Hallo2's pads only the
    last segment, by what completes whole clips over all `processed` frames, testing the segment's own length)."""
    seq_len = math.ceil(num_samples / sample_rate * fps)
    padded = seq_len
    if pad and clip_length > 0 and seq_len % clip_length != 0:
        padded += clip_length - (seq_len + processed) % clip_length
    return padded, seq_len


def _check_mode(mode: str, chunk_seconds: float, context_seconds: float, fps: int) -> tuple[int, int]:
    if mode not in HALLO_AUDIO_MODES:
        raise EMOInputError(f"mode must be one of {HALLO_AUDIO_MODES}, got {mode!r}")
    for name, value, low in (("chunk_seconds", chunk_seconds, 0.0), ("context_seconds", context_seconds, -1.0)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > low):
            raise EMOInputError(f"{name} must be {'positive' if low == 0 else 'non-negative'} seconds, got {value!r}")
    return max(1, round(chunk_seconds * fps)), round(context_seconds * fps)


def iter_hallo_audio_features(
    samples: np.ndarray,
    audio_encoder: Wav2Vec2Model,
    feature_extractor: Wav2Vec2FeatureExtractor,
    *,
    fps: int = 25,
    clip_length: int = 16,
    sample_rate: int = 16000,
    segment_seconds: float | None = None,
    mode: str = "parity",
    chunk_seconds: float = HALLO_CHUNK_SECONDS,
    context_seconds: float = HALLO_CHUNK_CONTEXT_SECONDS,
) -> tuple[Iterator[torch.Tensor], int, int]:
    """`hallo_audio_features` one piece at a time: `(chunks, T, audio_length)` where `chunks` yields consecutive
    `(frames, layers, hidden)` features when asked for (the encoder runs then), and `T` / `audio_length` are known
    up front (Hallo2's millisecond cut included). A consumer that keeps only the frames it still needs
    (`emo_pipeline.audio.FeatureWindows`) holds one piece at a time. The pieces: in "parity" mode one per Hallo2
    segment, or the whole track (Hallo: the transformer attends over all of it at once); in "fast" mode chunks of
    `chunk_seconds` of frames, each encoded with `context_seconds` of audio either side (within its segment), so
    the encoder's memory is bounded. Arguments are checked here, before any chunk is computed.
    """
    samples = np.asarray(samples)
    _check_audio_arguments(samples, audio_encoder, feature_extractor, fps, clip_length, sample_rate)
    chunk_frames, context_frames = _check_mode(mode, chunk_seconds, context_seconds, fps)
    samples = samples.astype(np.float32, copy=False)  # Hallo's librosa.load gives float32
    if segment_seconds is None:
        bounds = [(0, samples.size)]
    else:
        if not (isinstance(segment_seconds, (int, float)) and math.isfinite(segment_seconds) and segment_seconds > 0):
            raise EMOInputError(f"segment_seconds must be positive seconds or None, got {segment_seconds!r}")
        if segment_seconds * sample_rate < 1:
            raise EMOInputError(f"segment_seconds={segment_seconds!r} is shorter than one sample")
        bounds = hallo2_segment_bounds(samples.size, sample_rate, segment_seconds)
        if not bounds:
            raise EMOInputError(
                f"the audio ({samples.size} samples at {sample_rate} Hz) is shorter than the half millisecond "
                "Hallo2's cut keeps: pass a longer track"
            )
        if bounds[-1][1] > samples.size:  # pydub pads a track that rounds up to the next millisecond with silence
            samples = np.pad(samples, (0, bounds[-1][1] - samples.size))
    total = processed = 0
    for index, (start, stop) in enumerate(bounds):
        # inference_long.py pads the last segment only: padding = (idx + 1) == len(audio_list)
        last = index == len(bounds) - 1
        padded, length = _segment_frames(stop - start, fps, clip_length, sample_rate, last, processed)
        total, processed = total + padded, processed + length

    def chunks() -> Iterator[torch.Tensor]:
        done = 0
        for index, (start, stop) in enumerate(bounds):
            last = index == len(bounds) - 1
            values, seq_len, length = _normalised_track(
                samples[start:stop], feature_extractor, fps, clip_length, sample_rate, last, done
            )
            done += length
            if mode == "parity" or seq_len <= chunk_frames:
                yield _encode_track(values.numpy(), seq_len, audio_encoder)
            else:
                yield from _encode_chunked(
                    values, seq_len, audio_encoder, fps, sample_rate, chunk_frames, context_frames
                )

    return chunks(), total, processed


def hallo_audio_windows(features: torch.Tensor, window: int = 5) -> torch.Tensor:
    """Hallo's `process_audio_emb` (scripts/inference.py): frame i gets frames i-2..i+2, clamped at the ends.

    `(T, layers, hidden) -> (T, window, layers, hidden)`; the same as EMO's window (`window_audio_features`).
    """
    from emo_pipeline.audio import window_audio_features

    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise EMOInputError(f"window must be an odd positive int (Hallo: 5), got {window!r}")
    if features.ndim != 3:
        raise EMOInputError(f"features must be (T, layers, hidden), got shape {tuple(features.shape)}")
    return window_audio_features(features, window // 2)

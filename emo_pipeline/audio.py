"""Audio input for EMO (Tian et al. 2024, arXiv 2402.17485): decoding, wav2vec2 features, windowing.

* `load_audio` decodes any container/codec PyAV (FFmpeg) reads, or takes an array, and returns float32 mono at
  16 kHz, the rate wav2vec2 was trained at.
* `extract_audio_features` / `iter_audio_features` run the stock transformers `Wav2Vec2Model` with
  `output_hidden_states=True` over bounded windows of audio and resample the chosen layers' hidden states from
  wav2vec2's 50 Hz to exactly one feature per video frame (`num_video_frames`). Peak activation memory depends on
  `chunk_seconds + 2 * context_seconds`, never on the audio length.
* `window_audio_features` gathers each frame's neighbours (EMO's audio window of 2m+1 frames, edge padded).
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from emo_pipeline.errors import EMOInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

__all__ = [
    "DEFAULT_MAX_DURATION",
    "MAX_ARRAY_CHANNELS",
    "FeatureWindows",
    "extract_audio_features",
    "iter_audio_features",
    "load_audio",
    "num_video_frames",
    "window_audio_features",
]

#: Longest audio `load_audio` accepts by default (seconds): one hour. Longer inputs are almost always a mistake
#: (a whole album, a looping stream) and would take days to animate; pass `max_duration=None` to lift the limit.
DEFAULT_MAX_DURATION = 3600.0

#: A 2-D array with more "channels" than this is not audio with channels; it is refused as ambiguous.
MAX_ARRAY_CHANNELS = 8

# Samples handed to the resampler at a time when resampling an array: keeps the resampler's working set small.
_RESAMPLE_BLOCK = 1 << 16

# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


def _describe(src: Any) -> str:
    """A short human name of an audio source for error messages."""
    if isinstance(src, (str, os.PathLike)):
        return f"audio file {os.fspath(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"audio bytes ({len(src)} bytes)"
    if isinstance(src, np.ndarray):
        return f"audio array of shape {tuple(src.shape)} and dtype {src.dtype}"
    name = getattr(src, "name", None)
    if isinstance(name, (str, os.PathLike)):
        return f"audio file object {os.fspath(name)!r}"
    return f"audio file object {type(src).__name__}"


def _is_torch_tensor(value: Any) -> bool:
    """True for a torch tensor, without importing torch (file objects also have a `.detach()`)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _fps_fraction(fps: float | Fraction) -> Fraction:
    """`fps` as an exact fraction: 25 -> 25, 29.97 -> 2997/100, 30000/1001 (as a float) -> 30000/1001."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)):
        raise EMOInputError(f"fps must be a positive number, got {fps!r}")
    if isinstance(fps, float) and not math.isfinite(fps):
        raise EMOInputError(f"fps must be a positive finite number, got {fps!r}")
    # limit_denominator undoes binary float rounding: a float fps is meant as the nearest simple fraction.
    value = Fraction(fps) if not isinstance(fps, float) else Fraction(fps).limit_denominator(1_000_000)
    if value <= 0:
        raise EMOInputError(f"fps must be positive, got {fps!r}")
    return value


def num_video_frames(num_samples: int, sample_rate: int, fps: float | Fraction) -> int:
    """Number of video frames for `num_samples` of audio at `sample_rate` Hz: `ceil(duration * fps)`, exactly.

    Computed with `fractions.Fraction`, so e.g. 100 s at 29.97 fps is 2997 frames, not 2998 from float rounding.
    A float `fps` is read as the nearest fraction with denominator <= 10**6 (29.97 -> 2997/100,
    30000/1001 -> 30000/1001).
    """
    if num_samples < 0:
        raise EMOInputError(f"num_samples must be >= 0, got {num_samples}")
    if sample_rate <= 0:
        raise EMOInputError(f"sample_rate must be positive, got {sample_rate}")
    return math.ceil(Fraction(int(num_samples), int(sample_rate)) * _fps_fraction(fps))


def _array_to_mono(array: Any, name: str) -> np.ndarray:
    """(N,), (N, C) or (C, N) numeric array -> float32 (N,) mean over channels; integer PCM scaled to [-1, 1)."""
    if _is_torch_tensor(array):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind == "f":
        data = array.astype(np.float32, copy=False)
    elif array.dtype == np.int16:
        data = array.astype(np.float32) / 32768.0
    elif array.dtype == np.int32:
        data = array.astype(np.float32) / 2147483648.0
    elif array.dtype == np.int8:
        data = array.astype(np.float32) / 128.0
    elif array.dtype == np.uint8:  # 8-bit PCM is unsigned with 128 as zero
        data = (array.astype(np.float32) - 128.0) / 128.0
    else:
        raise EMOInputError(
            f"{name}: unsupported dtype {array.dtype}; pass float samples (nominally in [-1, 1]) or int16/int32/"
            "int8/uint8 PCM"
        )
    if data.ndim == 2:
        rows, cols = data.shape
        if rows <= MAX_ARRAY_CHANNELS and rows < cols:
            data = data.mean(axis=0)
        elif cols <= MAX_ARRAY_CHANNELS and cols < rows:
            data = data.mean(axis=1)
        else:
            raise EMOInputError(
                f"{name}: cannot tell the channel axis; pass (num_samples,) mono or (num_samples, channels) / "
                f"(channels, num_samples) with at most {MAX_ARRAY_CHANNELS} channels on the shorter axis"
            )
    elif data.ndim != 1:
        raise EMOInputError(f"{name}: expected a 1-D (num_samples,) or 2-D (samples x channels) array")
    if data.size and not np.isfinite(data).all():
        raise EMOInputError(f"{name}: contains NaN or infinite samples")
    return np.ascontiguousarray(data, dtype=np.float32)


def _resample_frames(
    frames: Iterable[av.AudioFrame], sample_rate: int, max_samples: int | None, name: str, limit_text: str
) -> np.ndarray:
    """Resample decoded frames to `sample_rate` (all channels kept), average the channels -> float32 (N,).

    The channels are averaged here rather than by FFmpeg's downmix, which scales stereo by 1/sqrt(2) per
    channel (a mono file stored as two identical channels would come out 41% louder and could clip).
    """
    resampler = av.AudioResampler(format="fltp", layout=None, rate=sample_rate)
    pieces: list[np.ndarray] = []
    total = 0

    def take(out_frames: list[av.AudioFrame]) -> None:
        nonlocal total
        for out in out_frames:
            piece = out.to_ndarray().mean(axis=0, dtype=np.float32)
            pieces.append(piece)
            total += piece.size
        if max_samples is not None and total > max_samples:
            raise EMOInputError(f"{name} is longer than {limit_text}; trim it or pass a larger max_duration")

    for frame in frames:
        frame.pts = None  # the resampler then just concatenates; timestamps gaps are not our business here
        take(resampler.resample(frame))
    take(resampler.resample(None))
    if not pieces:
        return np.zeros(0, np.float32)
    return np.concatenate(pieces).astype(np.float32, copy=False)


def _array_frames(data: np.ndarray, sample_rate: int) -> Iterator[av.AudioFrame]:
    for start in range(0, data.size, _RESAMPLE_BLOCK):
        frame = av.AudioFrame.from_ndarray(
            data[None, start : start + _RESAMPLE_BLOCK].copy(), format="flt", layout="mono"
        )
        frame.sample_rate = sample_rate
        yield frame


def load_audio(
    src: Any,
    sample_rate: int = 16000,
    max_duration: float | None = DEFAULT_MAX_DURATION,
    *,
    src_sample_rate: int | None = None,
) -> np.ndarray:
    """Load speech or singing as float32 mono samples at `sample_rate` Hz.

    Args:
        src: a path (str / PathLike), a binary file object, the bytes of a file, or a numpy array / torch tensor of
            samples. Files: any container and codec FFmpeg (PyAV) decodes (wav, mp3, flac, ogg/opus, m4a/aac, the
            first audio track of a video, ...), any rate and channel count. Arrays: `(N,)` mono, or `(N, C)` /
            `(C, N)` where the shorter axis (at most `MAX_ARRAY_CHANNELS` long) holds the channels; float samples
            nominally in [-1, 1] or int16/int32/int8/uint8 PCM. An array is taken to be at `sample_rate` unless
            `src_sample_rate` says otherwise.
        sample_rate: output rate in Hz (wav2vec2 wants 16000).
        max_duration: longest accepted input in seconds (`None`: no limit). Decoding stops as soon as it is passed.
        src_sample_rate: rate of an array `src` in Hz (arrays only).

    Returns:
        `(num_samples,)` float32 mono at `sample_rate`. Channels are averaged (FFmpeg's resampler converts the
        rate). Silence is valid input and is returned as is.

    Raises:
        EMOInputError naming the input: missing or undecodable file, no audio stream, no samples, longer than
        `max_duration`, or an array of unsupported shape/dtype/values.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise EMOInputError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
    if max_duration is not None and not max_duration > 0:
        raise EMOInputError(f"max_duration must be positive seconds or None, got {max_duration!r}")
    name = _describe(src)
    max_samples = None if max_duration is None else math.floor(max_duration * sample_rate)
    limit_text = f"the limit of {max_duration:g} s (max_duration)" if max_duration is not None else ""

    if isinstance(src, np.ndarray) or _is_torch_tensor(src):
        data = _array_to_mono(src, name)
        rate = sample_rate if src_sample_rate is None else src_sample_rate
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise EMOInputError(f"src_sample_rate must be a positive int (Hz), got {src_sample_rate!r}")
        if rate != sample_rate and data.size:
            data = _resample_frames(_array_frames(data, rate), sample_rate, max_samples, name, limit_text)
    else:
        if src_sample_rate is not None:
            raise EMOInputError(f"{name}: src_sample_rate is only for arrays; a file's own rate is always used")
        data = _decode_file(src, name, sample_rate, max_samples, max_duration, limit_text)

    if data.size == 0:
        raise EMOInputError(f"{name} contains no audio samples (zero length); pass audio at least one sample long")
    if max_samples is not None and data.size > max_samples:
        raise EMOInputError(f"{name} is longer than {limit_text}; trim it or pass a larger max_duration")
    return data


def _decode_file(
    src: Any, name: str, sample_rate: int, max_samples: int | None, max_duration: float | None, limit_text: str
) -> np.ndarray:
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise EMOInputError(f"{name} does not exist")
        if os.path.isdir(path):
            raise EMOInputError(f"{name} is a directory, not an audio file")
        if os.path.getsize(path) == 0:
            raise EMOInputError(f"{name} is empty (0 bytes)")
        opened: Any = path
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise EMOInputError(f"{name} is empty (0 bytes)")
        opened = io.BytesIO(bytes(src))
    elif hasattr(src, "read"):
        opened = src
    else:
        raise EMOInputError(
            f"unsupported audio input of type {type(src).__name__}; pass a path, a binary file object, bytes or a "
            "numpy array"
        )
    try:
        container = av.open(opened, mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as error:
        raise EMOInputError(f"{name} could not be decoded as audio ({error.strerror or error})") from error
    try:
        if not container.streams.audio:
            kinds = sorted({stream.type for stream in container.streams}) or ["none"]
            raise EMOInputError(f"{name} has no audio stream (streams found: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        # Refuse early, before decoding, when the header already says it is far too long. The exact check runs
        # while decoding (declared durations of e.g. VBR mp3 are estimates).
        if max_duration is not None and container.duration is not None:
            declared = container.duration / av.time_base
            if declared > 1.05 * max_duration + 1.0:
                raise EMOInputError(
                    f"{name} is about {declared:.1f} s long, longer than {limit_text}; trim it or pass a larger "
                    "max_duration"
                )
        stream.thread_type = "AUTO"
        try:
            return _resample_frames(container.decode(stream), sample_rate, max_samples, name, limit_text)
        except av.error.FFmpegError as error:
            raise EMOInputError(f"{name} could not be decoded ({error.strerror or error})") from error
        except ValueError as error:  # PyAV's resampler refuses frames whose layout/rate changes mid-stream
            if isinstance(error, EMOInputError):
                raise
            raise EMOInputError(f"{name} could not be decoded ({error})") from error
    finally:
        container.close()


# ----------------------------------------------------------------------------------------------------------------
# wav2vec2 features
# ----------------------------------------------------------------------------------------------------------------


def _conv_geometry(audio_encoder: Wav2Vec2Model) -> tuple[int, int]:
    """(receptive field, total stride) in samples of wav2vec2's convolutional feature encoder (400, 320 for base)."""
    receptive_field, stride = 1, 1
    for kernel, step in zip(audio_encoder.config.conv_kernel, audio_encoder.config.conv_stride):
        receptive_field += (kernel - 1) * stride
        stride *= step
    return receptive_field, stride


def _hidden_state_indices(layers: slice | Sequence[int] | None, num_hidden_layers: int) -> list[int]:
    """Indices into transformers' `hidden_states` tuple (0 = encoder input embeddings, i = transformer layer i)."""
    available = list(range(num_hidden_layers + 1))
    if layers is None:
        return available[1:]
    if isinstance(layers, slice):
        chosen = available[layers]
    else:
        chosen = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
                raise EMOInputError(f"layers must be ints, got {layer!r}")
            if not -len(available) <= layer < len(available):
                raise EMOInputError(
                    f"layer {layer} out of range: wav2vec2 has hidden states 0..{num_hidden_layers} (0 = input "
                    "embeddings)"
                )
            chosen.append(available[layer])
    if not chosen:
        raise EMOInputError(f"layers={layers!r} selects no hidden state of 0..{num_hidden_layers}")
    return chosen


def _first_group_norm(audio_encoder: Wav2Vec2Model) -> tuple[Any, Any] | None:
    """(conv, GroupNorm) of wav2vec2's first conv layer when it normalises over time ("group" models such as
    wav2vec2-base), else None ("layer" models normalise each step on its own and chunk exactly)."""
    import torch

    layers = getattr(getattr(audio_encoder, "feature_extractor", None), "conv_layers", None)
    if not layers:
        return None
    first = layers[0]
    norm = getattr(first, "layer_norm", None)
    if isinstance(norm, torch.nn.GroupNorm) and isinstance(getattr(first, "conv", None), torch.nn.Conv1d):
        return first.conv, norm
    return None


class _FirstConvOutput(Exception):
    """Raised by a forward hook to stop wav2vec2's forward right after its first conv, carrying that conv's output."""

    def __init__(self, output: torch.Tensor):
        super().__init__("wav2vec2 stopped after its first conv")
        self.output = output


def _stop_after(module: Any, inputs: tuple, output: torch.Tensor) -> None:
    raise _FirstConvOutput(output)


def _global_group_norm_stats(
    audio_encoder: Wav2Vec2Model, conv: Any, norm: Any, input_values: np.ndarray, steps_per_block: int, dtype: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and variance of the first conv layer's output over the whole input, in bounded blocks.

    wav2vec2-base's first GroupNorm normalises each channel over the whole sequence, so a window alone would see
    different statistics than a one-shot pass; these whole-input statistics make the windows agree with it.
    Blocks are merged with Chan et al.'s parallel variance formula in float64.

    Each block goes through the encoder's own forward, stopped by a hook as soon as the first conv has run: calling
    the conv directly would bypass the offload hooks that load the weights (model CPU offload parks them on the CPU,
    group offloading hooks only the top-level model and may park them as empty placeholders on disk). The device is
    read now. Returns `(G,)` mean and variance on it; the GroupNorm hook moves them to wherever the encoder's
    forward then runs.
    """
    import torch

    from emo_pipeline.devices import compute_device

    device = compute_device(audio_encoder)
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    total_steps = (input_values.size - kernel) // stride + 1
    groups = norm.num_groups
    count = 0
    mean = torch.zeros(groups, dtype=torch.float64, device=device)
    m2 = torch.zeros(groups, dtype=torch.float64, device=device)
    handle = conv.register_forward_hook(_stop_after)
    try:
        for first in range(0, total_steps, steps_per_block):
            last = min(first + steps_per_block, total_steps)
            block = torch.from_numpy(input_values[first * stride : (last - 1) * stride + kernel])
            try:
                audio_encoder(block.to(device=device, dtype=dtype)[None])
            except _FirstConvOutput as stopped:
                output = stopped.output[0].to(device).double().reshape(groups, -1)  # the conv's (C, steps), grouped
            else:  # pragma: no cover - a wav2vec2 whose forward skips its feature encoder
                raise RuntimeError("wav2vec2's first conv did not run in its forward")
            block_count = output.shape[1]
            block_mean = output.mean(dim=1)
            block_m2 = (output - block_mean[:, None]).pow(2).sum(dim=1)
            delta = block_mean - mean
            new_count = count + block_count
            mean = mean + delta * (block_count / new_count)
            m2 = m2 + block_m2 + delta.pow(2) * (count * block_count / new_count)
            count = new_count
    finally:
        handle.remove()
    return mean, m2 / count


def _fixed_group_norm_hook(mean: torch.Tensor, variance: torch.Tensor) -> Any:
    """Forward hook that redoes a GroupNorm with given per-group statistics instead of the window's own."""
    import torch

    from emo_pipeline.devices import offloaded_tensor

    def hook(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        # Everything on the device this call ran on, read now (offloading may have moved the encoder since the
        # statistics were gathered), and the affine weights from the offload hook if it parked them on "meta".
        hidden = inputs[0]
        batch, channels, steps = hidden.shape
        grouped = hidden.reshape(batch, module.num_groups, -1).double()
        group_mean = mean.to(hidden.device)[None, :, None]
        group_variance = variance.to(hidden.device)[None, :, None]
        normalised = (grouped - group_mean) / torch.sqrt(group_variance + module.eps)
        normalised = normalised.reshape(batch, channels, steps).to(hidden.dtype)
        weight = offloaded_tensor(module, "weight").to(hidden.device, hidden.dtype)
        bias = offloaded_tensor(module, "bias").to(hidden.device, hidden.dtype)
        return normalised * weight[None, :, None] + bias[None, :, None]

    return hook


def iter_audio_features(
    audio: np.ndarray,
    audio_encoder: Wav2Vec2Model,
    feature_extractor: Wav2Vec2FeatureExtractor,
    fps: float | Fraction,
    num_frames: int | None = None,
    layers: slice | Sequence[int] | None = None,
    chunk_seconds: float = 20.0,
    context_seconds: float = 2.0,
    sample_rate: int = 16000,
) -> Iterator[torch.Tensor]:
    """Yield wav2vec2 features per video frame, `(F_chunk, L, D)` at a time; `torch.cat` gives the whole video.

    Args:
        audio: `(N,)` float32 mono at `sample_rate` (see `load_audio`).
        audio_encoder: a stock `Wav2Vec2Model` (call `.eval()` first: in train mode wav2vec2 masks time steps).
        feature_extractor: its `Wav2Vec2FeatureExtractor`; its normalisation is applied once to the whole audio,
            so chunking does not change it.
        fps: video frame rate (frames/s).
        num_frames: number of video frames F; default `num_video_frames(N, sample_rate, fps)`. Frames past the
            end of the audio repeat the last feature.
        layers: which `hidden_states` to return, as indices into transformers' tuple (0 = input embeddings,
            i = output of transformer layer i). Default: all transformer layers, `hidden_states[1:]`.
        chunk_seconds: video seconds per yielded chunk.
        context_seconds: extra audio on both sides of each chunk that the transformer sees (its attention is
            global, so context makes chunk borders invisible). When a chunk plus its context covers the whole audio,
            the result is exactly the one-shot forward pass. Otherwise the convolutional front end still matches
            the one-shot pass: wav2vec2-base's first GroupNorm (which normalises over the whole sequence) is given
            statistics gathered over all of the audio in a cheap first pass of the first conv layer; only the
            transformer's attention beyond the context differs.
        sample_rate: rate of `audio` in Hz; must match the feature extractor's.

    Yields:
        `(F_chunk, L, D)` tensors on the device the encoder ran on (under CPU/group offloading: its execution device)
        and its dtype, consecutive in time. Frame i takes wav2vec2's
        50 Hz hidden states linearly interpolated at the frame's centre time `(i + 0.5) / fps`, each wav2vec2 step
        placed at the centre of its receptive field. Each chunk runs the encoder on at most
        `chunk_seconds + 2 * context_seconds` (+ one receptive field) of audio, so peak memory does not grow with
        the audio length.
    """
    import torch

    from emo_pipeline.devices import compute_device

    audio = np.asarray(audio)
    if audio.ndim != 1 or audio.dtype.kind != "f":
        raise EMOInputError(
            f"audio must be 1-D float mono samples (see load_audio), got shape {audio.shape} dtype {audio.dtype}"
        )
    if audio.size == 0:
        raise EMOInputError("audio contains no samples (zero length)")
    if not chunk_seconds > 0 or not context_seconds >= 0:
        raise EMOInputError(
            f"chunk_seconds must be > 0 and context_seconds >= 0, got {chunk_seconds!r}, {context_seconds!r}"
        )
    fps_value = _fps_fraction(fps)
    if num_frames is None:
        num_frames = num_video_frames(audio.size, sample_rate, fps_value)
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise EMOInputError(f"num_frames must be a positive int, got {num_frames!r}")
    num_frames = int(num_frames)
    hidden_indices = _hidden_state_indices(layers, audio_encoder.config.num_hidden_layers)

    # The feature extractor's normalisation (zero mean, unit variance over the whole utterance) is global: apply
    # it once to all of the audio so that every chunk sees the same normalisation as a one-shot pass.
    input_values = feature_extractor(audio, sampling_rate=sample_rate, return_tensors="np")["input_values"]
    input_values = np.asarray(input_values, dtype=np.float32).reshape(-1)

    receptive_field, stride = _conv_geometry(audio_encoder)
    if input_values.size < receptive_field:  # shorter than one wav2vec2 step (25 ms): pad with silence
        input_values = np.pad(input_values, (0, receptive_field - input_values.size))
    num_samples = input_values.size
    num_steps = int(audio_encoder._get_feat_extract_output_lengths(num_samples))  # wav2vec2 steps (50 Hz)

    # Position of each video frame's centre on wav2vec2's step axis.
    frame_times = (np.arange(num_frames, dtype=np.float64) + 0.5) / float(fps_value)
    positions = (frame_times * sample_rate - (receptive_field - 1) / 2) / stride
    positions = np.clip(positions, 0.0, num_steps - 1)

    frames_per_chunk = max(1, round(chunk_seconds * float(fps_value)))
    context_steps = math.ceil(context_seconds * sample_rate / stride)
    dtype = next(audio_encoder.parameters()).dtype

    group_norm = _first_group_norm(audio_encoder)
    norm_stats = None
    for first in range(0, num_frames, frames_per_chunk):
        # no_grad per chunk, never across the yield: a suspended (or later garbage-collected) generator must
        # not leave autograd disabled for its caller.
        with torch.no_grad():
            last = min(first + frames_per_chunk, num_frames)
            chunk_positions = positions[first:last]
            step_lo = int(np.floor(chunk_positions[0]))
            step_hi = min(int(np.floor(chunk_positions[-1])) + 1, num_steps - 1)
            window_lo = max(0, step_lo - context_steps)
            window_hi = min(num_steps - 1, step_hi + context_steps)
            sample_lo = window_lo * stride
            # The last window runs to the end of the input, so a window that spans everything is the one-shot pass.
            sample_hi = num_samples if window_hi == num_steps - 1 else window_hi * stride + receptive_field
            # The device is read at every call, never cached: under model/sequential/group offloading the encoder's
            # weights are parked (on the CPU or "meta") and its offload hook moves the work to its execution device.
            device = compute_device(audio_encoder)
            window = torch.from_numpy(input_values[sample_lo:sample_hi]).to(device=device, dtype=dtype)[None]
            # The hook lives only for this call, never across a yield: other users of the encoder are unaffected.
            handle = None
            if group_norm is not None and (sample_lo > 0 or sample_hi < num_samples):
                if norm_stats is None:  # first window that is not the whole input: gather whole-input statistics
                    steps_per_block = max(1, math.ceil(window.shape[-1] / group_norm[0].stride[0]))
                    norm_stats = _global_group_norm_stats(
                        audio_encoder, *group_norm, input_values, steps_per_block, dtype
                    )
                handle = group_norm[1].register_forward_hook(_fixed_group_norm_hook(*norm_stats))
            try:
                output = audio_encoder(window, output_hidden_states=True, return_dict=True)
            finally:
                if handle is not None:
                    handle.remove()
            hidden = torch.stack([output.hidden_states[i][0] for i in hidden_indices])  # (L, steps, D)
            del output
            expected = window_hi - window_lo + 1
            if hidden.shape[1] != expected:  # pragma: no cover - guards the geometry arithmetic above
                raise RuntimeError(f"wav2vec2 returned {hidden.shape[1]} steps for a window of {expected}")

            local = torch.from_numpy(chunk_positions - window_lo).to(device=hidden.device)  # where they came out
            lower = local.floor().long().clamp(0, expected - 1)
            upper = (lower + 1).clamp(max=expected - 1)
            weight = (local - lower).to(dtype)[None, :, None]
            features = hidden[:, lower] * (1 - weight) + hidden[:, upper] * weight  # (L, F_chunk, D)
        yield features.transpose(0, 1).contiguous()


def extract_audio_features(
    audio: np.ndarray,
    audio_encoder: Wav2Vec2Model,
    feature_extractor: Wav2Vec2FeatureExtractor,
    fps: float | Fraction,
    num_frames: int | None = None,
    layers: slice | Sequence[int] | None = None,
    chunk_seconds: float = 20.0,
    context_seconds: float = 2.0,
    sample_rate: int = 16000,
) -> torch.Tensor:
    """wav2vec2 hidden states per video frame, `(F, L, D)`: `torch.cat` of `iter_audio_features` (same arguments).

    F = `num_frames` or `num_video_frames(len(audio), sample_rate, fps)`; L = number of chosen layers (default
    `config.num_hidden_layers`); D = `config.hidden_size`. On the device the encoder ran on, in its dtype.
    """
    import torch

    return torch.cat(
        list(
            iter_audio_features(
                audio,
                audio_encoder,
                feature_extractor,
                fps,
                num_frames=num_frames,
                layers=layers,
                chunk_seconds=chunk_seconds,
                context_seconds=context_seconds,
                sample_rate=sample_rate,
            )
        )
    )


def window_audio_features(feats: torch.Tensor, m: int) -> torch.Tensor:
    """EMO's audio window (arXiv 2402.17485, Sec. 3.2): frame i gets frames i-m..i+m, edge padded.

    `(F, L, D) -> (F, 2m+1, L, D)`, or batched `(B, F, L, D) -> (B, F, 2m+1, L, D)`.
    """
    import torch

    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"window half-width m must be an int >= 0, got {m!r}")
    if feats.ndim not in (3, 4):
        raise ValueError(f"expected (F, L, D) or (B, F, L, D) features, got shape {tuple(feats.shape)}")
    frame_axis = feats.ndim - 3
    num_frames = feats.shape[frame_axis]
    offsets = torch.arange(-m, m + 1, device=feats.device)
    index = (torch.arange(num_frames, device=feats.device)[:, None] + offsets).clamp(0, num_frames - 1)
    return feats[index] if frame_axis == 0 else feats[:, index]


class FeatureWindows:
    """Windowed per-frame audio features for consecutive frame ranges, pulled lazily from an iterator of chunks
    `(frames, ...)` (consecutive frames of the whole track, any chunk lengths).

    Equals `window_audio_features(torch.cat(chunks), m)[start:stop]` with edge padding at the ends of the whole
    track, while holding only the frames a window still needs.
    """

    def __init__(self, chunks: Iterator[torch.Tensor], num_frames: int, m: int):
        self.chunks, self.num_frames, self.m = chunks, num_frames, m
        self.buffer: torch.Tensor | None = None
        self.offset = 0  # global index of buffer[0]

    def window(self, start: int, stop: int) -> torch.Tensor:
        """`(stop - start, 2m+1, L, D)` for frames start..stop-1 (frames past the end repeat the last one)."""
        import torch

        need = min(stop + self.m, self.num_frames)
        while self.buffer is None or self.offset + self.buffer.shape[0] < need:
            chunk = next(self.chunks)
            self.buffer = chunk if self.buffer is None else torch.cat([self.buffer, chunk])
        last = self.num_frames - 1
        centres = torch.arange(start, stop).clamp(max=last)
        index = (centres[:, None] + torch.arange(-self.m, self.m + 1)).clamp(0, last) - self.offset
        windows = self.buffer[index.to(self.buffer.device)]
        drop = max(0, min(stop, last) - self.m - self.offset)  # frames no later window can reach
        self.buffer, self.offset = self.buffer[drop:], self.offset + drop
        return windows

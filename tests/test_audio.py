"""Tests of emo_pipeline.audio: decoding every variant to the same 16 kHz mono samples, the frame-count rule,
chunked wav2vec2 features (equal to one-shot, bounded windows) and EMO's audio window."""

from __future__ import annotations

import importlib.resources
import io
import math
import os
import wave
from fractions import Fraction
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import av
import numpy as np
import pytest
import torch

from emo_pipeline.audio import (
    extract_audio_features,
    iter_audio_features,
    load_audio,
    num_video_frames,
    window_audio_features,
)
from emo_pipeline.errors import EMOInputError

SPEECH = Path(str(importlib.resources.files("emo_pipeline") / "assets" / "speech.wav"))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(SPEECH)


def _encode_audio(samples: np.ndarray, path: Path, codec: str, rate: int, layout: str, fmt: str | None = None):
    """Write 16 kHz mono `samples` with PyAV as `codec` at `rate` Hz, `layout` (mono: as is, stereo: duplicated)."""
    container = av.open(str(path), "w", format=fmt)
    stream = container.add_stream(codec, rate=rate, layout=layout)
    planes = samples[None] if layout == "mono" else np.stack([samples, samples])
    source = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes, np.float32), format="fltp", layout=layout)
    source.sample_rate = 16000
    source.pts = 0
    resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate)
    sent = 0
    for frame in resampler.resample(source) + resampler.resample(None):
        frame.pts = sent  # real timestamps let the muxer record the encoder delay (an mp4 edit list)
        sent += frame.samples
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()


def _write_mp4(path: Path, samples: np.ndarray | None, num_frames: int = 10) -> None:
    container = av.open(str(path), "w")
    video = container.add_stream("libx264", rate=25)
    video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
    audio = container.add_stream("aac", rate=16000, layout="mono") if samples is not None else None
    for index in range(num_frames):
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * index, np.uint8), format="rgb24")
        frame.pts = index
        for packet in video.encode(frame):
            container.mux(packet)
    for packet in video.encode(None):
        container.mux(packet)
    if audio is not None:
        frame = av.AudioFrame.from_ndarray(samples[None].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in audio.encode(frame) + audio.encode(None):
            container.mux(packet)
    container.close()


def _wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


def test_asset_is_16khz_mono_speech(speech):
    assert speech.dtype == np.float32 and speech.ndim == 1
    assert 2.5 < speech.size / 16000 < 4.0
    assert 0.1 < np.abs(speech).max() <= 1.0


# (codec, container format, suffix, rate, layout, max length difference in samples, max relative RMS error).
# Lossless variants keep the length within a resampler rounding sample. AAC's decoder keeps the encoder's padding
# of the last 1024-sample frame, so its length may exceed by < 1024. Errors: lossless/resampled ~1%; 8 kHz drops
# the 4-8 kHz band of the speech (~8%); low-bitrate mp3 at 16 kHz ~15%.
VARIANTS = [
    ("libmp3lame", "mp3", "mp3", 16000, "mono", 2, 0.25),
    ("libmp3lame", "mp3", "mp3", 44100, "stereo", 2, 0.12),
    ("flac", "flac", "flac", 44100, "stereo", 2, 0.02),
    ("pcm_s16le", "wav", "wav", 44100, "stereo", 2, 0.02),
    ("pcm_s16le", "wav", "wav", 8000, "mono", 2, 0.15),
    ("libopus", "ogg", "ogg", 48000, "mono", 2, 0.1),
    ("aac", "ipod", "m4a", 16000, "mono", 1024, 0.05),
    ("aac", "mp4", "mp4", 44100, "stereo", 1024, 0.1),
]


@pytest.mark.parametrize("codec,fmt,suffix,rate,layout,length_tol,error_tol", VARIANTS)
def test_every_format_gives_the_same_samples(
    tmp_path, speech, codec, fmt, suffix, rate, layout, length_tol, error_tol
):
    path = tmp_path / f"speech_{rate}_{layout}.{suffix}"
    _encode_audio(speech, path, codec, rate, layout, fmt)
    decoded = load_audio(path)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert 0 <= decoded.size - speech.size <= length_tol or abs(decoded.size - speech.size) <= 2
    common = min(decoded.size, speech.size)
    relative_rms = np.sqrt(np.mean((decoded[:common] - speech[:common]) ** 2) / np.mean(speech**2))
    assert relative_rms < error_tol
    # Stereo made of two copies averages back to the same loudness (FFmpeg's downmix would be 1.41x).
    assert 0.9 < np.abs(decoded).max() / np.abs(speech).max() < 1.1


def test_audio_track_of_a_video(tmp_path, speech):
    path = tmp_path / "talk.mp4"
    _write_mp4(path, speech)
    decoded = load_audio(path)
    assert 0 <= decoded.size - speech.size < 1024
    assert np.sqrt(np.mean((decoded[: speech.size] - speech) ** 2) / np.mean(speech**2)) < 0.05


def test_sources_path_fileobj_bytes_and_arrays(speech):
    data = SPEECH.read_bytes()
    with open(SPEECH, "rb") as handle:
        from_file = load_audio(handle)
    for decoded in (load_audio(str(SPEECH)), from_file, load_audio(data), load_audio(bytearray(data))):
        np.testing.assert_array_equal(decoded, speech)
    np.testing.assert_array_equal(load_audio(speech), speech)
    np.testing.assert_allclose(load_audio(torch.from_numpy(speech)), speech)
    # (N, C) and (C, N) are both read with the shorter axis as channels, then averaged.
    stereo = np.stack([speech, 0.5 * speech], axis=1)
    np.testing.assert_allclose(load_audio(stereo), 0.75 * speech, atol=1e-7)
    np.testing.assert_allclose(load_audio(stereo.T), 0.75 * speech, atol=1e-7)
    pcm = (speech * 32768).astype(np.int16)
    np.testing.assert_allclose(load_audio(pcm), speech, atol=1 / 32768)


def test_array_at_another_rate_is_resampled(speech):
    at_44k = load_audio(speech, sample_rate=44100, src_sample_rate=16000)
    assert abs(at_44k.size - round(speech.size * 44100 / 16000)) <= 2
    back = load_audio(at_44k, src_sample_rate=44100)
    assert abs(back.size - speech.size) <= 2
    common = min(back.size, speech.size)
    assert np.sqrt(np.mean((back[:common] - speech[:common]) ** 2) / np.mean(speech**2)) < 0.02


def test_silence_is_valid(tmp_path):
    silent = np.zeros(8000, np.float32)
    np.testing.assert_array_equal(load_audio(silent), silent)
    path = tmp_path / "silence.wav"
    path.write_bytes(_wav_bytes(silent))
    decoded = load_audio(path)
    assert decoded.size == 8000 and not decoded.any()


def test_bad_files_raise_naming_the_file(tmp_path, speech):
    missing = tmp_path / "missing.wav"
    with pytest.raises(EMOInputError, match=r"missing\.wav.*does not exist"):
        load_audio(missing)
    empty = tmp_path / "empty.mp3"
    empty.write_bytes(b"")
    with pytest.raises(EMOInputError, match=r"empty\.mp3.*empty"):
        load_audio(empty)
    zero = tmp_path / "zero.wav"
    zero.write_bytes(_wav_bytes(np.zeros(0)))
    with pytest.raises(EMOInputError, match=r"zero\.wav.*no audio samples"):
        load_audio(zero)
    junk = tmp_path / "junk.ogg"
    junk.write_bytes(b"this is not audio at all " * 40)
    with pytest.raises(EMOInputError, match=r"junk\.ogg.*could not be decoded"):
        load_audio(junk)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(SPEECH.read_bytes()[:30])  # cut inside the RIFF header
    with pytest.raises(EMOInputError, match=r"truncated\.wav.*could not be decoded"):
        load_audio(truncated)
    silent_video = tmp_path / "no_audio.mp4"
    _write_mp4(silent_video, None)
    with pytest.raises(EMOInputError, match=r"no_audio\.mp4.*no audio stream.*video"):
        load_audio(silent_video)
    with pytest.raises(EMOInputError, match=r"speech\.wav.*longer than the limit of 1 s"):
        load_audio(SPEECH, max_duration=1.0)
    with pytest.raises(EMOInputError, match=r"audio bytes \(0 bytes\).*empty"):
        load_audio(b"")


def test_long_audio_stops_decoding_at_the_limit(tmp_path):
    long = tmp_path / "long.wav"
    long.write_bytes(_wav_bytes(np.zeros(16000 * 30)))
    with pytest.raises(EMOInputError, match=r"long\.wav.*longer than the limit of 10 s"):
        load_audio(long, max_duration=10.0)
    assert load_audio(long, max_duration=None).size == 16000 * 30


def test_bad_arrays_raise_naming_the_array():
    with pytest.raises(EMOInputError, match=r"array of shape \(0,\).*no audio samples"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(EMOInputError, match=r"array of shape \(3, 3\).*channel axis"):
        load_audio(np.zeros((3, 3), np.float32))
    with pytest.raises(EMOInputError, match=r"array of shape \(2, 3, 4\)"):
        load_audio(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(EMOInputError, match=r"NaN"):
        load_audio(np.array([0.0, np.nan, 0.0], np.float32))
    with pytest.raises(EMOInputError, match=r"unsupported dtype complex64"):
        load_audio(np.zeros(10, np.complex64))
    with pytest.raises(EMOInputError, match=r"src_sample_rate is only for arrays"):
        load_audio(SPEECH, src_sample_rate=8000)
    with pytest.raises(EMOInputError, match=r"unsupported audio input of type int"):
        load_audio(42)


# ----------------------------------------------------------------------------------------------------------------
# Frame count rule
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_samples,sample_rate,fps,expected",
    [
        (16000, 16000, 25, 25),  # divides evenly
        (16001, 16000, 25, 26),  # one sample more starts a new frame
        (15999, 16000, 25, 25),
        (8000, 16000, 25, 13),  # 12.5 frames -> 13
        (1, 16000, 25, 1),
        (0, 16000, 25, 0),
        (1_600_000, 16000, 29.97, 2997),  # 100 s at 29.97 fps
        (2_090_088, 16000, 30000 / 1001, 3915),  # float math gives 3915.0000000000005 -> 3916
        (16_016_000, 16000, 30000 / 1001, 30000),  # 1001 s of NTSC
        (16_016_001, 16000, Fraction(30000, 1001), 30001),
        (44100 * 3, 44100, 24, 72),
    ],
)
def test_num_video_frames_is_exact(num_samples, sample_rate, fps, expected):
    assert num_video_frames(num_samples, sample_rate, fps) == expected


def test_float_rounding_would_be_wrong():
    # The reason for Fraction: the naive float formula overshoots on this input.
    assert math.ceil(2_090_088 / 16000 * (30000 / 1001)) == 3916
    assert num_video_frames(2_090_088, 16000, 30000 / 1001) == 3915


# ----------------------------------------------------------------------------------------------------------------
# wav2vec2 features
# ----------------------------------------------------------------------------------------------------------------


def _tiny_wav2vec2():
    """A seeded tiny wav2vec2 with the real model's 320-sample stride (50 Hz features)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 8, 8),
        conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    return Wav2Vec2Model(config).eval(), Wav2Vec2FeatureExtractor(sampling_rate=16000)


@pytest.fixture(scope="module")
def tiny_wav2vec2():
    # One thread: the tiny model gains nothing from more, and OpenMP threads competing with other processes for
    # the CPU slow these tests down tenfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _tiny_wav2vec2()
    finally:
        torch.set_num_threads(threads)


def _reference_features(audio, model, extractor, fps, num_frames):
    """Independent one-shot reference: one forward pass over all the audio, then interpolation at frame centres."""
    values = extractor(audio, sampling_rate=16000, return_tensors="pt")["input_values"]
    with torch.no_grad():
        hidden = torch.stack(model(values, output_hidden_states=True).hidden_states[1:])[:, 0]  # (L, J, D)
    receptive_field = 1 + 9 * 1 + 7 * 5 + 7 * 40  # kernels (10, 8, 8), strides (5, 8, 8)
    times = (np.arange(num_frames) + 0.5) / fps
    positions = np.clip((times * 16000 - (receptive_field - 1) / 2) / 320, 0, hidden.shape[1] - 1)
    lower = np.floor(positions).astype(int)
    upper = np.minimum(lower + 1, hidden.shape[1] - 1)
    weight = torch.tensor(positions - lower, dtype=torch.float32)[None, :, None]
    return (hidden[:, lower] * (1 - weight) + hidden[:, upper] * weight).transpose(0, 1)


@pytest.mark.parametrize("duration,fps", [(2.0, 25), (2.02, 25), (1.5, 29.97)])
def test_features_shape_and_one_shot_reference(tiny_wav2vec2, duration, fps):
    model, extractor = tiny_wav2vec2
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(round(duration * 16000))).astype(np.float32)
    features = extract_audio_features(audio, model, extractor, fps=fps)
    num_frames = num_video_frames(audio.size, 16000, fps)
    assert features.shape == (num_frames, 2, 32)  # (F, L = num_hidden_layers, D = hidden_size)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, _reference_features(audio, model, extractor, fps, num_frames))


def test_chunked_equals_one_shot(tiny_wav2vec2, speech):
    """Chunks whose context spans the whole clip reproduce one-shot extraction (asserted to atol 1e-5; measured
    bit-identical). With 1 s of context the only difference left is attention beyond the context: asserted < 1%
    relative RMS error on the speech asset (measured 0.13%; without the whole-input GroupNorm statistics it is 12%).
    """
    model, extractor = tiny_wav2vec2
    rng = np.random.default_rng(1)
    audio = (0.1 * rng.standard_normal(16000 * 6)).astype(np.float32)
    one_shot = extract_audio_features(audio, model, extractor, fps=25, chunk_seconds=60.0)
    full_context = extract_audio_features(audio, model, extractor, fps=25, chunk_seconds=0.5, context_seconds=10.0)
    torch.testing.assert_close(full_context, one_shot, atol=1e-5, rtol=1e-5)

    one_shot = extract_audio_features(speech, model, extractor, fps=25, chunk_seconds=60.0)
    chunks = list(iter_audio_features(speech, model, extractor, fps=25, chunk_seconds=0.5, context_seconds=1.0))
    assert [chunk.shape[0] for chunk in chunks] == [12] * 7 + [1]  # 85 frames, round(0.5 s * 25 fps) = 12 per chunk
    limited = torch.cat(chunks)
    relative_rms = ((limited - one_shot).pow(2).mean() / one_shot.pow(2).mean()).sqrt().item()
    assert relative_rms < 0.01
    assert not model.feature_extractor.conv_layers[0].layer_norm._forward_hooks  # no hook outlives a window


def test_layer_selection_and_explicit_frame_count(tiny_wav2vec2):
    model, extractor = tiny_wav2vec2
    audio = np.random.default_rng(2).standard_normal(16000).astype(np.float32) * 0.1
    everything = extract_audio_features(audio, model, extractor, fps=25, layers=slice(0, None))
    assert everything.shape == (25, 3, 32)  # hidden_states[0] (input embeddings) + 2 layers
    last = extract_audio_features(audio, model, extractor, fps=25, layers=[-1])
    torch.testing.assert_close(last[:, 0], everything[:, 2])
    longer = extract_audio_features(audio, model, extractor, fps=25, num_frames=30)
    assert longer.shape == (30, 2, 32)
    torch.testing.assert_close(longer[25:], longer[24:25].expand(5, -1, -1))  # past the end: last feature held
    with pytest.raises(EMOInputError, match="out of range"):
        extract_audio_features(audio, model, extractor, fps=25, layers=[5])


def test_very_short_audio_gives_one_frame(tiny_wav2vec2):
    model, extractor = tiny_wav2vec2
    features = extract_audio_features(np.full(100, 0.1, np.float32), model, extractor, fps=25)
    assert features.shape == (1, 2, 32) and torch.isfinite(features).all()
    with pytest.raises(EMOInputError, match="zero length"):
        extract_audio_features(np.zeros(0, np.float32), model, extractor, fps=25)


def test_long_audio_runs_in_bounded_windows(tiny_wav2vec2):
    """Peak activation memory is flat in the audio length: the encoder only ever sees windows of
    chunk + 2 * context seconds (+ one receptive field), whatever the audio length, and chunks come out lazily."""
    model, extractor = tiny_wav2vec2
    window_lengths: list[int] = []
    # Completed forwards only: the whole-input GroupNorm statistics stop the encoder after its first conv.
    handle = model.register_forward_hook(lambda module, args, output: window_lengths.append(args[0].shape[-1]))
    try:
        bound = (2.0 + 2 * 1.0) * 16000 + 325 + 320
        peaks = {}
        for minutes in (0.5, 2.0):
            window_lengths.clear()
            audio = np.zeros(round(minutes * 60 * 16000), np.float32)
            chunks = iter_audio_features(audio, model, extractor, fps=25, chunk_seconds=2.0, context_seconds=1.0)
            first = next(chunks)
            assert len(window_lengths) == 1  # lazy: one window computed for the first chunk
            sizes = [first.shape[0]] + [chunk.shape[0] for chunk in chunks]
            assert sum(sizes) == num_video_frames(audio.size, 16000, 25)
            assert max(sizes) == 50
            assert max(window_lengths) <= bound
            peaks[minutes] = max(window_lengths)
        assert peaks[2.0] == peaks[0.5]  # 4x the audio, the same largest activation
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------------------------
# Windowing
# ----------------------------------------------------------------------------------------------------------------


def test_window_audio_features_edge_padding():
    feats = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 3, 4)  # frame i holds value i
    windows = window_audio_features(feats, 2)
    assert windows.shape == (5, 5, 3, 4)
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4, 4], [2, 3, 4, 4, 4]])
    torch.testing.assert_close(windows[:, :, 0, 0], expected.float())
    batched = window_audio_features(torch.stack([feats, feats + 10]), 2)
    assert batched.shape == (2, 5, 5, 3, 4)
    torch.testing.assert_close(batched[1], windows + 10)
    torch.testing.assert_close(window_audio_features(feats, 0)[:, 0], feats)
    with pytest.raises(ValueError, match="m must be"):
        window_audio_features(feats, -1)


def test_a_suspended_or_discarded_feature_iterator_leaves_autograd_alone(tiny_wav2vec2, speech):
    """The pipeline stops pulling chunks once it has the frames it needs; the generator left behind must not turn
    autograd off for whoever runs next (it once did, when it was garbage-collected inside a later training step)."""
    import gc

    model, extractor = tiny_wav2vec2
    with torch.no_grad():
        chunks = iter_audio_features(speech, model, extractor, fps=25, chunk_seconds=0.5, context_seconds=0.5)
        next(chunks)
    assert torch.is_grad_enabled()
    del chunks
    gc.collect()
    assert torch.is_grad_enabled()

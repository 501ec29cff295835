"""Hallo's audio front end beyond the wav2vec golden: Hallo2's millisecond cut, and fast mode's chunked encoder.

Uses the tiny wav2vec2 of the Hallo wav2vec golden (tests/goldens/hallo/wav2vec, random weights) and its waveform.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emo_pipeline.errors import EMOInputError
from emo_pipeline.hallo_inputs import hallo2_segment_bounds, hallo_audio_features, iter_hallo_audio_features

WAV2VEC = Path(__file__).parent / "goldens" / "hallo" / "wav2vec"


@pytest.fixture(scope="module")
def wav2vec():
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    model = Wav2Vec2Model.from_pretrained(WAV2VEC / "model", local_files_only=True).eval()
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(WAV2VEC / "model", local_files_only=True)
    samples = load_file(WAV2VEC / "wav2vec_golden.safetensors")["waveform"].numpy()  # 20,800 samples, 1.3 s
    return model, extractor, samples


# ------------------------------------------------------------------------------------- Hallo2's millisecond cut


def test_hallo2_bounds_are_pydubs_whole_milliseconds() -> None:
    # len(AudioSegment) = round(1000 * frames / rate) ms; slices at int(ms * rate / 1000) frames
    assert hallo2_segment_bounds(19205, 16000, 60) == [(0, 19200)]  # 1200.3 ms -> 1200 ms: 5 samples dropped
    assert hallo2_segment_bounds(19210, 16000, 60) == [(0, 19216)]  # 1200.6 ms -> 1201 ms: 6 samples of silence
    assert hallo2_segment_bounds(16000 * 130 + 3, 16000, 60) == [(0, 960000), (960000, 1920000), (1920000, 2080000)]
    assert hallo2_segment_bounds(44100 + 20, 44100, 0.5) == [(0, 22050), (22050, 44100)]  # 1000.45 ms -> 1000 ms
    assert hallo2_segment_bounds(7, 16000, 60) == []  # under half a millisecond


def test_hallo2_drops_a_tail_under_half_a_millisecond(wav2vec) -> None:
    """The issue's track: 19,205 samples give 30 frames in Hallo2 (1200 ms), not ceil(30.008) = 31."""
    model, extractor, samples = wav2vec
    track = samples[:19205]
    chunks, total, length = iter_hallo_audio_features(track, model, extractor, segment_seconds=60.0)
    assert (length, total) == (30, 32)
    features = torch.cat(list(chunks))
    # exactly the features of the 19,200 samples pydub keeps
    cut, cut_length = hallo_audio_features(track[:19200], model, extractor)
    assert cut_length == 30 and torch.equal(features, cut)
    # Hallo (no cut) keeps every sample: 31 frames
    assert hallo_audio_features(track, model, extractor)[1] == 31


def test_hallo2_pads_a_track_that_rounds_up_with_silence(wav2vec) -> None:
    model, extractor, samples = wav2vec
    track = samples[:19210]  # 1200.625 ms -> 1201 ms: pydub reads 19,216 samples, 6 of them silence
    features, length = hallo_audio_features(track, model, extractor, segment_seconds=60.0)
    padded = np.concatenate([track, np.zeros(6, np.float32)])
    expected, expected_length = hallo_audio_features(padded, model, extractor)
    assert length == expected_length == 31 and torch.equal(features, expected)


def test_hallo2_track_under_half_a_millisecond_is_refused(wav2vec) -> None:
    model, extractor, samples = wav2vec
    with pytest.raises(EMOInputError, match="half millisecond"):
        hallo_audio_features(samples[:7], model, extractor, segment_seconds=60.0)


# --------------------------------------------------------------------------------------- fast mode: chunked wav2vec


def _transformer_lengths(model) -> tuple[list[int], object]:
    lengths: list[int] = []
    handle = model.encoder.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    return lengths, handle


def test_fast_mode_bounds_the_transformers_length(wav2vec) -> None:
    """Fast mode: 0.4 s of frames per chunk with 0.2 s of context either side: the transformer never sees more than
    (10 + 2 * 5) frames at once, where parity attends over all 48; same frame counts, different features."""
    model, extractor, samples = wav2vec
    lengths, handle = _transformer_lengths(model)
    try:
        parity, parity_length = hallo_audio_features(samples, model, extractor)
        assert lengths == [48]
        lengths.clear()
        chunks, total, length = iter_hallo_audio_features(
            samples, model, extractor, mode="fast", chunk_seconds=0.4, context_seconds=0.2
        )
        assert (total, length) == (48, parity_length) and lengths == []  # known before any encoding
        pieces = list(chunks)
    finally:
        handle.remove()
    assert [piece.shape[0] for piece in pieces] == [10, 10, 10, 10, 8]
    assert max(lengths) == 20 and len(lengths) == 5
    fast = torch.cat(pieces)
    assert fast.shape == parity.shape
    assert (fast - parity).abs().max() > 1e-3  # the chunks do not see the whole track


def test_fast_mode_chunks_sit_where_the_whole_track_puts_them(wav2vec) -> None:
    """With context reaching the whole track, every chunk is the whole track sliced: exactly parity's features
    (so the frame alignment of the chunks is the whole track's). A track of one chunk is parity's too."""
    model, extractor, samples = wav2vec
    parity, _ = hallo_audio_features(samples, model, extractor)
    chunks, _, _ = iter_hallo_audio_features(
        samples, model, extractor, mode="fast", chunk_seconds=0.4, context_seconds=5.0
    )
    pieces = list(chunks)
    assert len(pieces) == 5 and torch.equal(torch.cat(pieces), parity)
    assert torch.equal(hallo_audio_features(samples, model, extractor, mode="fast")[0], parity)


def test_audio_mode_and_chunk_arguments_are_checked(wav2vec) -> None:
    model, extractor, samples = wav2vec
    with pytest.raises(EMOInputError, match="mode must be one of"):
        iter_hallo_audio_features(samples, model, extractor, mode="turbo")
    with pytest.raises(EMOInputError, match="chunk_seconds must be positive"):
        iter_hallo_audio_features(samples, model, extractor, mode="fast", chunk_seconds=0)
    with pytest.raises(EMOInputError, match="context_seconds must be non-negative"):
        iter_hallo_audio_features(samples, model, extractor, mode="fast", context_seconds=-1.0)

"""Metric networks and formulas against their reference implementations, on seeded random weights
(the published weights are not needed; tests/goldens/make_metric_goldens.py made the SyncNet golden)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metric_goldens import GOLDENS, SYNC_SEED, crop_inputs, sync_inputs

from emo_pipeline.errors import EMOInputError
from emo_pipeline.evaluation import sync


@pytest.fixture(scope="module")
def syncnet():
    return sync.load_syncnet(random_seed=SYNC_SEED)


@pytest.fixture(scope="module")
def sync_golden():
    return dict(np.load(GOLDENS / "syncnet.npz"))


def test_syncnet_matches_syncnet_python_evaluate(syncnet, sync_golden):
    """Sync-C, Sync-D, the offset and every per-shift distance equal syncnet_python's SyncNetInstance.evaluate on
    the same weights and inputs (its MFCC front end, 5-frame / 20-MFCC windows, offset search over +-15)."""
    frames, audio = sync_inputs()
    result = sync.sync_scores(syncnet, frames, audio)
    golden_mean = sync_golden["dists"].mean(axis=0)
    np.testing.assert_allclose(result.mean_dists, golden_mean, rtol=0, atol=0.02)  # distances ~1e4: fp32 order
    assert result.offset == int(sync_golden["offset"])
    assert result.min_dist == pytest.approx(float(sync_golden["min_dist"]), rel=1e-4)
    assert result.confidence == pytest.approx(float(sync_golden["conf"]), rel=1e-3)
    assert result.offsets[0] == 15 and result.offsets[-1] == -15


def test_syncnet_colour_order_and_audio_scale_matter(syncnet, sync_golden):
    """The golden fails when the crops are fed RGB instead of syncnet_python's BGR, or the audio is not scaled to
    16-bit PCM as its wav is."""
    frames, audio = sync_inputs()
    golden_mean = sync_golden["dists"].mean(axis=0)
    rgb = sync.sync_scores(syncnet, frames[..., ::-1], audio)
    assert np.abs(np.asarray(rgb.mean_dists) - golden_mean).max() > 0.5
    quiet = sync.sync_scores(syncnet, frames, audio * 0.5)
    assert np.abs(np.asarray(quiet.mean_dists) - golden_mean).max() > 0.5


def test_offset_search_recovers_a_known_shift():
    """Video frame i shows what the audio said at frame i - k (the audio leads by k frames): the search reports
    offset k, within +-15 frames, either sign."""
    rng = np.random.default_rng(0)
    audio_features = torch.from_numpy(rng.normal(size=(60, 32)).astype(np.float32))
    for shift in (-12, -7, 0, 4, 11):
        video_features = torch.roll(audio_features, shifts=shift, dims=0)
        found = sync.sync_offset_search(video_features[15:45], audio_features[15:45], vshift=15)
        assert found["offset"] == shift
        assert found["confidence"] > 1.0
        assert found["mean_dists"].argmin() == 15 - shift
    aligned = sync.sync_offset_search(audio_features, audio_features, vshift=15)
    assert aligned["offset"] == 0 and aligned["min_dist"] == pytest.approx(0.0, abs=1e-4)


def test_face_track_crop_geometry_and_colour_order():
    """syncnet_python's crop: box half-size s = 30 -> rows cy-s..cy+1.8s, columns cx-1.4s..cx+1.4s, BGR, grey 110
    padding outside the frame."""
    yy, xx = np.mgrid[0:200, 0:200]
    frame = np.stack([xx, yy, np.full_like(xx, 7)], -1).astype(np.uint8)  # R = x, G = y, B = 7
    frames = np.repeat(frame[None], 13, axis=0)  # the 13-frame median filter's shortest track
    boxes = np.tile([60.0, 50.0, 100.0, 110.0], (13, 1))  # centre (80, 80), half-size 30
    crops = sync.crop_face_track(frames, boxes)
    assert crops.shape == (13, 224, 224, 3)
    blue, green, red = crops[0, 0, 0]
    assert blue == 7 and abs(int(green) - 50) <= 1 and abs(int(red) - 38) <= 1
    blue, green, red = crops[0, -1, -1]
    assert abs(int(green) - 133) <= 1 and abs(int(red) - 121) <= 1
    edge = sync.crop_face_track(frames, np.tile([0.0, 0.0, 40.0, 60.0], (13, 1)))
    assert (edge[0, 0, 0] == 110).all()
    with pytest.raises(EMOInputError, match="13 frames"):
        sync.crop_face_track(frames[:12], boxes[:12])


def test_face_track_crop_equals_syncnet_python_crop_video():
    """Every 224x224 BGR crop equals the one syncnet_python's run_pipeline.crop_video writes for the same frames and
    face boxes (its box median filter, padding, crop window and resize)."""
    frames, boxes = crop_inputs()
    golden = np.load(GOLDENS / "syncnet_crop.npz")["crops_bgr"]
    np.testing.assert_array_equal(sync.crop_face_track(frames, boxes), golden)


def test_silent_audio_is_an_error(syncnet):
    frames, audio = sync_inputs()
    with pytest.raises(EMOInputError, match="silent"):
        sync.sync_scores(syncnet, frames, np.zeros_like(audio))


# ----------------------------------------------------------------------------------------------------------------
# FID: pytorch-fid's own network and data path; the Fréchet distance
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception():
    from emo_pipeline.evaluation.fid import build_fid_inception

    return build_fid_inception(random_seed=0)


def test_fid_features_match_pytorch_fid_get_activations(inception, tmp_path):
    """Our frame features equal pytorch-fid's `get_activations` on the same frames saved as PNG files (its PIL RGB
    loading + ToTensor + the network's resize/normalisation), and change when the frames arrive as BGR."""
    from PIL import Image
    from pytorch_fid.fid_score import get_activations

    from emo_pipeline.evaluation.fid import InceptionFeatures

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:72, 0:88] / 72.0
    frames = np.stack(
        [
            np.clip(120 + 100 * np.stack([np.sin(5 * xx + i), np.cos(4 * yy - i), xx * yy], -1), 0, 255)
            for i in range(3)
        ]
    )
    frames = np.clip(frames + rng.normal(0, 10, frames.shape), 0, 255).astype(np.uint8)
    files = []
    for index, frame in enumerate(frames):
        files.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(frame).save(files[-1])
    reference = get_activations(files, inception, batch_size=3, dims=2048, device="cpu", num_workers=0)
    ours = InceptionFeatures(inception, batch_size=2)(frames)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
    swapped = InceptionFeatures(inception)(np.ascontiguousarray(frames[..., ::-1]))
    assert np.abs(swapped - reference).max() > 100 * np.abs(ours - reference).max() + 1e-3


def test_frechet_distance_matches_a_direct_scipy_computation():
    """Streaming statistics fed in uneven chunks + pytorch-fid's distance == |mu1-mu2|^2 + Tr(S1+S2-2 sqrtm(S1 S2))
    from np.cov and scipy.linalg.sqrtm on all rows at once."""
    from scipy import linalg

    from emo_pipeline.evaluation.frechet import FeatureStats, frechet_distance

    rng = np.random.default_rng(0)
    first = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    second = rng.normal(0.3, 1.2, size=(250, 16)) @ rng.normal(size=(16, 16))
    stats = FeatureStats(), FeatureStats()
    for rows, target in ((first, stats[0]), (second, stats[1])):
        for chunk in np.array_split(rows, [7, 100, 101]):
            target.add(chunk)
    mu1, mu2 = first.mean(0), second.mean(0)
    s1, s2 = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(*stats) == pytest.approx(direct, rel=1e-6)
    same = FeatureStats()
    same.add(first)
    assert frechet_distance(same, stats[0]) == pytest.approx(0.0, abs=1e-6)
    single = FeatureStats()
    single.add(first[:1])
    with pytest.raises(EMOInputError, match="at least 2"):
        frechet_distance(single, stats[0])

"""Hallo's conditioning front end (emo_pipeline/hallo_inputs.py) against goldens made from Hallo's own code.

Goldens: tests/goldens/hallo/masks (make_hallo_mask_golden.py: Hallo's util.py mask functions and
ImageProcessor resizes on synthetic landmarks), tests/goldens/hallo/wav2vec (make_wav2vec_golden.py: Hallo's
Wav2VecModel + AudioProcessor under transformers 4.39.2) and tests/goldens/hallo/inputs.safetensors (Hallo's
process_audio_emb). insightface and audio-separator need model files that are not available offline: only their
error paths and our selection logic around insightface are tested here; `test_real_face_embedding` runs when
HALLO_FACE_ANALYSIS_DIR points at Hallo's pretrained_models/face_analysis.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from emo_pipeline import hallo_inputs
from emo_pipeline.errors import EMOInputError
from emo_pipeline.hallo_inputs import (
    HALLO_FACE_ANALYSIS_FILES,
    hallo_audio_features,
    hallo_audio_windows,
    hallo_face_embedding,
    hallo_face_landmarks,
    hallo_face_masks,
    iter_hallo_audio_features,
    separate_vocals,
)

GOLDENS = Path(__file__).parent / "goldens" / "hallo"
PORTRAIT = Path(__file__).parents[1] / "emo_pipeline" / "assets" / "portrait.png"
WAV2VEC_TOLERANCE = 1e-5  # transformers 5.x vs Hallo's 4.39.2 (measured: 1.9e-6 on values up to 4.4)


@pytest.fixture(scope="module")
def mask_golden() -> tuple[dict, dict]:
    folder = GOLDENS / "masks"
    return json.loads((folder / "metadata.json").read_text()), load_file(folder / "mask_golden.safetensors")


@pytest.fixture(scope="module")
def portrait_landmarks() -> tuple[Image.Image, np.ndarray]:
    image = Image.open(PORTRAIT).convert("RGB")
    return image, hallo_face_landmarks(image)


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------


def test_mask_images_equal_hallo_get_mask(mask_golden) -> None:
    meta, golden = mask_golden
    images = hallo_inputs._hallo_mask_images(
        (meta["image_height"], meta["image_width"]),
        golden["landmarks"].numpy(),
        meta["face_expand_ratio"],
        meta["lip_expand_ratio"],
    )
    for key in ("face_mask", "lip_mask", "face_mask_blur", "sep_lip", "sep_background", "sep_face"):
        assert images[key].dtype == np.uint8
        np.testing.assert_array_equal(images[key], golden[key].numpy(), err_msg=key)


@pytest.mark.parametrize("size", [512, 64])
def test_face_masks_equal_hallo_image_processor_bit_exactly(mask_golden, size: int) -> None:
    meta, golden = mask_golden
    assert size in meta["image_sizes"]
    masks = hallo_face_masks(
        (meta["image_height"], meta["image_width"]),
        golden["landmarks"].numpy(),
        size,
        face_expand_ratio=meta["face_expand_ratio"],
        lip_expand_ratio=meta["lip_expand_ratio"],
    )
    region = masks.face_region
    assert region.shape == (1, 3, size, size) and region.dtype == torch.float32
    expected_region = golden[f"face_region_{size}"].float() / 255.0  # Hallo's ToTensor of the same uint8 values
    for channel in range(3):
        assert torch.equal(region[0, channel], expected_region)
    assert sorted(masks.region_masks) == [0, 1, 2, 3]
    for level, divisor in enumerate((8, 16, 32, 64)):
        side = size // divisor
        for kind, mask in zip(("full", "face", "lip"), masks.region_masks[level]):
            assert mask.shape == (1, side * side) and mask.dtype == torch.float32
            assert torch.equal(mask, golden[f"{kind}_mask_{size}_{level}"]), (kind, level)


def test_face_masks_on_a_square_portrait_crop(portrait_landmarks) -> None:
    """The lead's use: landmarks of a square crop. The masks split the image (full + face + lip ~ 1: Hallo blurs
    and normalises the face and lip boxes separately, so the lip can exceed the face where it nears the face box's
    edge and the saturating face - lip leaves a small excess), the face box holds the lip box, and the FaceLocator
    input is 1 inside the face box, 0 outside."""
    image, landmarks = portrait_landmarks
    masks = hallo_face_masks((image.height, image.width), landmarks, 128)
    x0, x1, y0, y1 = masks.face_box
    lx0, lx1, ly0, ly1 = masks.lip_box
    assert 0 <= x0 < lx0 < lx1 < x1 <= image.width and 0 <= y0 < ly0 < ly1 < y1 <= image.height
    region = masks.face_region[0, 0]
    scale = 128 / image.width
    assert region[int(y0 * scale) + 2 : int(y1 * scale) - 2, int(x0 * scale) + 2 : int(x1 * scale) - 2].min() == 1
    assert region[: int(y0 * scale) - 2].max() == 0 and region[int(y1 * scale) + 2 :].max() == 0
    for full, face, lip in masks.region_masks.values():
        total = full + face + lip
        assert total.min() >= 1 - 2 / 255 and total.max() <= 1.1  # uint8 truncations; the excess above
    full, face, lip = masks.region_masks[0]  # 16 x 16
    assert lip.max() > 0.5 and face.max() > 0.5 and full.max() == 1 and full.min() < 0.5


def test_face_box_at_the_image_edge_is_shifted_inside() -> None:
    """Hallo's expand_region keeps the box size and moves it back into the image."""
    assert hallo_inputs._expand_region([0.0, 100.0, 10.0, 50.0], 300, 200, 1.2) == (0, 120, 6, 54)
    assert hallo_inputs._expand_region([250.0, 300.0, 150.0, 200.0], 300, 200, 2.0) == (200, 300, 100, 200)


def test_face_masks_reject_bad_inputs(mask_golden) -> None:
    _, golden = mask_golden
    landmarks = golden["landmarks"].numpy()
    with pytest.raises(EMOInputError, match="multiple of 64"):
        hallo_face_masks((360, 300), landmarks, 100)
    with pytest.raises(EMOInputError, match=r"\(478, 2\)"):
        hallo_face_masks((360, 300), landmarks[:100], 64)
    with pytest.raises(EMOInputError, match="image_size"):
        hallo_face_masks((360,), landmarks, 64)
    bad = landmarks.copy()
    bad[5, 0] = np.nan
    with pytest.raises(EMOInputError, match="NaN"):
        hallo_face_masks((360, 300), bad, 64)


# ----------------------------------------------------------------------------------------------------------------
# Landmarks
# ----------------------------------------------------------------------------------------------------------------


def test_landmarks_of_the_bundled_portrait(portrait_landmarks) -> None:
    from emo_pipeline.face import detect_faces

    image, landmarks = portrait_landmarks
    assert landmarks.shape == (478, 2) and landmarks.dtype == np.float64
    assert (landmarks >= 0).all() and (landmarks[:, 0] < image.width).all() and (landmarks[:, 1] < image.height).all()
    left_eye, right_eye, nose, upper_lip, lower_lip, chin = landmarks[[159, 386, 1, 13, 14, 152]]
    assert left_eye[0] < nose[0] < right_eye[0]  # subject's right eye (mesh 159) is on the image's left
    assert max(left_eye[1], right_eye[1]) < nose[1] < upper_lip[1] < lower_lip[1] < chin[1]
    # the refined iris centres (468, 473) lie near their eye centres
    assert np.linalg.norm(landmarks[468] - left_eye) < 10 and np.linalg.norm(landmarks[473] - right_eye) < 10
    # an independent model (mediapipe face detection) puts the face where the mesh's face oval is
    box = detect_faces(image).boxes[0]
    oval = landmarks[list(hallo_inputs.HALLO_SILHOUETTE_IDS)]
    ox0, oy0 = oval.min(0)
    ox1, oy1 = oval.max(0)
    inter = max(0, min(box[2], ox1) - max(box[0], ox0)) * max(0, min(box[3], oy1) - max(box[1], oy0))
    union = (box[2] - box[0]) * (box[3] - box[1]) + (ox1 - ox0) * (oy1 - oy0) - inter
    assert inter / union > 0.4


def test_landmarks_without_a_face_name_the_fix() -> None:
    with pytest.raises(EMOInputError, match="clearer frontal portrait"):
        hallo_face_landmarks(Image.new("RGB", (128, 96), (120, 120, 120)))


# ----------------------------------------------------------------------------------------------------------------
# Identity embedding (insightface)
# ----------------------------------------------------------------------------------------------------------------


def _fake_models_dir(tmp_path: Path) -> Path:
    models = tmp_path / "face_analysis" / "models"
    models.mkdir(parents=True)
    for name in HALLO_FACE_ANALYSIS_FILES:
        (models / name).write_bytes(b"")
    return tmp_path / "face_analysis"


def test_face_embedding_without_insightface_names_the_extra(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "insightface", None)  # import insightface -> ImportError
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(EMOInputError, match=r'pip install "emo-pipeline\[hallo\]".*face_embedding='):
        hallo_face_embedding(Image.new("RGB", (64, 64)), _fake_models_dir(tmp_path))


def test_face_embedding_names_missing_model_files(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(hallo_inputs, "_import_face_analysis", lambda: object)
    with pytest.raises(EMOInputError, match=r"does not exist.*scrfd_10g_bnkps\.onnx, glintr100\.onnx"):
        hallo_face_embedding(Image.new("RGB", (64, 64)), tmp_path / "nowhere")
    partial = tmp_path / "face_analysis" / "models"
    partial.mkdir(parents=True)
    (partial / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    with pytest.raises(EMOInputError, match=r"lacks them \(found \['scrfd_10g_bnkps\.onnx'\]\).*glintr100\.onnx"):
        hallo_face_embedding(Image.new("RGB", (64, 64)), tmp_path / "face_analysis")


def test_face_embedding_names_unloadable_model_files(tmp_path) -> None:
    """Real insightface + onnxruntime on zero-byte model files (what an interrupted download leaves)."""
    pytest.importorskip("insightface")
    pytest.importorskip("onnxruntime")
    folder = _fake_models_dir(tmp_path)
    with pytest.raises(EMOInputError, match=r"could not load the face analysis models.*download"):
        hallo_face_embedding(Image.new("RGB", (64, 64)), folder, providers=("CPUExecutionProvider",))


class _FakeFaceAnalysis:
    """Stands in for insightface's FaceAnalysis to test our handling of its answer (not its embedding)."""

    def __init__(self, faces: list[dict]):
        self.faces = faces
        self.images: list[np.ndarray] = []

    def get(self, image: np.ndarray) -> list[dict]:
        self.images.append(image)
        return self.faces


def test_face_embedding_without_a_face_says_hallo_would_use_zeros(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(hallo_inputs, "_import_face_analysis", lambda: object)
    monkeypatch.setattr(hallo_inputs, "_load_face_analysis", lambda *args: _FakeFaceAnalysis([]))
    with pytest.raises(EMOInputError, match="zero identity embedding.*face_embedding="):
        hallo_face_embedding(Image.new("RGB", (64, 64)), _fake_models_dir(tmp_path), providers=("CPU",))


def test_face_embedding_takes_the_largest_face_of_the_bgr_image(monkeypatch, tmp_path) -> None:
    small = {"bbox": np.array([0, 0, 10, 10]), "embedding": np.full(512, 1.0, np.float32)}
    large = {"bbox": np.array([5, 5, 40, 30]), "embedding": np.arange(512, dtype=np.float32)}
    analysis = _FakeFaceAnalysis([small, large])
    monkeypatch.setattr(hallo_inputs, "_import_face_analysis", lambda: object)
    monkeypatch.setattr(hallo_inputs, "_load_face_analysis", lambda *args: analysis)
    embedding = hallo_face_embedding(
        Image.new("RGB", (64, 48), (10, 20, 30)), _fake_models_dir(tmp_path), providers=()
    )
    assert embedding.shape == (1, 512) and embedding.dtype == torch.float32
    assert torch.equal(embedding[0], torch.arange(512, dtype=torch.float32))
    assert analysis.images[0].shape == (48, 64, 3) and analysis.images[0][0, 0].tolist() == [30, 20, 10]


@pytest.mark.skipif(
    not os.environ.get("HALLO_FACE_ANALYSIS_DIR"),
    reason="needs Hallo's face_analysis models (HALLO_FACE_ANALYSIS_DIR)",
)
def test_real_face_embedding() -> None:
    pytest.importorskip("insightface")
    image = Image.open(PORTRAIT).convert("RGB")
    embedding = hallo_face_embedding(image, os.environ["HALLO_FACE_ANALYSIS_DIR"])
    assert embedding.shape == (1, 512) and torch.isfinite(embedding).all() and embedding.norm() > 1
    mirrored = hallo_face_embedding(image.transpose(Image.FLIP_LEFT_RIGHT), os.environ["HALLO_FACE_ANALYSIS_DIR"])
    assert torch.nn.functional.cosine_similarity(embedding, mirrored).item() > 0.5  # same person


# ----------------------------------------------------------------------------------------------------------------
# Audio features
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wav2vec_golden():
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = GOLDENS / "wav2vec"
    model = Wav2Vec2Model.from_pretrained(folder / "model", local_files_only=True).eval()
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder / "model", local_files_only=True)
    meta = json.loads((folder / "metadata.json").read_text())
    return meta, load_file(folder / "wav2vec_golden.safetensors"), model, extractor


def test_audio_features_equal_hallo_wav2vec_model(wav2vec_golden) -> None:
    meta, golden, model, extractor = wav2vec_golden
    features, audio_length = hallo_audio_features(
        golden["waveform"].numpy(), model, extractor, fps=meta["fps"], clip_length=meta["clip_length"]
    )
    assert audio_length == meta["audio_length"] == 33
    assert features.shape == golden["audio_emb"].shape == (48, 4, 32)  # padded to 3 clips of 16
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, golden["audio_emb"], rtol=0, atol=WAV2VEC_TOLERANCE)


def test_audio_features_pad_then_interpolate_before_the_transformer(wav2vec_golden) -> None:
    """Hallo's intermediate steps: the normalised waveform zero-padded to whole clips enters the CNN, and the CNN
    features, linearly interpolated to the frame count, enter the feature projection (not the 50 Hz ones)."""
    _, golden, model, extractor = wav2vec_golden
    cnn_inputs, projection_inputs = [], []
    handles = [
        model.feature_extractor.register_forward_pre_hook(lambda module, args: cnn_inputs.append(args[0])),
        model.feature_projection.register_forward_pre_hook(lambda module, args: projection_inputs.append(args[0])),
    ]
    try:
        hallo_audio_features(golden["waveform"].numpy(), model, extractor)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(cnn_inputs[0], golden["input_values"], rtol=0, atol=1e-6)
    torch.testing.assert_close(projection_inputs[0], golden["interpolated_features"], rtol=0, atol=1e-6)
    assert golden["plain_hidden_states"].shape[1] == 94  # what the transformer would see without interpolation


def test_audio_windows_equal_hallo_process_audio_emb() -> None:
    inputs = load_file(GOLDENS / "inputs.safetensors")
    windows = hallo_audio_windows(inputs["audio_emb"])
    assert windows.shape == (32, 5, 4, 32)
    assert torch.equal(windows, inputs["audio_emb_windowed"])
    with pytest.raises(EMOInputError, match="odd"):
        hallo_audio_windows(inputs["audio_emb"], window=4)


def test_hallo2_segments_of_the_whole_track_equal_the_whole_track(wav2vec_golden) -> None:
    meta, golden, model, extractor = wav2vec_golden
    samples = golden["waveform"].numpy()
    whole = hallo_audio_features(samples, model, extractor)
    one_segment = hallo_audio_features(samples, model, extractor, segment_seconds=60.0)  # Hallo2's default
    assert one_segment[1] == whole[1] and torch.equal(one_segment[0], whole[0])


def test_hallo2_segments_are_processed_separately(wav2vec_golden) -> None:
    """Hallo2 (use_cut) normalises and encodes each segment alone and pads only the last one: same frame count as
    the whole track when segment_seconds * fps is whole, different features (no attention across the cut)."""
    _, golden, model, extractor = wav2vec_golden
    samples = golden["waveform"].numpy()  # 1.3 s: segments of 0.64 s -> 16 + 16 + 1 frames, the last padded to 16
    whole, whole_length = hallo_audio_features(samples, model, extractor)
    segmented, length = hallo_audio_features(samples, model, extractor, segment_seconds=0.64)
    assert length == whole_length == 33 and segmented.shape == whole.shape == (48, 4, 32)
    first, first_length = hallo_audio_features(samples[:10240], model, extractor)
    second, _ = hallo_audio_features(samples[10240:20480], model, extractor)
    assert first_length == 16
    assert torch.equal(segmented[:16], first) and torch.equal(segmented[16:32], second)
    assert (segmented[:32] - whole[:32]).abs().max() > 1e-2  # the cut changes the features


def test_hallo2_segments_are_encoded_only_when_the_clip_loop_asks(wav2vec_golden) -> None:
    """`iter_hallo_audio_features` knows T and audio_length up front and runs wav2vec2 one segment per chunk."""
    _, golden, model, extractor = wav2vec_golden
    samples = golden["waveform"].numpy()
    calls = []
    hook = model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        chunks, total, length = iter_hallo_audio_features(samples, model, extractor, segment_seconds=0.64)
        assert (total, length, len(calls)) == (48, 33, 0)
        first = next(chunks)
        assert first.shape == (16, 4, 32) and len(calls) == 1
        rest = list(chunks)
        assert len(calls) == 3 and sum(chunk.shape[0] for chunk in [first, *rest]) == total
    finally:
        hook.remove()
    segmented, _ = hallo_audio_features(samples, model, extractor, segment_seconds=0.64)
    assert torch.equal(torch.cat([first, *rest]), segmented)


def test_hallo2_pads_the_last_segment_to_whole_clips_over_all_segments(wav2vec_golden) -> None:
    """Hallo2's preprocess(padding=last, processed_length=frames before), kept with its two quirks: it tests the
    last segment's own frame count for divisibility, then pads the total to whole clips."""
    _, golden, model, extractor = wav2vec_golden
    samples = golden["waveform"].numpy()
    cases = [  # (samples, clip_length, audio_length, padded T); segments of 0.4 s = 10 frames
        (14400, 8, 23, 24),  # 10 + 10 + 3 frames: the last (3 % 8 != 0) gets 1 frame, 24 = 3 clips
        (8960, 8, 14, 16),  # 10 + 4: 2 frames
        (8960, 4, 14, 14),  # 10 + 4: the last (4 % 4 == 0) is not padded, although 14 is not whole clips
        (7680, 4, 12, 16),  # 10 + 2: 12 is whole clips, yet 2 % 4 != 0 pads a further clip of 4
    ]
    for num_samples, clip_length, audio_length, padded in cases:
        features, length = hallo_audio_features(
            samples[:num_samples], model, extractor, clip_length=clip_length, segment_seconds=0.4
        )
        assert (length, features.shape[0]) == (audio_length, padded), (num_samples, clip_length)


def test_audio_features_reject_bad_inputs(wav2vec_golden) -> None:
    _, golden, model, extractor = wav2vec_golden
    with pytest.raises(EMOInputError, match="1-D float"):
        hallo_audio_features(np.zeros((2, 100), np.float32), model, extractor)
    with pytest.raises(EMOInputError, match="expects 16000 Hz"):
        hallo_audio_features(golden["waveform"].numpy(), model, extractor, sample_rate=8000)
    with pytest.raises(EMOInputError, match="segment_seconds"):
        hallo_audio_features(golden["waveform"].numpy(), model, extractor, segment_seconds=0)
    model.train()
    try:
        with pytest.raises(EMOInputError, match=r"eval\(\)"):
            hallo_audio_features(golden["waveform"].numpy(), model, extractor)
    finally:
        model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Vocal separation (audio-separator)
# ----------------------------------------------------------------------------------------------------------------


def test_separate_vocals_names_the_missing_model_files(tmp_path) -> None:
    with pytest.raises(EMOInputError, match=r"lacks Kim_Vocal_2\.onnx, download_checks\.json, mdx_model_data\.json"):
        separate_vocals(np.zeros(1600, np.float32), 16000, tmp_path)
    for name in ("Kim_Vocal_2.onnx", "download_checks.json", "mdx_model_data.json"):
        (tmp_path / name).write_bytes(b"{}")
    with pytest.raises(EMOInputError, match=r"lacks vr_model_data\.json:"):
        separate_vocals(np.zeros(1600, np.float32), 16000, tmp_path)


def test_separate_vocals_without_audio_separator_names_the_extra(monkeypatch, tmp_path) -> None:
    for name in ("Kim_Vocal_2.onnx", *hallo_inputs.AUDIO_SEPARATOR_DATA_FILES):
        (tmp_path / name).write_bytes(b"{}")
    monkeypatch.setitem(sys.modules, "audio_separator", None)
    monkeypatch.setitem(sys.modules, "audio_separator.separator", None)
    with pytest.raises(EMOInputError, match=r'pip install "emo-pipeline\[hallo\]"'):
        separate_vocals(np.zeros(1600, np.float32), 16000, tmp_path)

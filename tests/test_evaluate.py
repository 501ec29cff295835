"""emo-evaluate end to end on synthetic talking-face videos with seeded metric weights (published file names, the
real loading code), its report in headless Chromium, LMD / PSNR / SSIM / FVD pre-processing and the bad inputs."""

from __future__ import annotations

import json
import shutil
import tempfile

import numpy as np
import pytest
import torch
from eval_fixtures import FRAMES, ProbeI3D, mouth_box, portrait, seeded_weights, shift_mouth, speech, write_video

from emo_pipeline.cli.evaluate import main
from emo_pipeline.errors import EMOInputError
from emo_pipeline.evaluation import face_metrics


@pytest.fixture(scope="module")
def face():
    image = portrait()
    return image, mouth_box(image)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return seeded_weights(tmp_path_factory.mktemp("metric-weights"))


@pytest.fixture(scope="module")
def video_sets(tmp_path_factory, face):
    """generated/: `talk` (mouth moved 4 px down, in sync), `noface` (no face, silent); reference/: the originals."""
    image, box = face
    root = tmp_path_factory.mktemp("videos")
    generated, reference = root / "generated", root / "reference"
    generated.mkdir()
    reference.mkdir()
    audio = speech(FRAMES / 25)
    talking = np.stack([shift_mouth(image, box, 2 + 2 * (i % 3)) for i in range(FRAMES)])
    truth = np.stack([shift_mouth(image, box, 2 * (i % 3)) for i in range(FRAMES)])
    write_video(generated / "talk.mp4", talking, audio)
    write_video(reference / "talk.mp4", truth, audio)
    noise = np.random.default_rng(0).integers(0, 60, (FRAMES, *image.shape), dtype=np.uint8)
    write_video(generated / "noface.mp4", noise, np.zeros_like(audio))
    write_video(reference / "noface.mp4", noise, np.zeros_like(audio))
    return generated, reference


def test_lmd_is_zero_for_a_video_against_itself_and_grows_with_a_shifted_mouth(face):
    image, box = face
    reference = face_metrics.MouthTracker().track([image] * 3)
    assert face_metrics.landmark_distance(reference, face_metrics.MouthTracker().track([image] * 3))[0] == 0.0
    distances = [
        face_metrics.landmark_distance(face_metrics.MouthTracker().track([shift_mouth(image, box, k)] * 3), reference)[
            0
        ]
        for k in (2, 4, 8)
    ]
    assert 0.5 < distances[0] < distances[1] < distances[2]


def test_lmd_is_measured_in_the_reference_frame_size(face):
    """A generated video at half the ground truth's resolution, same content: landmarks are expressed in the ground
    truth's pixels, so the distance stays small (in its own pixels it would be ~half the mouth's position)."""
    import cv2

    image, _ = face
    small = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
    size = (image.shape[1], image.shape[0])
    reference = face_metrics.MouthTracker(size).track([image] * 2)
    scaled = face_metrics.MouthTracker(size).track([small] * 2)
    assert face_metrics.landmark_distance(scaled, reference)[0] < 2.0
    unscaled = face_metrics.MouthTracker().track([small] * 2)
    assert face_metrics.landmark_distance(unscaled, reference)[0] > 20.0


def test_psnr_and_ssim_of_identical_and_shifted_frames(face):
    image, box = face
    assert face_metrics.ssim(image, image) == pytest.approx(1.0)
    assert face_metrics.psnr(image, image) > 300  # OpenCV's cap for identical frames
    moved = shift_mouth(image, box, 4)
    assert face_metrics.ssim(moved, image) < 0.999 and face_metrics.psnr(moved, image) < 50
    flipped = np.ascontiguousarray(image[..., ::-1])  # colour order matters: BGR against RGB is not a match
    assert face_metrics.psnr(flipped, image) < 30
    half = image[::2, ::2]  # a generated video at another size is resized to the ground truth's before comparing
    assert face_metrics.psnr(half, image) > 20 and face_metrics.ssim(half, image) > 0.6  # (would raise unresized)


def test_fvd_clips_are_16_frames_in_minus_one_to_one_with_i3d_flags():
    """The I3D input of common_metrics_on_video_quality: (B, 3, 16, 224, 224) RGB in [-1, 1], the shorter side scaled
    to 224 and centre-cropped, called with rescale=False, resize=False, return_features=True."""
    from emo_pipeline.evaluation.fvd import I3DFeatures, frames_to_i3d_clips

    frames = np.zeros((40, 32, 48, 3), np.uint8)
    frames[..., 0] = 255  # pure red
    frames[:, :, :6, 1] = 255  # a green band at the left edge: cropped away by the centre crop (48 -> 336 -> 224)
    clips = frames_to_i3d_clips(frames)
    assert clips.shape == (2, 3, 16, 224, 224)
    assert clips[:, 0].min() == 1.0 and clips[:, 1:].max() == -1.0
    features = I3DFeatures(torch.jit.script(ProbeI3D()))(frames)
    assert features.shape == (2, 15)
    np.testing.assert_array_equal(features[:, 8:11], [[0, 0, 1]] * 2)  # rescale, resize, return_features
    np.testing.assert_array_equal(features[:, 11:14], [[-1, 1, 16]] * 2)  # range and clip length
    assert features[0, 14] == 1.0  # channel 0 is red: RGB, not BGR
    with pytest.raises(EMOInputError, match="at least 16"):
        frames_to_i3d_clips(frames[:15])


def test_missing_weights_offline_name_the_file_and_where_to_get_it(tmp_path, monkeypatch):
    from emo_pipeline.evaluation.weights import resolve_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(EMOInputError, match=r"syncnet_v2\.model.*robots\.ox\.ac\.uk.*offline"):
        resolve_weights("syncnet", tmp_path)
    with pytest.raises(EMOInputError, match=r"glintr100\.onnx.*antelopev2\.zip.*NON-COMMERCIAL"):
        resolve_weights("arcface", tmp_path)
    cached = tmp_path / "hub" / "checkpoints" / "syncnet_v2.model"  # torch hub's cache is the second place looked
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_weights("syncnet", tmp_path) == cached
    (tmp_path / "syncnet_v2.model").write_bytes(b"x")  # the --weights folder comes first
    assert resolve_weights("syncnet", tmp_path) == tmp_path / "syncnet_v2.model"
    code = main(
        [
            "--generated",
            str(tmp_path),
            "--metrics",
            "sync",
            "--weights",
            str(tmp_path),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2


def test_generated_and_reference_sets_must_match(video_sets, tmp_path, capsys):
    generated, reference = video_sets
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(reference / "talk.mp4", partial / "talk.mp4")
    code = main(
        [
            "--generated",
            str(generated),
            "--reference",
            str(partial),
            "--metrics",
            "psnr",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "no reference for ['noface']" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()
    (tmp_path / "file").write_text("")
    assert main(["--generated", str(generated), "--metrics", "psnr,bogus", "--output", str(tmp_path / "o")]) == 2
    assert main(["--generated", str(generated), "--metrics", "psnr", "--output", str(tmp_path / "file")]) == 2
    assert "unknown bogus" in (err := capsys.readouterr().err) and "is a file, not a folder" in err


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        import os

        reason = "headless Chromium not installed: apt-get install -y chromium chromium-driver"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="emo-chromium-")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", f"--user-data-dir={profile}",
                     "--allow-file-access-from-files", "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options), profile


def test_emo_evaluate_writes_json_and_an_html_report_chromium_renders(video_sets, weights, tmp_path, capsys):
    generated, reference = video_sets
    output = tmp_path / "eval"
    code = main(
        ["--generated", str(generated), "--reference", str(reference), "--metrics", "fid,fvd,sync,lmd,psnr,ssim",
         "--weights", str(weights), "--fid-stride", "10", "--fid-dims", "64", "--output", str(output), "--no-progress"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((output / "results.json").read_text())
    aggregate = results["aggregate"]
    for key in ("fid", "fvd", "sync_c", "sync_d", "sync_offset", "lmd", "psnr", "ssim"):
        assert np.isfinite(aggregate[key]), key
    assert aggregate["fid"] > 0 and aggregate["fvd"] > 0
    videos = {v["name"]: v for v in results["videos"]}
    talk, noface = videos["talk"], videos["noface"]
    assert 0.5 < talk["lmd"] < 5 and talk["psnr"] < 60 and 0.5 < talk["ssim"] < 1
    assert set(talk["skipped"]) == set()
    assert aggregate["lmd_videos"] == 1 and aggregate["sync_c_videos"] == 1
    assert "silent" in noface["skipped"]["sync"] and "no face" in noface["skipped"]["lmd"]
    assert "lmd" not in noface and "sync_c" not in noface  # skipped, never a zero
    assert "noface: lmd: skipped: no face found in the ground-truth video" in printed
    assert results["weights"]["syncnet"].endswith("syncnet_v2.model")

    page, profile = _browser()
    try:
        from selenium.webdriver.common.by import By

        page.get((output / "report.html").as_uri())
        summary = page.find_element(By.ID, "summary").text
        for key in ("fid", "fvd", "sync_c", "sync_d", "lmd", "psnr", "ssim"):
            assert key in summary
        rows = page.find_elements(By.CSS_SELECTOR, "#videos-0 tr")
        assert [row.find_element(By.TAG_NAME, "th").text for row in rows[1:]] == ["noface", "talk"]
        plots = page.find_elements(By.CSS_SELECTOR, "img.plot")
        thumbs = page.find_elements(By.CSS_SELECTOR, "img.thumbs")
        assert len(plots) == 1 and len(thumbs) == 2  # curves only for the video with a face and speech
        for image in plots + thumbs:
            assert page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
        assert "skipped: the audio track is silent" in page.find_element(By.TAG_NAME, "body").text
    finally:
        page.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_model_mode_generates_with_each_checkpoint_then_compares_them_side_by_side(tmp_path):
    """--model A --model B --manifest M: each checkpoint generates the manifest's jobs (emo_pipeline.batch: resumable),
    then both sets are evaluated and reported side by side."""
    import importlib.resources
    import os

    from scipy.io import wavfile

    from emo_pipeline.media import VideoWriter

    wavfile.write(tmp_path / "a.wav", 16000, (speech(0.4) * 32767).astype(np.int16))
    portrait = importlib.resources.files("emo_pipeline") / "assets" / "portrait.png"
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(
        json.dumps({"image": str(portrait), "audio": "a.wav", "output": "clip.mp4", "steps": 1}) + "\n"
    )
    (tmp_path / "truth").mkdir()
    with VideoWriter(tmp_path / "truth" / "clip.mp4", fps=25) as writer:
        writer.write(np.full((10, 64, 64, 3), 128, np.uint8))
    output = tmp_path / "compare"
    argv = ["--model", "demo", "--model", "demo", "--manifest", str(manifest), "--reference", str(tmp_path / "truth"),
            "--metrics", "psnr,ssim", "--output", str(output), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    runs = json.loads((output / "results.json").read_text())["models"]
    assert [run["label"] for run in runs] == ["demo", "demo"]
    videos = [output / f"{index}_demo" / "videos" / "clip.mp4" for index in range(2)]
    assert all(v.is_file() for v in videos)
    for run in runs:
        assert 0 < run["aggregate"]["psnr"] < 60 and run["videos"][0]["frames"] == 10
    report = (output / "report.html").read_text()
    assert report.count("<th>demo</th>") == 2 and "psnr" in report
    stamps = [os.stat(v).st_mtime_ns for v in videos]
    assert main(argv) == 0  # resumed: finished videos are kept, not generated again
    assert [os.stat(v).st_mtime_ns for v in videos] == stamps


class _RecordingDetector:
    """insightface's SCRFD interface: `detect(bgr, max_num)` -> ((N, 5) boxes, (N, 5, 2) keypoints); no face in a
    black image."""

    def __init__(self):
        self.seen = []

    def detect(self, image, max_num=0):
        self.seen.append(image)
        if image.max() == 0:
            return np.zeros((0, 5)), np.zeros((0, 5, 2))
        return np.array([[10.0, 10.0, 50.0, 50.0, 0.9]]), np.arange(10, dtype=float).reshape(1, 5, 2)


class _MeanColourRecognizer:
    """ArcFaceONNX's interface: `get(bgr, face)` -> embedding (here the image's mean colour, in the order given)."""

    def __init__(self):
        self.faces = []

    def get(self, image, face):
        self.faces.append(face)
        return image.reshape(-1, 3).mean(0) + 1.0


def test_csim_feeds_insightface_bgr_frames_and_its_keypoints(face, tmp_path):
    """CSIM's wiring around insightface's models (not installed in CI; the networks themselves are not checked here):
    BGR frames to the detector and the recognizer, the detector's 5 keypoints to the recognizer's alignment, unit
    embeddings, frames without a face left out of the mean (NaN in the curve), no face at all a skip reason."""
    from emo_pipeline.evaluation.runner import Evaluator, VideoItem

    image, box = face
    evaluator = Evaluator(("psnr",))
    detector, recognizer = _RecordingDetector(), _MeanColourRecognizer()
    evaluator._identity = face_metrics.FaceIdentity(detector, recognizer)
    portrait = tmp_path / "portrait.png"
    from PIL import Image

    Image.fromarray(image).save(portrait)
    frames = np.stack([image, shift_mouth(image, box, 4), np.zeros_like(image)])
    record, curves = {}, {}
    evaluator._csim(VideoItem("v", "unused.mp4", portrait=str(portrait)), frames, None, 25.0, record, curves)
    np.testing.assert_array_equal(detector.seen[0], image[..., ::-1])  # BGR, as insightface expects
    np.testing.assert_array_equal(recognizer.faces[0].kps, np.arange(10).reshape(5, 2))
    assert curves["csim"][0] == pytest.approx(1.0) and 0.99 < curves["csim"][1] <= 1.0 and curves["csim"][2] is None
    assert record["csim"] == pytest.approx(np.mean(curves["csim"][:2]))
    with pytest.raises(EMOInputError, match="no face found in any generated frame"):
        evaluator._csim(VideoItem("v", "unused.mp4", portrait=str(portrait)), frames[2:], None, 25.0, {}, {})

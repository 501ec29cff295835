"""Tests of emo-preprocess (emo_pipeline.data): synthetic source videos with a known head motion -> clip folders,
manifest, failures, statistics; resume after a kill; the CLI; the scene-cut, clip-splitting, face-check, crop and
speed-bucket rules."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.numpy import load_file

from emo_pipeline.audio import extract_audio_features, load_audio
from emo_pipeline.cli.preprocess import main as cli_main
from emo_pipeline.data.clips import check_face_track, crop_frames, crop_region
from emo_pipeline.data.preprocess import FAILURE_REASONS, preprocess_videos, process_video, video_key
from emo_pipeline.data.scenes import SceneCutDetector, split_scene
from emo_pipeline.data.stats import suggest_speed_buckets
from emo_pipeline.data.synthetic import write_synthetic_video
from emo_pipeline.errors import EMOInputError
from emo_pipeline.face import crop_to_face
from emo_pipeline.media import read_video_frames, read_video_info
from emo_pipeline.models.speed import DEFAULT_SPEED_CENTERS, DEFAULT_SPEED_RADII, SpeedEncoder
from emo_pipeline.testing import tiny_wav2vec2


def _manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def _failures(root: Path) -> dict[str, dict]:
    return {row["video"]: row for row in map(json.loads, (root / "failures.jsonl").read_text().splitlines())}


def _cli_args(sources: Path, output: Path, encoder: str) -> list[str]:
    return [
        os.fspath(sources),
        os.fspath(output),
        "--audio-encoder",
        encoder,
        "--size",
        "64",
        "--min-seconds",
        "1",
        "--max-seconds",
        "2",
        "--min-face",
        "20",
        "--no-progress",
    ]  # the options of conftest.PREPROCESS_TEST_OPTIONS


# ----------------------------------------------------------------------------------------------------------------
# The synthetic dataset
# ----------------------------------------------------------------------------------------------------------------


def test_manifest_rows_of_the_synthetic_video(preprocessed_dataset, synthetic_sources):
    root, summary = preprocessed_dataset
    rows = _manifest(root)
    # Two 3 s shots, 1-2 s clips: each shot gives a 2 s and a 1 s clip; no clip spans the cut at 3 s.
    assert [(row["start"], row["end"], row["num_frames"]) for row in rows] == [
        (0.0, 2.0, 50),
        (2.0, 3.0, 25),
        (3.0, 5.0, 50),
        (5.0, 6.0, 25),
    ]
    key = video_key("talk.mp4")
    assert [row["clip_id"] for row in rows] == [f"{key}-{i:04d}" for i in range(4)]
    assert summary.clips == 4 and summary.videos == 5 and summary.processed == 5 and summary.skipped == 0
    for row in rows:
        assert row["source"] == "talk.mp4" and row["fps"] == 25.0 and row["size"] == 64
        assert row["duration"] == pytest.approx(row["num_frames"] / 25) == pytest.approx(row["end"] - row["start"])
        assert row["path"] == f"clips/{row['clip_id']}" and row["feature_shape"] == [row["num_frames"], 2, 32]
        clip = root / row["path"]
        assert sorted(p.name for p in clip.iterdir()) == [
            "annotations.safetensors",
            "audio.wav",
            "features.safetensors",
            "frames.mp4",
            "meta.json",
        ]
        assert json.loads((clip / "meta.json").read_text()) == row
        info = read_video_info(clip / "frames.mp4")
        assert (info.width, info.height, info.num_frames, info.fps) == (64, 64, row["num_frames"], 25.0)

        frames = row["num_frames"]
        annotations = load_file(clip / "annotations.safetensors")
        assert {k: (v.shape, v.dtype) for k, v in annotations.items()} == {
            "face_boxes": ((frames, 4), np.float32),
            "face_missing": ((frames,), np.uint8),
            "mask": ((64, 64), np.uint8),
            "poses": ((frames, 3), np.float32),
            "pose_missing": ((frames,), np.uint8),
            "speed": ((frames,), np.float32),
        }
        boxes, mask, speed = annotations["face_boxes"], annotations["mask"], annotations["speed"]
        # The crop is 2.5x the union box: every box lies inside it, and the mask is their union.
        assert boxes.min() > 0 and boxes.max() < 64 and set(np.unique(mask)) == {0, 1}
        x0, y0 = np.floor(boxes[:, :2].min(axis=0)).astype(int)
        x1, y1 = np.ceil(boxes[:, 2:].max(axis=0)).astype(int)
        assert mask[y0:y1, x0:x1].mean() > 0.9 and mask.sum() <= (x1 - x0) * (y1 - y0)
        assert row["speed_mean"] == pytest.approx(speed.mean(), abs=1e-6)
        assert row["speed_max"] == pytest.approx(speed.max(), abs=1e-6)
        assert row["speed_p90"] == pytest.approx(np.percentile(speed, 90), abs=1e-6)

        # Features: exactly the inference function on the clip's own audio.wav (16 kHz mono, F frames of audio).
        audio = load_audio(clip / "audio.wav")
        assert audio.size == frames * 640
        with safe_open(clip / "features.safetensors", framework="pt") as handle:
            features = handle.get_tensor("audio_features")
        assert features.dtype == torch.float32 and features.shape == (frames, 2, 32)
        model, extractor = tiny_wav2vec2()
        expected = extract_audio_features(audio, model, extractor, fps=25, num_frames=frames)
        torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_head_speed_tracks_the_synthetic_motion(preprocessed_dataset, synthetic_sources):
    """The head rolls at 0.3 rad/s in the first shot and 0.8 rad/s in the second: the per-shot median of the
    measured speed (face mesh on the 64 px crops) is within 25% of the truth (measured: +15% and +6%; pose noise
    only ever adds speed, which shows most at slow speeds)."""
    root, _ = preprocessed_dataset
    _, truth = synthetic_sources
    speeds = {0: [], 1: []}
    for row in _manifest(root):
        speeds[int(row["start"] >= 3.0)].append(load_file(root / row["path"] / "annotations.safetensors")["speed"])
    for shot, true_speed in ((0, 0.3), (1, 0.8)):
        measured = np.median(np.concatenate(speeds[shot]))
        assert abs(measured - true_speed) < 0.25 * true_speed, (shot, measured)
    assert np.median(truth.speed[75:]) == pytest.approx(0.8)


def test_bad_videos_are_listed_with_their_reason(preprocessed_dataset):
    root, summary = preprocessed_dataset
    failures = _failures(root)
    assert {video: row["reason"] for video, row in failures.items()} == {
        "corrupt.mp4": "unreadable",
        "silent.mp4": "no_audio",
        "noface.mp4": "no_face",
        "two_faces.mp4": "multiple_faces",
    }
    assert failures["noface.mp4"]["rejected"] == {"no_face": 1} and failures["noface.mp4"]["clips"] == 0
    assert "no audio stream" in failures["silent.mp4"]["message"]
    assert summary.failed == 4 and summary.failures == {
        "multiple_faces": 1,
        "no_audio": 1,
        "no_face": 1,
        "unreadable": 1,
    }
    assert {failures[v]["reason"] for v in failures} <= set(FAILURE_REASONS) | {"no_face", "multiple_faces"}

    stats = json.loads((root / "stats.json").read_text())
    assert stats["clips"] == 4 and stats["frames"] == 150 and stats["hours"] == pytest.approx(6 / 3600)
    assert stats["videos"] == 5 and stats["videos_with_clips"] == 1 and stats["videos_failed"] == 4
    assert stats["rejected_clips"] == {"multiple_faces": 1, "no_face": 1}
    assert sum(stats["speed"]["histogram"]["counts"]) == 150
    # The suggested buckets are a valid SpeedEncoder config (the YAML the training config includes).
    buckets = OmegaConf.load(root / "speed_buckets.yaml")
    config = OmegaConf.to_container(buckets.speed_encoder_config)
    assert config == stats["speed_buckets"] and len(config["centers"]) >= 5
    SpeedEncoder(centers=tuple(config["centers"]), radii=tuple(config["radii"]))


def test_kill_after_the_first_clip_then_resume_gives_the_same_manifest(
    tmp_path, preprocessed_dataset, synthetic_sources, tiny_audio_encoder_dir
):
    """SIGKILL the CLI (one process) as soon as its first clip folder is committed; the re-run finishes the job and
    its manifest equals the uninterrupted 2-worker run's byte for byte."""
    reference, _ = preprocessed_dataset
    output = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "emo_pipeline.cli.preprocess",
        *_cli_args(synthetic_sources[0], output, tiny_audio_encoder_dir),
        "--workers",
        "1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clips = output / "clips"
    deadline = time.monotonic() + 120
    committed: list[str] = []
    while not committed and time.monotonic() < deadline and process.poll() is None:
        committed = [p.name for p in clips.iterdir() if not p.name.startswith(".")] if clips.is_dir() else []
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = [p.name for p in clips.iterdir() if not p.name.startswith(".")]
    assert 1 <= len(done) < 4  # killed part-way

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "4 clips" in resumed.stdout and "4 failed" in resumed.stdout
    assert (output / "manifest.jsonl").read_bytes() == (reference / "manifest.jsonl").read_bytes()
    assert (output / "failures.jsonl").read_bytes() == (reference / "failures.jsonl").read_bytes()
    rows = _manifest(output)
    assert len({row["clip_id"] for row in rows}) == len(rows) == 4
    assert not [p for p in clips.iterdir() if p.name.startswith(".")]  # no partial clip left behind


def test_rerun_skips_finished_videos_and_retries_failures_only_when_asked(
    tmp_path, preprocessed_dataset, synthetic_sources, tiny_audio_encoder_dir, preprocess_options
):
    root = tmp_path / "copy"
    shutil.copytree(preprocessed_dataset[0], root)
    manifest = (root / "manifest.jsonl").read_bytes()
    options = {**preprocess_options, "audio_encoder": tiny_audio_encoder_dir, "progress": False}
    again = preprocess_videos(synthetic_sources[0], root, **options)
    assert (again.processed, again.skipped, again.clips, again.failed) == (0, 5, 4, 4)
    retried = preprocess_videos(synthetic_sources[0], root, retry_failed=True, **options)
    assert (retried.processed, retried.skipped, retried.clips, retried.failed) == (4, 1, 4, 4)
    assert (root / "manifest.jsonl").read_bytes() == manifest

    # Other settings on the same folder are refused (exit 2 from the CLI), naming the difference.
    with pytest.raises(EMOInputError, match=r"other settings \(size: 64 there, 128 now\)"):
        preprocess_videos(synthetic_sources[0], root, **{**options, "size": 128})
    assert cli_main([*_cli_args(synthetic_sources[0], root, tiny_audio_encoder_dir), "--fps", "30"]) == 2


def test_cli_bad_arguments_exit_2(tmp_path, capsys, tiny_audio_encoder_dir):
    assert cli_main([os.fspath(tmp_path / "missing"), os.fspath(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main([os.fspath(tmp_path / "empty"), os.fspath(tmp_path / "out")]) == 2
    assert "no videos" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    write_synthetic_video(tmp_path / "in" / "a.mp4", shots=((0.5, 0.0),))
    args = [os.fspath(tmp_path / "in"), os.fspath(tmp_path / "out2"), "--audio-encoder", tiny_audio_encoder_dir]
    assert cli_main([*args, "--size", "63"]) == 2
    assert "size must be an even int" in capsys.readouterr().err
    assert cli_main([*args, "--min-seconds", "5", "--max-seconds", "2"]) == 2
    assert cli_main([*args, "--audio-encoder", os.fspath(tmp_path / "nowhere")]) == 2
    assert "cannot load the audio encoder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: unknown option
        cli_main([*args, "--bogus"])
    assert exit_info.value.code == 2
    # A 0.5 s video: too short, listed as such, exit 0.
    assert cli_main([*args, "--no-progress"]) == 0
    assert _failures(tmp_path / "out2")["a.mp4"]["reason"] == "too_short"


def test_without_frame_cache_and_with_fp16_features_the_clips_are_the_same(
    tmp_path, preprocessed_dataset, synthetic_sources, tiny_audio_encoder_dir, preprocess_options
):
    """frame_cache_mb=0 decodes every clip's frames a second time, by index: same crops, same rows. fp16
    features are the fp32 ones rounded."""
    from emo_pipeline.data.preprocess import PreprocessConfig

    reference, _ = preprocessed_dataset
    config = PreprocessConfig(
        **preprocess_options, audio_encoder=tiny_audio_encoder_dir, features_fp16=True, frame_cache_mb=0
    )
    (tmp_path / "clips").mkdir()
    encoder = tiny_wav2vec2()
    result = process_video(synthetic_sources[0] / "talk.mp4", "talk.mp4", tmp_path, config, encoder)
    assert result.status == "done" and len(result.clips) == 4 and result.timings["clips"] > 0
    for row, expected in zip(sorted(result.clips, key=lambda r: r["start"]), _manifest(reference)):
        assert row == expected
        # Face mesh ran on the crops before encoding: identical poses mean identical crops. (Multithreaded
        # libx264 is not bit-reproducible from run to run, so the mp4s themselves agree only up to coding noise.)
        ours, theirs = (load_file(d / row["path"] / "annotations.safetensors") for d in (tmp_path, reference))
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
        decoded = [read_video_frames(d / row["path"] / "frames.mp4").astype(np.float64) for d in (tmp_path, reference)]
        assert 10 * np.log10(255**2 / np.mean((decoded[0] - decoded[1]) ** 2 + 1e-12)) > 30  # PSNR in dB
        half = load_file(tmp_path / row["path"] / "features.safetensors")["audio_features"]
        full = load_file(reference / row["path"] / "features.safetensors")["audio_features"]
        assert half.dtype == np.float16
        np.testing.assert_allclose(half.astype(np.float32), full, rtol=1e-3, atol=1e-3)


def test_30fps_source_is_resampled_to_25fps(tmp_path, preprocess_options):
    from emo_pipeline.data.preprocess import PreprocessConfig

    write_synthetic_video(tmp_path / "v30.mp4", shots=((2.4, 0.5),), fps=30, size=(192, 144))
    config = PreprocessConfig(**{**preprocess_options, "max_seconds": 3.0}, audio_encoder=None)
    (tmp_path / "out" / "clips").mkdir(parents=True)
    result = process_video(tmp_path / "v30.mp4", "v30.mp4", tmp_path / "out", config)
    assert result.status == "done" and result.frames == 60  # 2.4 s at 25 fps
    (row,) = result.clips
    assert row["num_frames"] == 60 and row["source_fps"] == 30.0 and row["source_size"] == [192, 144]
    assert row["feature_shape"] is None and not (tmp_path / "out" / row["path"] / "features.safetensors").exists()
    assert read_video_info(tmp_path / "out" / row["path"] / "frames.mp4").num_frames == 60


# ----------------------------------------------------------------------------------------------------------------
# The rules, on their own
# ----------------------------------------------------------------------------------------------------------------


def test_split_scene_rule():
    assert split_scene(10, 25, 50) == []  # shorter than a clip
    assert split_scene(40, 25, 50) == [(0, 40)]
    assert split_scene(75, 25, 50) == [(0, 50), (50, 75)]  # max + min: a full clip and a minimal one
    assert split_scene(60, 25, 50) == [(0, 30), (30, 60)]  # > max but < max + min: two halves
    assert split_scene(60, 40, 50) == [(0, 50)]  # halves too short: one full clip, the rest dropped
    assert split_scene(170, 25, 50) == [(0, 50), (50, 100), (100, 135), (135, 170)]
    for length in range(1, 400):
        clips = split_scene(length, 75, 300)
        assert all(75 <= end - start <= 300 for start, end in clips)
        assert all(a[1] == b[0] for a, b in zip(clips, clips[1:]))
        assert length - (clips[-1][1] if clips else 0) < 75  # at most min_frames - 1 frames are dropped


def test_scene_cut_detector_finds_the_hard_cut_only(tmp_path):
    video = write_synthetic_video(tmp_path / "cuts.mp4", shots=((1.0, 0.8), (1.0, 0.3), (1.0, 0.0)), size=96)
    detector = SceneCutDetector()
    cuts = [i for i, frame in enumerate(read_video_frames(video.path)) if detector.update(frame)]
    assert cuts == video.shot_starts[1:] == [25, 50]
    within = np.delete(np.asarray(detector.distances), [24, 49])
    assert within.max() < 0.1  # a moving, turning head stays far below the threshold
    noise = np.random.default_rng(0).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    assert not any(SceneCutDetector().update(frame) for frame in noise)  # noise has a steady histogram


def test_face_track_checks_each_reason():
    face = np.array([[40.0, 40.0, 80.0, 80.0]])
    steady = [face + [i, 0, i, 0] for i in range(20)]
    track = check_face_track(steady, min_face=30, max_jump=0.25, max_bad_frame_fraction=0.1)
    assert track.reason is None and track.boxes.shape == (20, 4) and not track.missing.any()

    one_missing = [*steady[:10], np.zeros((0, 4)), *steady[11:]]
    track = check_face_track(one_missing, 30, 0.25, 0.1)
    assert track.reason is None and track.missing[10] and track.boxes[10, 0] == pytest.approx(50.0)  # interpolated
    assert check_face_track(one_missing, 30, 0.25, 0.0).reason == "no_face"
    assert check_face_track([np.zeros((0, 4))] * 5, 30, 0.25, 0.1).reason == "no_face"
    two = [np.concatenate([b, b + 100]) for b in steady]
    assert check_face_track(two, 30, 0.25, 0.1).reason == "multiple_faces"
    assert check_face_track(steady, 41, 0.25, 0.1).reason == "face_too_small"
    jump = [*steady[:10], *[b + [30, 0, 30, 0] for b in steady[10:]]]  # 0.75 face sizes in one frame
    track = check_face_track(jump, 30, 0.25, 0.1)
    assert track.reason == "face_jump" and "frame 10" in track.detail
    grow = [*steady[:10], *[b * [1, 1, 1.5, 1.5] for b in steady[10:]]]
    assert check_face_track(grow, 30, 0.25, 0.1).reason == "face_jump"


def test_crop_matches_the_inference_portrait_crop():
    """The clip crop uses crop_to_face's placement: same square, same face box in crop pixels."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    for box in ([60.0, 30.0, 100.0, 78.0], [2.0, 2.0, 40.0, 50.0], [150.0, 60.0, 199.0, 119.0], [10, 10, 90, 100]):
        region = crop_region(box, 2.5, 200, 120)
        crop = crop_frames(image[None], region, 64)[0]
        expected, box_in_crop = crop_to_face(image, box, size=64, face_scale=2.5)
        left, top, side = region
        scale = 64 / side
        np.testing.assert_allclose(
            [(box[0] - left) * scale, (box[1] - top) * scale, (box[2] - left) * scale, (box[3] - top) * scale],
            box_in_crop,
            atol=1e-4,
        )
        # Same pixels up to the resampling filter (area/Lanczos in OpenCV vs Lanczos in PIL).
        assert np.abs(crop.astype(float) - np.asarray(expected, float)).mean() < 25


def test_speed_bucket_rule():
    # Radius = gap to the nearest centre: the rule behind the package's default buckets.
    centers = np.asarray(DEFAULT_SPEED_CENTERS)
    gaps = np.diff(centers)
    np.testing.assert_allclose(np.minimum(np.r_[gaps[0], gaps], np.r_[gaps, gaps[-1]]), DEFAULT_SPEED_RADII)
    speeds = np.random.default_rng(0).exponential(0.4, 100_000)
    centers, radii = suggest_speed_buckets(speeds, num_buckets=9)
    np.testing.assert_allclose(centers, np.round(np.quantile(speeds, (np.arange(9) + 0.5) / 9), 4))
    assert len(radii) == 9 and radii[0] == pytest.approx(centers[1] - centers[0], abs=2e-4)
    assert suggest_speed_buckets(np.zeros(50)) == ([0.0], [0.1])  # a still dataset: one bucket
    assert suggest_speed_buckets(np.zeros(0)) == (list(DEFAULT_SPEED_CENTERS), list(DEFAULT_SPEED_RADII))

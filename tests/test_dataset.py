"""Tests of TalkingHeadDataset on the shared synthetic emo-preprocess dataset (tests/conftest.py): the documented
shapes and dtypes per stage, contiguous motion + target frames, audio windows and speeds aligned with the clip,
deterministic sampling, skipping of short clips."""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

from emo_pipeline.audio import window_audio_features
from emo_pipeline.data import TalkingHeadDataset
from emo_pipeline.errors import EMOInputError
from emo_pipeline.media import read_video_frames


def _clip_frames(root, row) -> torch.Tensor:
    """All frames of a clip as the dataset returns them: (F, 3, H, W) float32 in [-1, 1]."""
    pixels = read_video_frames(root / row["path"] / "frames.mp4")
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_stage1_samples(preprocessed_dataset):
    root, _ = preprocessed_dataset
    dataset = TalkingHeadDataset(root, stage=1, seed=0)
    assert len(dataset) == 4 and dataset.num_skipped == 0
    for index in range(len(dataset)):
        sample = dataset[index]
        assert {k: (tuple(v.shape), v.dtype) for k, v in sample.items()} == {
            "reference": ((3, 64, 64), torch.float32),
            "target": ((3, 64, 64), torch.float32),
            "face_mask": ((1, 64, 64), torch.float32),
            "clip_index": ((), torch.int64),
        }
        assert sample["clip_index"] == index
        assert sample["reference"].min() >= -1 and sample["reference"].max() <= 1
        assert set(sample["face_mask"].unique().tolist()) == {0.0, 1.0}
        # Two different frames of that clip.
        frames = _clip_frames(root, dataset.clips[index])
        matches = [int(torch.argmin((frames - sample[k]).abs().flatten(1).mean(1))) for k in ("reference", "target")]
        assert matches[0] != matches[1]
        torch.testing.assert_close(sample["target"], frames[matches[1]])
        mask = load_file(root / dataset.clips[index]["path"] / "annotations.safetensors")["mask"]
        torch.testing.assert_close(sample["face_mask"][0], torch.from_numpy(mask).float())


@pytest.mark.parametrize("stage", [2, 3])
def test_stage2_and_3_samples_are_contiguous_and_aligned(preprocessed_dataset, stage):
    root, _ = preprocessed_dataset
    n, f, m = 4, 12, 2
    dataset = TalkingHeadDataset(root, stage=stage, num_frames=f, num_motion_frames=n, audio_window=m, seed=3)
    assert len(dataset) == 4 and dataset.num_skipped == 0  # clips of 25 and 50 frames >= n + f = 16
    for index in range(len(dataset)):
        sample = dataset[index]
        assert {k: (tuple(v.shape), v.dtype) for k, v in sample.items()} == {
            "reference": ((3, 64, 64), torch.float32),
            "motion_frames": ((n, 3, 64, 64), torch.float32),
            "frames": ((f, 3, 64, 64), torch.float32),
            "audio_features": ((f, 2 * m + 1, 2, 32), torch.float32),
            "face_mask": ((1, 64, 64), torch.float32),
            "speed": ((f,), torch.float32),
            "clip_index": ((), torch.int64),
        }
        row = dataset.clips[int(sample["clip_index"])]
        frames = _clip_frames(root, row)
        window = torch.cat([sample["motion_frames"], sample["frames"]])
        starts = [s for s in range(row["num_frames"] - n - f + 1) if torch.equal(frames[s : s + n + f], window)]
        assert len(starts) == 1, "motion + target frames must be n + f consecutive frames of the clip"
        first_target = starts[0] + n
        # The reference is a frame of the clip outside the targets.
        reference = int(torch.argmin((frames - sample["reference"]).abs().flatten(1).mean(1)))
        assert not first_target <= reference < first_target + f
        # Audio windows: the clip's features windowed as a whole, then sliced (edge padding only at clip ends).
        features = load_torch(root / row["path"] / "features.safetensors")["audio_features"]
        expected = window_audio_features(features, m)[first_target : first_target + f]
        torch.testing.assert_close(sample["audio_features"], expected, rtol=0, atol=0)
        speed = load_file(root / row["path"] / "annotations.safetensors")["speed"]
        np.testing.assert_array_equal(sample["speed"].numpy(), speed[first_target : first_target + f])


def test_windows_at_the_clip_ends_are_edge_padded(preprocessed_dataset):
    """With n + f = the clip length, the targets run to the clip's last frame: its windows repeat that frame."""
    root, _ = preprocessed_dataset
    dataset = TalkingHeadDataset(root, stage=2, num_frames=21, num_motion_frames=4, audio_window=2)
    assert dataset.num_skipped == 0
    sample = dataset[1]  # a 25-frame clip: motion frames 0-3, targets 4-24
    assert int(sample["clip_index"]) == 1 and dataset.clips[1]["num_frames"] == 25
    features = load_torch(root / dataset.clips[1]["path"] / "features.safetensors")["audio_features"]
    last = sample["audio_features"][-1]
    for offset in range(5):
        torch.testing.assert_close(last[offset], features[min(24, 22 + offset)], rtol=0, atol=0)
    torch.testing.assert_close(sample["audio_features"][0, 0], features[2], rtol=0, atol=0)  # 4 - 2: real context


def test_sampling_is_deterministic_and_set_epoch_changes_it(preprocessed_dataset):
    root, _ = preprocessed_dataset

    def draw(dataset, index):
        return dataset[index]["frames"]

    a = TalkingHeadDataset(root, stage=2, num_frames=8, num_motion_frames=2, seed=7, samples_per_clip=3)
    b = TalkingHeadDataset(root, stage=2, num_frames=8, num_motion_frames=2, seed=7, samples_per_clip=3)
    assert len(a) == 12 and int(a[5]["clip_index"]) == 1
    for index in (0, 4, 11):
        assert torch.equal(draw(a, index), draw(b, index))
    a.set_epoch(1)
    assert any(not torch.equal(draw(a, i), draw(b, i)) for i in range(len(a)))
    b.set_epoch(1)
    assert all(torch.equal(draw(a, i), draw(b, i)) for i in (0, 4, 11))  # the same epoch, the same samples
    c = TalkingHeadDataset(root, stage=2, num_frames=8, num_motion_frames=2, seed=8, samples_per_clip=3)
    c.set_epoch(1)
    assert any(not torch.equal(draw(a, i), draw(c, i)) for i in range(len(a)))
    assert torch.equal(a[-1]["frames"], a[len(a) - 1]["frames"])
    with pytest.raises(IndexError):
        a[len(a)]


def test_short_clips_are_skipped_with_a_count(preprocessed_dataset, caplog):
    root, _ = preprocessed_dataset
    with caplog.at_level(logging.WARNING, logger="emo_pipeline.data.dataset"):
        dataset = TalkingHeadDataset(root, stage=2, num_frames=40, num_motion_frames=4)
    assert dataset.num_skipped == 2 and len(dataset) == 2  # the two 25-frame clips are shorter than 44
    assert "2 of 4 clips have fewer than 44 frames" in caplog.text
    assert all(row["num_frames"] == 50 for row in dataset.clips)
    assert dataset[0]["frames"].shape == (40, 3, 64, 64)
    assert TalkingHeadDataset(root, stage=3, num_frames=51, num_motion_frames=0).num_skipped == 4


def test_resize_no_motion_frames_and_dataloader_batches(preprocessed_dataset):
    root, _ = preprocessed_dataset
    dataset = TalkingHeadDataset(root, stage=3, num_frames=4, num_motion_frames=0, audio_window=1, size=32)
    sample = dataset[0]
    assert sample["motion_frames"].shape == (0, 3, 32, 32) and sample["frames"].shape == (4, 3, 32, 32)
    assert sample["reference"].shape == (3, 32, 32) and sample["face_mask"].shape == (1, 32, 32)
    assert sample["audio_features"].shape == (4, 3, 2, 32)
    assert set(sample["face_mask"].unique().tolist()) == {0.0, 1.0}
    assert sample["frames"].min() >= -1 and sample["frames"].max() <= 1
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=False)))
    assert batch["frames"].shape == (2, 4, 3, 32, 32) and batch["speed"].shape == (2, 4)
    assert batch["clip_index"].tolist() == [0, 1]


def test_bad_arguments_and_datasets(tmp_path, preprocessed_dataset):
    root, _ = preprocessed_dataset
    with pytest.raises(EMOInputError, match="stage must be 1, 2 or 3"):
        TalkingHeadDataset(root, stage=4)
    with pytest.raises(EMOInputError, match="num_frames must be an int >= 1"):
        TalkingHeadDataset(root, stage=2, num_frames=0)
    with pytest.raises(EMOInputError, match="has no manifest.jsonl"):
        TalkingHeadDataset(tmp_path, stage=1)
    # A dataset made without an audio encoder serves stage 1 but not stages 2/3.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    row = json.loads((copy / "manifest.jsonl").read_text().splitlines()[0])
    (copy / row["path"] / "features.safetensors").unlink()
    assert len(TalkingHeadDataset(copy, stage=1)) == 4
    with pytest.raises(EMOInputError, match="stage 2 needs audio features"):
        TalkingHeadDataset(copy, stage=2)

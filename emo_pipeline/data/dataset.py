"""`TalkingHeadDataset`: training samples for EMO's three stages from an `emo-preprocess` dataset.

EMO (Tian et al. 2024, arXiv 2402.17485, Sec. 3.3) trains in three stages:

* stage 1 (image pre-training): a reference frame and a target frame of the same clip, and the face mask;
* stage 2 (video training) and stage 3 (speed training): a reference frame, `n` motion frames immediately followed
  by `f` target frames, the target frames' audio feature windows (`2m+1` frames each), the face mask and the
  target frames' head rotation speed.

Frames are read with decord, only those a sample needs. Sampling is deterministic: sample `index` of epoch `e` uses
`numpy.random.default_rng((seed, e, index))`, so a run is reproducible and can resume mid-epoch, and `set_epoch`
varies the samples from epoch to epoch (call it at the start of each epoch, as with `DistributedSampler`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from emo_pipeline.data.clips import ANNOTATIONS_FILE, FEATURES_FILE, FEATURES_KEY, FRAMES_FILE
from emo_pipeline.errors import EMOInputError

__all__ = ["TalkingHeadDataset"]

logger = logging.getLogger(__name__)


class TalkingHeadDataset(Dataset):
    """Samples of an `emo-preprocess` dataset for EMO training stage 1, 2 or 3.

    Args:
        root: the dataset folder (with `manifest.jsonl`).
        stage: 1 (reference + one target frame) or 2/3 (reference + motion frames + target frames + audio).
        num_frames: `f`, target frames per sample (stages 2/3).
        num_motion_frames: `n`, motion frames before the targets (stages 2/3; may be 0).
        audio_window: `m`, audio frames on each side of a target frame (window of `2m+1`).
        size: output side in pixels; None keeps the dataset's size. Frames are resized with antialiased bilinear
            interpolation, the mask with nearest neighbour.
        seed: base seed of the sampling.
        samples_per_clip: samples drawn from each clip per epoch (`len` = usable clips x this).

    `__getitem__` returns a dict of tensors (frames in [-1, 1], RGB, channels first):

    * stage 1: `reference (3, H, W)` and `target (3, H, W)` float32, two different random frames of a clip;
      `face_mask (1, H, W)` float32 in {0, 1}; `clip_index ()` int64.
    * stages 2/3: `reference (3, H, W)`, a random frame of the clip outside the target frames;
      `motion_frames (n, 3, H, W)` and `frames (f, 3, H, W)`, contiguous (the motion frames are the `n` frames just
      before the targets); `audio_features (f, 2m+1, L, D)` float32, the clip's wav2vec2 features windowed with
      `emo_pipeline.audio.window_audio_features` over the whole clip (edge padding only at the clip's ends);
      `face_mask (1, H, W)`; `speed (f,)` float32 rad/s; `clip_index ()` int64 (index into `clips`).

    Clips too short for a sample (fewer than `n + f` frames in stages 2/3, fewer than 2 in stage 1) are left out;
    `num_skipped` counts them and a warning is logged.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        stage: int,
        num_frames: int = 12,
        num_motion_frames: int = 4,
        audio_window: int = 2,
        size: int | None = None,
        seed: int = 0,
        samples_per_clip: int = 1,
    ) -> None:
        if stage not in (1, 2, 3):
            raise EMOInputError(f"stage must be 1, 2 or 3, got {stage!r}")
        for name, value, low in (
            ("num_frames", num_frames, 1),
            ("num_motion_frames", num_motion_frames, 0),
            ("audio_window", audio_window, 0),
            ("samples_per_clip", samples_per_clip, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise EMOInputError(f"{name} must be an int >= {low}, got {value!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise EMOInputError(f"size must be a positive int or None, got {size!r}")
        self.root = os.fspath(root)
        manifest = os.path.join(self.root, "manifest.jsonl")
        if not os.path.isfile(manifest):
            raise EMOInputError(f"{self.root!r} has no manifest.jsonl; make the dataset with emo-preprocess first")
        with open(manifest, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        self.stage = stage
        self.num_frames, self.num_motion_frames, self.audio_window = num_frames, num_motion_frames, audio_window
        self.size, self.seed, self.samples_per_clip = size, int(seed), samples_per_clip
        self.epoch = 0
        needed = 2 if stage == 1 else num_motion_frames + num_frames
        self.clips: list[dict[str, Any]] = [row for row in rows if row["num_frames"] >= needed]
        self.num_skipped = len(rows) - len(self.clips)
        if self.num_skipped:
            logger.warning(
                "TalkingHeadDataset(%s, stage %d): %d of %d clips have fewer than %d frames and are skipped",
                self.root,
                stage,
                self.num_skipped,
                len(rows),
                needed,
            )
        if stage != 1:
            for row in self.clips:
                if not os.path.isfile(os.path.join(self.root, row["path"], FEATURES_FILE)):
                    raise EMOInputError(
                        f"clip {row['clip_id']!r} has no {FEATURES_FILE}: stage {stage} needs audio features; make "
                        "the dataset with an --audio-encoder"
                    )

    def set_epoch(self, epoch: int) -> None:
        """Draw the samples of `epoch` (the same epoch always gives the same samples)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.clips) * self.samples_per_clip

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        index %= len(self)
        clip_index = index // self.samples_per_clip
        row = self.clips[clip_index]
        clip_dir = os.path.join(self.root, row["path"])
        count = int(row["num_frames"])
        rng = np.random.default_rng((self.seed, self.epoch, index))
        annotations = _load_annotations(clip_dir)
        mask = torch.from_numpy(annotations["mask"].astype(np.float32))[None]  # (1, S, S)
        if self.stage == 1:
            reference, target = (int(i) for i in rng.choice(count, size=2, replace=False))
            frames = self._read_frames(clip_dir, [reference, target])
            sample = {"reference": frames[0], "target": frames[1]}
        else:
            n, f, m = self.num_motion_frames, self.num_frames, self.audio_window
            start = int(rng.integers(0, count - (n + f) + 1))
            first_target = start + n
            outside = np.r_[0:first_target, first_target + f : count]  # frames not among the targets
            reference = int(rng.choice(outside)) if outside.size else int(rng.integers(count))
            frames = self._read_frames(clip_dir, [reference, *range(start, first_target + f)])
            speed = torch.from_numpy(annotations["speed"][first_target : first_target + f].astype(np.float32))
            sample = {
                "reference": frames[0],
                "motion_frames": frames[1 : 1 + n],
                "frames": frames[1 + n :],
                "audio_features": _windowed_features(clip_dir, first_target, f, m, count),
                "speed": speed,
            }
        sample["face_mask"] = self._resize(mask, nearest=True)
        sample["clip_index"] = torch.tensor(clip_index, dtype=torch.int64)
        return sample

    # -- reading -------------------------------------------------------------------------------------------

    def _read_frames(self, clip_dir: str, indices: list[int]) -> torch.Tensor:
        """Frames `indices` of the clip -> `(N, 3, H, W)` float32 in [-1, 1] (each distinct frame decoded once)."""
        import decord

        unique, inverse = np.unique(np.asarray(indices), return_inverse=True)
        reader = decord.VideoReader(os.path.join(clip_dir, FRAMES_FILE), ctx=decord.cpu(0), num_threads=1)
        pixels = reader.get_batch(unique.tolist()).asnumpy()[inverse]  # (N, H, W, 3) uint8
        frames = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return self._resize(frames)

    def _resize(self, images: torch.Tensor, nearest: bool = False) -> torch.Tensor:
        """`(N, C, H, W)` -> `(N, C, size, size)` (unchanged when `size` is None or already right)."""
        if self.size is None or images.shape[-2:] == (self.size, self.size):
            return images
        if nearest:
            return torch.nn.functional.interpolate(images[None], size=(self.size, self.size), mode="nearest")[0]
        resized = torch.nn.functional.interpolate(
            images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )
        return resized.clamp_(-1.0, 1.0)


def _load_annotations(clip_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(clip_dir, ANNOTATIONS_FILE))


def _windowed_features(clip_dir: str, first: int, count: int, m: int, clip_frames: int) -> torch.Tensor:
    """`window_audio_features(features, m)[first : first + count]` of the clip, reading only the rows it needs:
    `(count, 2m+1, L, D)` float32."""
    from safetensors import safe_open

    lo, hi = max(0, first - m), min(clip_frames, first + count + m)
    with safe_open(os.path.join(clip_dir, FEATURES_FILE), framework="pt") as handle:
        rows = handle.get_slice(FEATURES_KEY)[lo:hi].float()  # (hi - lo, L, D)
    index = (torch.arange(first, first + count)[:, None] + torch.arange(-m, m + 1)).clamp(0, clip_frames - 1)
    return rows[index - lo]

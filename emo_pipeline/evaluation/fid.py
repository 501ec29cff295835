"""FID features: pytorch-fid's own InceptionV3 (2048-d pool3 features of the FID Inception graph) on video frames.

Pre-processing is pytorch-fid's: RGB frames scaled to [0, 1] (what its `fid_score` gets from
`torchvision.transforms.ToTensor`), bilinearly resized to 299x299 and mapped to [-1, 1] inside `InceptionV3`
(`resize_input=True, normalize_input=True`). Weights: the published `pt_inception-2015-12-05-6726825d.pth`
(see `weights.py`).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import numpy as np
import torch

from emo_pipeline.errors import EMOInputError

__all__ = ["InceptionFeatures", "build_fid_inception", "frames_to_inception_input", "seeded_inception_state_dict"]


def _seeded_loader(seed: int, captured: list[dict]) -> Any:
    # pytorch-fid's fid_inception_v3() builds `inception`, then loads its published file into it. Without the file
    # (random-weights tests) the new network is filled with name-seeded values and loads its own state.
    def load(*args: Any, **kwargs: Any) -> dict:
        from emo_pipeline.evaluation.random_weights import fill_seeded

        frame = inspect.currentframe()
        assert frame is not None and frame.f_back is not None
        state = fill_seeded(frame.f_back.f_locals["inception"], seed).state_dict()
        captured.append(state)
        return state

    return load


def seeded_inception_state_dict(seed: int = 0) -> dict:
    """A state dict in the layout of the published `pt_inception-2015-12-05-6726825d.pth`, with seeded random values
    (tests write it under the published name to exercise the real loading path)."""
    captured: list[dict] = []
    build_fid_inception(random_seed=seed, _captured=captured)
    return captured[0]


FID_DIMS = (64, 192, 768, 2048)


def build_fid_inception(
    weights_path: str | os.PathLike[str] | None = None,
    random_seed: int | None = None,
    _captured: list | None = None,
    dims: int = 2048,
) -> Any:
    """pytorch-fid's `InceptionV3` (`use_fid_inception=True`) returning the block of `dims` features (2048: pool3, the
    standard FID; pytorch-fid's `--dims` 64/192/768 take earlier blocks), with the published weights file at
    `weights_path`, or seeded random weights (`random_seed`, tests) when no file is given."""
    from emo_pipeline._torchvision import import_torchvision

    import_torchvision()
    from pytorch_fid import inception as pytorch_fid_inception

    if dims not in FID_DIMS:
        raise EMOInputError(f"FID dims must be one of {FID_DIMS} (pytorch-fid's blocks), got {dims!r}")
    if weights_path is None and random_seed is None:
        raise EMOInputError("build_fid_inception needs weights_path (the published file) or random_seed (tests)")

    def load_published(*args: Any, **kwargs: Any) -> dict:
        return torch.load(os.fspath(weights_path), map_location="cpu", weights_only=True)

    original = pytorch_fid_inception.load_state_dict_from_url
    seeded = _seeded_loader(random_seed or 0, [] if _captured is None else _captured)
    pytorch_fid_inception.load_state_dict_from_url = load_published if weights_path else seeded
    try:
        block = pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
        model = pytorch_fid_inception.InceptionV3([block], resize_input=True, normalize_input=True)
    except Exception as error:
        if weights_path is None:
            raise
        raise EMOInputError(f"Inception weights {os.fspath(weights_path)!r} do not load: {error}") from error
    finally:
        pytorch_fid_inception.load_state_dict_from_url = original
    return model.eval()


def frames_to_inception_input(frames: np.ndarray) -> torch.Tensor:
    """`(N, H, W, 3)` uint8 RGB -> `(N, 3, H, W)` float in [0, 1], as `ToTensor` gives pytorch-fid."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise EMOInputError(f"frames must be (N, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(255.0)


class InceptionFeatures:
    """Callable: `(N, H, W, 3)` uint8 RGB frames -> `(N, dims)` float64 features (pool3 for 2048), in batches;
    earlier blocks are average-pooled to 1x1 as pytorch-fid's `get_activations` does."""

    def __init__(self, model: Any, batch_size: int = 16, device: str | torch.device = "cpu"):
        self.model = model.to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(frames), self.batch_size):
            batch = frames_to_inception_input(frames[start : start + self.batch_size]).to(self.device)
            pooled = self.model(batch)[0]
            if pooled.shape[2:] != (1, 1):
                pooled = torch.nn.functional.adaptive_avg_pool2d(pooled, output_size=(1, 1))
            outputs.append(pooled.squeeze(3).squeeze(2).double().cpu().numpy())
        return np.concatenate(outputs)

"""Streaming feature statistics and the Fréchet distance between two Gaussians (FID, FVD).

Features are accumulated as a running sum and sum of outer products (float64), so memory is `O(D^2)` whatever the
number of frames or clips. The distance itself is pytorch-fid's `calculate_frechet_distance` (the formula of
Heusel et al. 2017: `|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`).
"""

from __future__ import annotations

import numpy as np

from emo_pipeline.errors import EMOInputError

__all__ = ["FeatureStats", "frechet_distance"]


class FeatureStats:
    """Running mean and covariance of `D`-dimensional features (rows), equal to `np.mean` / `np.cov(rowvar=False)`."""

    def __init__(self) -> None:
        self.count = 0
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def add(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise EMOInputError(f"features must be (N, D), got shape {features.shape}")
        if self._sum is None:
            self._sum = np.zeros(features.shape[1])
            self._outer = np.zeros((features.shape[1], features.shape[1]))
        self.count += features.shape[0]
        self._sum += features.sum(axis=0)
        self._outer += features.T @ features

    def mean_cov(self, what: str = "features") -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2 or self._sum is None or self._outer is None:
            raise EMOInputError(f"{what}: a Fréchet distance needs at least 2 samples per set, got {self.count}")
        mu = self._sum / self.count
        cov = (self._outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, cov


def frechet_distance(first: FeatureStats, second: FeatureStats, what: str = "features") -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (pytorch-fid's implementation)."""
    from emo_pipeline._torchvision import import_torchvision

    import_torchvision()  # pytorch_fid.fid_score imports torchvision.transforms
    from pytorch_fid.fid_score import calculate_frechet_distance

    mu1, sigma1 = first.mean_cov(f"{what} (generated)")
    mu2, sigma2 = second.mean_cov(f"{what} (reference)")
    return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))

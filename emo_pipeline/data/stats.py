"""Dataset statistics of an `emo-preprocess` dataset and the speed buckets of EMO's speed layers.

EMO (arXiv 2402.17485, Sec. 3.2) encodes the head rotation speed `w` against `d` buckets as
`s_i = tanh((w - c_i) / r_i * 3)` (`emo_pipeline.models.speed.SpeedEncoder`). `suggest_speed_buckets` places them
on the dataset's own speed distribution:

* centres: the quantiles of the per-frame speeds at `(i + 0.5) / d`, i = 0..d-1 (the middles of `d` equally
  populated bins), rounded to 1e-4 rad/s; equal centres (a mostly still dataset) are merged, so fewer than `d`
  buckets can come out;
* radii: the gap to the nearest neighbouring centre (the rule of the package's default buckets, e.g. centre 0.5
  between 0.35 and 0.75 has radius 0.15), at least `min_radius`; a lone centre gets `single_radius`.

With radius = nearest gap, each bucket's encoding goes from -0.995 to +0.995 (tanh(+-3)) between its neighbours,
so every speed between the outer centres is resolved by some bucket.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "SPEED_HISTOGRAM_BIN",
    "SPEED_HISTOGRAM_MAX",
    "dataset_statistics",
    "suggest_speed_buckets",
    "write_speed_buckets_yaml",
]

SPEED_HISTOGRAM_BIN = 0.1  # rad/s per histogram bin
SPEED_HISTOGRAM_MAX = 3.0  # rad/s; faster frames go to the last (overflow) bin


def suggest_speed_buckets(
    speeds: np.ndarray, num_buckets: int = 9, min_radius: float = 0.01, single_radius: float = 0.1
) -> tuple[list[float], list[float]]:
    """Speed bucket centres and radii (rad/s) for `SpeedEncoder` from per-frame speeds (rule: module docstring).

    Args:
        speeds: `(N,)` head rotation speeds in rad/s, all frames of the dataset.
        num_buckets: `d`, the number of buckets (the package default has 9).

    Returns:
        `(centers, radii)`, equally long lists of floats, centres ascending. Empty input -> the package defaults.
    """
    speeds = np.asarray(speeds, dtype=np.float64).reshape(-1)
    speeds = speeds[np.isfinite(speeds)]
    if speeds.size == 0:
        from emo_pipeline.models.speed import DEFAULT_SPEED_CENTERS, DEFAULT_SPEED_RADII

        return list(DEFAULT_SPEED_CENTERS), list(DEFAULT_SPEED_RADII)
    quantiles = (np.arange(num_buckets) + 0.5) / num_buckets
    centers = np.unique(np.round(np.quantile(speeds, quantiles), 4))
    if centers.size == 1:
        return [float(centers[0])], [single_radius]
    gaps = np.diff(centers)
    nearest = np.minimum(np.r_[gaps[0], gaps], np.r_[gaps, gaps[-1]])
    radii = np.maximum(np.round(nearest, 4), min_radius)
    return [float(c) for c in centers], [float(r) for r in radii]


def dataset_statistics(
    rows: Sequence[dict[str, Any]], speeds: Sequence[np.ndarray], num_buckets: int = 9
) -> dict[str, Any]:
    """Summary of the clips: count, frames, hours, per-frame speed histogram and quantiles, suggested buckets.

    Args:
        rows: manifest rows.
        speeds: per clip, its `(F,)` per-frame speed in rad/s, in the order of `rows`.
    """
    all_speeds = np.concatenate([np.asarray(s, np.float64) for s in speeds]) if speeds else np.zeros(0)
    edges = np.round(np.arange(0.0, SPEED_HISTOGRAM_MAX + 1e-9, SPEED_HISTOGRAM_BIN), 6)
    counts = np.histogram(np.minimum(all_speeds, SPEED_HISTOGRAM_MAX), bins=np.r_[edges, np.inf])[0]
    centers, radii = suggest_speed_buckets(all_speeds, num_buckets)
    seconds = float(sum(row["duration"] for row in rows))
    quantile_levels = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
    return {
        "clips": len(rows),
        "frames": int(sum(row["num_frames"] for row in rows)),
        "seconds": round(seconds, 3),
        "hours": round(seconds / 3600.0, 9),
        "sources": len({row["source"] for row in rows}),
        "speed": {
            "mean": round(float(all_speeds.mean()), 6) if all_speeds.size else None,
            "quantiles": {
                f"p{round(q * 100)}": round(float(np.quantile(all_speeds, q)), 6) if all_speeds.size else None
                for q in quantile_levels
            },
            "histogram": {
                "unit": "rad/s, per frame",
                "edges": [float(e) for e in edges],  # bin i: [edges[i], edges[i + 1]); the last bin is >= its edge
                "counts": [int(c) for c in counts],
            },
        },
        "speed_buckets": {"centers": centers, "radii": radii},
    }


def write_speed_buckets_yaml(
    path: str | os.PathLike[str], centers: Sequence[float], radii: Sequence[float], num_frames: int
) -> None:
    """Write `speed_encoder_config: {centers, radii}` as YAML (OmegaConf) with a comment saying how it was made."""
    from omegaconf import OmegaConf

    body = OmegaConf.to_yaml(
        OmegaConf.create({"speed_encoder_config": {"centers": list(centers), "radii": list(radii)}})
    )
    header = (
        "# Speed buckets of EMO's speed layers (SpeedEncoder), suggested by emo-preprocess from the head rotation\n"
        f"# speeds (rad/s) of {num_frames} frames: centres at the (i + 0.5) / d quantiles, radii = gap to the\n"
        "# nearest centre (see emo_pipeline/data/stats.py). Include this file from the training config.\n"
    )
    tmp = f"{os.fspath(path)}.partial"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(header + body)
    os.replace(tmp, path)

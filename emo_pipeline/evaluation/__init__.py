"""emo-evaluate's metrics: FID, FVD, Sync-C/Sync-D/offset, CSIM, LMD, PSNR, SSIM (see README.md, "Evaluate").

`evaluate(generated, output, reference=None, metrics=..., weights_dir=None)` runs them over a folder of videos or an
emo-animate job file and writes `results.json` and `report.html`. Modules: `fid` (pytorch-fid's Inception), `fvd`
(StyleGAN-V's I3D), `sync` (SyncNet v2 of syncnet_python), `face_metrics` (mediapipe landmarks, OpenCV PSNR/SSIM,
insightface ArcFace), `frechet`, `weights` (published files), `report`, `runner`, `random_weights` (tests).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ALL_METRICS", "evaluate"]


def __getattr__(name: str) -> Any:  # lazy: importing the package does not import torch
    if name in __all__:
        from emo_pipeline.evaluation import runner

        return getattr(runner, name)
    raise AttributeError(name)

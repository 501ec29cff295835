"""The metric networks' published weight files: where each comes from, its licence, and how it is found.

A file is looked up, in order, in the `weights_dir` the caller gives (`emo-evaluate --weights DIR`), under its
published name, then in torch hub's checkpoint cache (`torch.hub.get_dir()/checkpoints`, where pytorch-fid's own
loader caches the Inception weights), and only then downloaded from where it is published into that cache. Offline
(`HF_HUB_OFFLINE=1` or `EMO_OFFLINE=1`) a missing file is an `EMOInputError` naming the file and its source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from emo_pipeline.errors import EMOInputError

__all__ = ["PUBLISHED_WEIGHTS", "PublishedWeights", "resolve_weights"]


@dataclass(frozen=True)
class PublishedWeights:
    """One metric network's published weights: `filename` (its published name), `url`, `network`, `licence`;
    `in_archive`: the file is published inside the archive at `url` (not downloaded automatically)."""

    filename: str
    url: str
    network: str
    licence: str
    in_archive: bool = False


PUBLISHED_WEIGHTS: dict[str, PublishedWeights] = {
    "inception": PublishedWeights(
        "pt_inception-2015-12-05-6726825d.pth",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        "FID Inception-v3 (pytorch-fid port of the TF FID graph)",
        "Apache-2.0 (pytorch-fid; the TF Inception graph it ports is Apache-2.0)",
    ),
    "i3d": PublishedWeights(
        "i3d_torchscript.pt",
        "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1",
        "I3D (Kinetics-400) as TorchScript, StyleGAN-V / common_metrics_on_video_quality FVD",
        "Apache-2.0 (the I3D Kinetics checkpoint of deepmind/kinetics-i3d); StyleGAN-V code is MIT-licensed",
    ),
    "syncnet": PublishedWeights(
        "syncnet_v2.model",
        "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model",
        "SyncNet v2 (joonson/syncnet_python)",
        "MIT (joonson/syncnet_python's licence covers code and model)",
    ),
    "arcface": PublishedWeights(
        "glintr100.onnx",
        "https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip",
        "ArcFace ResNet-100 on Glint360K (insightface antelopev2, the face-analysis models Hallo ships)",
        "NON-COMMERCIAL research use only (insightface's pretrained models)",
        in_archive=True,
    ),
    "scrfd": PublishedWeights(
        "scrfd_10g_bnkps.onnx",
        "https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip",
        "SCRFD-10G face detector with 5 keypoints (insightface antelopev2), aligns faces for ArcFace",
        "NON-COMMERCIAL research use only (insightface's pretrained models)",
        in_archive=True,
    ),
}


def _offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "EMO_OFFLINE")
    )


def _hub_cache() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(network: str, weights_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """Path of `network`'s published weights file (a key of `PUBLISHED_WEIGHTS`).

    Raises:
        EMOInputError naming the file, the folders searched and the URL it is published at, when it is in neither
        `weights_dir` nor torch hub's cache and cannot be downloaded (offline, `download=False`, or a failed download).
    """
    if network not in PUBLISHED_WEIGHTS:
        raise EMOInputError(f"unknown metric network {network!r}; known: {', '.join(PUBLISHED_WEIGHTS)}")
    spec = PUBLISHED_WEIGHTS[network]
    searched = []
    if weights_dir is not None:
        folder = Path(weights_dir)
        if not folder.is_dir():
            raise EMOInputError(f"--weights {os.fspath(weights_dir)!r} is not a folder")
        candidate = folder / spec.filename
        if candidate.is_file():
            return candidate
        searched.append(str(folder))
    cached = _hub_cache() / spec.filename
    if cached.is_file():
        return cached
    searched.append(str(cached.parent))
    source = f"the archive {spec.url} (extract it)" if spec.in_archive else spec.url
    where = (
        f"{spec.network} weights {spec.filename!r} not found (looked in {', '.join(searched)}): download it from "
        f"{source} and put it in the --weights folder under that name (licence: {spec.licence})"
    )
    if not download or _offline() or spec.in_archive:
        raise EMOInputError(where + ("" if download and not _offline() else "; offline, so nothing was downloaded"))
    import torch

    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(spec.url, os.fspath(cached), progress=True)
    except Exception as error:  # network errors of every kind: the message says what to do instead
        raise EMOInputError(f"{where}; the download failed: {error}") from error
    return cached

"""The HTML report of `emo-evaluate`: a summary table (one column per evaluated set or checkpoint), per-video numbers
and "skipped: reason" lines, a thumbnail strip per video, and matplotlib plots of the per-video curves (SyncNet's
distance per audio offset, identity similarity per frame, mouth opening per frame against the ground truth)."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["save_thumbnails", "write_report"]

THUMB_HEIGHT = 96
_ROWS = ("fid", "fvd", "sync_c", "sync_d", "sync_offset", "csim", "lmd", "psnr", "ssim")
_LOWER_IS_BETTER = {"fid", "fvd", "sync_d", "lmd"}


def save_thumbnails(folder: Path, name: str, frames: np.ndarray) -> str | None:
    """A strip of `frames` (each 96 px high) as `thumbs/<name>.png`; returns its path relative to `folder`."""
    import cv2
    from PIL import Image

    if len(frames) == 0:
        return None
    scaled = [cv2.resize(f, (max(1, round(f.shape[1] * THUMB_HEIGHT / f.shape[0])), THUMB_HEIGHT)) for f in frames]
    (folder / "thumbs").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(scaled, axis=1)).save(folder / "thumbs" / f"{name}.png")
    return f"thumbs/{name}.png"


def _plot(curves: dict[str, Any], path: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [key for key in ("sync", "csim", "mouth") if curves.get(key)]
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
    for axis, key in zip(axes[0], panels):
        if key == "sync":
            axis.plot(curves["sync"]["offsets"], curves["sync"]["mean_dists"], marker=".")
            axis.set(xlabel="audio offset (frames)", ylabel="mean SyncNet distance", title="sync offset curve")
        elif key == "csim":
            values = np.array([np.nan if v is None else v for v in curves["csim"]], dtype=float)
            axis.plot(values)
            axis.set(xlabel="frame", ylabel="cosine similarity", title="identity similarity")
        else:
            for label in ("generated", "reference"):
                axis.plot(np.array([np.nan if v is None else v for v in curves["mouth"][label]], float), label=label)
            axis.legend()
            axis.set(xlabel="frame", ylabel="lip gap / face height", title="mouth opening")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return True


def _cell(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def write_report(folder: Path, runs: list[dict[str, Any]], labels: list[str] | None = None) -> Path:
    """Write `folder/report.html` for one or more evaluation results (side by side); returns its path.

    Each run's `output` (its own folder, default `folder`) holds its `curves/` and `thumbs/`.
    """
    folder = Path(folder)
    labels = labels or [run.get("label") or f"run {i + 1}" for i, run in enumerate(runs)]
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    rows = []
    for key in _ROWS:
        values = [run["aggregate"].get(key) for run in runs]
        if all(v is None for v in values) and not any(key.split("_")[0] in run["metrics"] for run in runs):
            continue
        arrow = " (lower is better)" if key in _LOWER_IS_BETTER else ""
        rows.append(f"<tr><th>{key}{arrow}</th>" + "".join(f"<td>{_cell(v)}</td>" for v in values) + "</tr>")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>emo-evaluate report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #999;"
        "padding:3px 8px;text-align:right}.skipped{color:#a33}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(runs[0].get('title', 'emo-evaluate'))}</h1>",
        f"<table id='summary'><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>",
    ]
    for index, (label, run) in enumerate(zip(labels, runs)):
        base = Path(run.get("output") or folder)
        parts.append(f"<h2>{html.escape(label)}</h2>")
        parts += [
            f"<p class='skipped'>{html.escape(m)}: skipped: {html.escape(r)}</p>" for m, r in run["skipped"].items()
        ]
        keys = [k for k in _ROWS if k not in ("fid", "fvd") and any(k in v for v in run["videos"])]
        parts.append(
            f"<table class='videos' id='videos-{index}'><tr><th>video</th><th>frames</th>"
            + "".join(f"<th>{k}</th>" for k in keys)
            + "</tr>"
        )
        for video in run["videos"]:
            parts.append(
                f"<tr><th>{html.escape(video['name'])}</th><td>{_cell(video.get('frames'))}</td>"
                + "".join(f"<td>{_cell(video.get(k))}</td>" for k in keys)
                + "</tr>"
            )
        parts.append("</table>")
        for video in run["videos"]:
            name = video["name"]
            parts.append(f"<h3>{html.escape(name)}</h3>")
            parts += [
                f"<p class='skipped'>{html.escape(m)}: skipped: {html.escape(r)}</p>"
                for m, r in video.get("skipped", {}).items()
            ]
            if video.get("thumbnails"):
                source = os.path.relpath(base / video["thumbnails"], folder)
                parts.append(f"<img class='thumbs' alt='frames of {html.escape(name)}' src='{html.escape(source)}'>")
            curves_file = base / "curves" / f"{name}.json"
            curves = json.loads(curves_file.read_text()) if curves_file.is_file() else {}
            plot = folder / "plots" / f"{index}_{name}.png"
            if _plot(curves, plot, f"{label}: {name}"):
                parts.append(f"<img class='plot' alt='curves of {html.escape(name)}' src='plots/{plot.name}'>")
    parts.append("</body></html>")
    target = folder / "report.html"
    partial = target.with_name("report.html.partial")
    partial.write_text("\n".join(parts), encoding="utf-8")
    os.replace(partial, target)
    return target

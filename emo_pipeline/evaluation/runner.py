"""`evaluate()`: every requested metric over a set of generated videos (and their ground truth), one video at a time.

Memory does not grow with the dataset: each video is decoded, measured and dropped; FID/FVD keep running feature
sums (`FeatureStats`), the per-video numbers and curves go to small files in the output folder as they are made.
A video that cannot be measured for one metric (no face, silent or missing audio, too short) gets a
"skipped: reason" entry for that metric, never a zero.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emo_pipeline.errors import EMOInputError
from emo_pipeline.evaluation.frechet import FeatureStats, frechet_distance
from emo_pipeline.evaluation.weights import resolve_weights

__all__ = ["ALL_METRICS", "METRIC_KEYS", "Evaluator", "VideoItem", "collect_videos", "evaluate", "parse_metrics"]

ALL_METRICS = ("fid", "fvd", "sync", "csim", "lmd", "psnr", "ssim")
NEEDS_REFERENCE = ("fid", "fvd", "lmd", "psnr", "ssim")
NETWORKS = {"fid": ("inception",), "fvd": ("i3d",), "sync": ("syncnet",), "csim": ("arcface", "scrfd")}
#: json keys per metric (per video; `fid`/`fvd` are set-level only)
METRIC_KEYS = {
    "fid": ("fid",),
    "fvd": ("fvd",),
    "sync": ("sync_c", "sync_d", "sync_offset"),
    "csim": ("csim",),
    "lmd": ("lmd",),
    "psnr": ("psnr",),
    "ssim": ("ssim",),
}
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def parse_metrics(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in ALL_METRICS]
    if unknown or not names:
        raise EMOInputError(
            f"--metrics: unknown {', '.join(unknown) or '(none given)'}; known: {','.join(ALL_METRICS)}"
        )
    return tuple(dict.fromkeys(names))


@dataclass
class VideoItem:
    """One generated video, its ground truth (`reference`), portrait and driving audio, when known."""

    name: str
    generated: str
    reference: str | None = None
    portrait: str | None = None
    audio: str | None = None


def _videos_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()}


def collect_videos(
    generated: str | os.PathLike[str], reference: str | os.PathLike[str] | None = None
) -> list[VideoItem]:
    """The videos to evaluate: a folder of videos, or an emo-animate job file (`image`, `audio`, `output` columns:
    the portrait, the driving audio, the generated video). Ground truth from `reference` is matched by file stem.

    Raises:
        EMOInputError for a missing folder/file, no videos, or generated and reference sets that do not match.
    """
    source = Path(generated)
    if source.is_dir():
        found = _videos_in(source)
        items = [VideoItem(name, str(path)) for name, path in found.items()]
    elif source.is_file() and source.suffix.lower() in (".csv", ".jsonl"):
        from emo_pipeline.batch import read_jobs

        items = [VideoItem(Path(j.output).stem, j.output, portrait=j.image, audio=j.audio) for j in read_jobs(source)]
    else:
        raise EMOInputError(
            f"--generated {os.fspath(generated)!r}: expected a folder of videos or a .csv/.jsonl job file"
        )
    if not items:
        raise EMOInputError(f"--generated {os.fspath(generated)!r} has no videos ({', '.join(VIDEO_SUFFIXES)})")
    if reference is not None:
        folder = Path(reference)
        if not folder.is_dir():
            raise EMOInputError(f"--reference {os.fspath(reference)!r} is not a folder of videos")
        truth = _videos_in(folder)
        names = {item.name for item in items}
        missing, extra = sorted(names - set(truth)), sorted(set(truth) - names)
        if missing or extra:
            raise EMOInputError(
                f"generated ({len(names)}) and reference ({len(truth)}) videos do not match by name: "
                f"no reference for {missing or 'none'}; no generated video for {extra or 'none'}"
            )
        for item in items:
            item.reference = str(truth[item.name])
    return items


@dataclass
class Evaluator:
    """The metric networks, loaded once, and the running FID/FVD statistics of one evaluation."""

    metrics: tuple[str, ...]
    weights_dir: str | None = None
    device: str = "cpu"
    download: bool = True
    fid_stride: int = 1
    fid_dims: int = 2048
    weights: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = parse_metrics(self.metrics)
        if int(self.fid_stride) < 1:
            raise EMOInputError(f"fid_stride must be a positive number of frames, got {self.fid_stride!r}")
        if "csim" in self.metrics:
            import importlib.util

            if importlib.util.find_spec("insightface") is None or importlib.util.find_spec("onnxruntime") is None:
                raise EMOInputError("csim needs insightface and onnxruntime: pip install 'emo-pipeline[hallo]'")
        for metric in self.metrics:  # every missing file is an error before any video is read
            for network in NETWORKS.get(metric, ()):
                self.weights[network] = str(resolve_weights(network, self.weights_dir, self.download))
        self.stats = {m: (FeatureStats(), FeatureStats()) for m in ("fid", "fvd") if m in self.metrics}
        self._inception = self._i3d = self._syncnet = self._identity = None

    def _networks(self) -> None:
        if "fid" in self.metrics and self._inception is None:
            from emo_pipeline.evaluation.fid import InceptionFeatures, build_fid_inception

            model = build_fid_inception(self.weights["inception"], dims=self.fid_dims)
            self._inception = InceptionFeatures(model, device=self.device)
        if "fvd" in self.metrics and self._i3d is None:
            from emo_pipeline.evaluation.fvd import I3DFeatures, load_i3d

            self._i3d = I3DFeatures(load_i3d(self.weights["i3d"]), device=self.device)
        if "sync" in self.metrics and self._syncnet is None:
            from emo_pipeline.evaluation.sync import load_syncnet

            self._syncnet = load_syncnet(self.weights["syncnet"]).to(self.device)
        if "csim" in self.metrics and self._identity is None:
            from emo_pipeline.evaluation.face_metrics import FaceIdentity

            self._identity = FaceIdentity.from_files(self.weights["arcface"], self.weights["scrfd"])

    def video(self, item: VideoItem) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
        """Per-video numbers (`{key: value, "skipped": {metric: reason}}`), curves for the report, a few frames."""
        from emo_pipeline.media import read_video_frames, read_video_info

        self._networks()
        record: dict[str, Any] = {"name": item.name, "generated": item.generated, "reference": item.reference}
        skipped: dict[str, str] = {}
        curves: dict[str, Any] = {}
        try:
            info = read_video_info(item.generated)
            frames = read_video_frames(item.generated)
        except EMOInputError as error:
            record["skipped"] = dict.fromkeys(self.metrics, f"generated video unreadable: {error}")
            return record, curves, np.zeros((0, 1, 1, 3), np.uint8)
        record.update(frames=int(len(frames)), fps=round(info.fps, 3))
        truth = read_video_frames(item.reference) if item.reference else None
        if truth is not None and len(truth) != len(frames):
            record["reference_frames"] = int(len(truth))  # frame-wise metrics compare the first min(...) frames
        for metric in self.metrics:
            if metric in NEEDS_REFERENCE and truth is None:
                skipped[metric] = "needs a ground-truth video (--reference)"
                continue
            try:
                getattr(self, f"_{metric}")(item, frames, truth, info.fps, record, curves)
            except EMOInputError as error:
                skipped[metric] = str(error)
        record["skipped"] = skipped
        return record, curves, frames[np.linspace(0, len(frames) - 1, min(6, len(frames))).astype(int)]

    def _fid(self, item, frames, truth, fps, record, curves) -> None:
        self.stats["fid"][0].add(self._inception(frames[:: self.fid_stride]))
        self.stats["fid"][1].add(self._inception(truth[:: self.fid_stride]))

    def _fvd(self, item, frames, truth, fps, record, curves) -> None:
        self.stats["fvd"][0].add(self._i3d(frames))
        self.stats["fvd"][1].add(self._i3d(truth))

    def _sync(self, item, frames, truth, fps, record, curves) -> None:
        from emo_pipeline.audio import load_audio
        from emo_pipeline.evaluation import sync

        try:
            audio = load_audio(item.audio or item.generated, sync.SYNC_SAMPLE_RATE, max_duration=None)
        except EMOInputError as error:
            raise EMOInputError(f"no usable audio track: {error}") from error
        if not np.any(np.abs(audio) > 1e-4):
            raise EMOInputError("the audio track is silent")
        at_25 = np.round(np.arange(int(len(frames) / fps * sync.SYNC_FPS)) * fps / sync.SYNC_FPS).astype(int)
        at_25 = at_25[at_25 < len(frames)]
        video = frames[at_25]
        result = sync.sync_scores(self._syncnet, sync.crop_face_track(video, sync.face_track_boxes(video)), audio)
        record.update(sync_c=result.confidence, sync_d=result.min_dist, sync_offset=result.offset)
        curves["sync"] = {"offsets": result.offsets, "mean_dists": result.mean_dists}

    def _csim(self, item, frames, truth, fps, record, curves) -> None:
        from emo_pipeline.evaluation.face_metrics import cosine

        if item.portrait:
            from emo_pipeline.face import load_image

            identity_source = np.asarray(load_image(item.portrait))
        elif truth is not None:
            identity_source = truth[0]
        else:
            raise EMOInputError("needs the portrait (a job file's image column) or a ground-truth video")
        anchor = self._identity.embed(identity_source)
        if anchor is None:
            raise EMOInputError("no face in the portrait / ground-truth first frame")
        per_frame = []
        for frame in frames:
            embedding = self._identity.embed(frame)
            per_frame.append(math.nan if embedding is None else cosine(anchor, embedding))
        if not np.isfinite(per_frame).any():
            raise EMOInputError("no face found in any generated frame")
        record["csim"] = float(np.nanmean(per_frame))
        curves["csim"] = _listed(np.asarray(per_frame))

    def _lmd(self, item, frames, truth, fps, record, curves) -> None:
        from emo_pipeline.evaluation.face_metrics import MouthTracker, landmark_distance, mouth_opening

        size = (truth.shape[2], truth.shape[1])
        generated, reference = MouthTracker(size).track(frames), MouthTracker(size).track(truth)
        if np.isnan(reference[:, 0, 0]).all():
            raise EMOInputError("no face found in the ground-truth video")
        if np.isnan(generated[:, 0, 0]).all():
            raise EMOInputError("no face found in the generated video")
        record["lmd"], _ = landmark_distance(generated, reference)
        curves["mouth"] = {
            "generated": _listed(mouth_opening(generated)),
            "reference": _listed(mouth_opening(reference)),
        }

    def _psnr(self, item, frames, truth, fps, record, curves) -> None:
        from emo_pipeline.evaluation.face_metrics import psnr

        record["psnr"] = float(np.mean([psnr(a, b) for a, b in zip(frames, truth)]))

    def _ssim(self, item, frames, truth, fps, record, curves) -> None:
        from emo_pipeline.evaluation.face_metrics import ssim

        record["ssim"] = float(np.mean([ssim(a, b) for a, b in zip(frames, truth)]))

    def aggregate(self, records: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
        """Set-level numbers: FID / FVD from the running statistics, the mean of every per-video number."""
        summary: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for metric in self.metrics:
            if metric in self.stats:
                if self.stats[metric][0].count == 0:
                    skipped[metric] = "no video could be measured (see the per-video reasons)"
                    continue
                try:
                    summary[metric] = frechet_distance(*self.stats[metric], what=metric.upper())
                except EMOInputError as error:
                    skipped[metric] = str(error)
                continue
            for key in METRIC_KEYS[metric]:
                values = [r[key] for r in records if key in r]
                if values:
                    summary[key] = float(np.mean(values))
                    summary[f"{key}_videos"] = len(values)
                else:
                    skipped[metric] = "no video could be measured (see the per-video reasons)"
        return summary, skipped


def _listed(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in values]


def _write_json(path: Path, data: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, allow_nan=False))
    os.replace(partial, path)  # never a half-written file under the final name


def evaluate(
    generated: str | os.PathLike[str],
    output: str | os.PathLike[str],
    reference: str | os.PathLike[str] | None = None,
    metrics: str | tuple[str, ...] = ALL_METRICS,
    weights_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    download: bool = True,
    progress: bool = True,
    title: str | None = None,
    fid_stride: int = 1,
    fid_dims: int = 2048,
) -> dict[str, Any]:
    """Evaluate the videos of `generated` (folder or job file) against `reference`; writes `results.json` and
    `report.html` in `output` and returns the results (`{"aggregate", "videos", "skipped", ...}`)."""
    from tqdm.auto import tqdm

    from emo_pipeline.evaluation.report import save_thumbnails, write_report

    if Path(output).exists() and not Path(output).is_dir():
        raise EMOInputError(f"--output {os.fspath(output)!r} is a file, not a folder")
    items = collect_videos(generated, reference)
    weights = os.fspath(weights_dir) if weights_dir else None
    evaluator = Evaluator(parse_metrics(metrics), weights, device, download, fid_stride, fid_dims)
    folder = Path(output)
    (folder / "curves").mkdir(parents=True, exist_ok=True)
    records = []
    for item in tqdm(items, desc="evaluating", unit="video", disable=not progress, file=sys.stderr):
        record, curves, thumbs = evaluator.video(item)
        record["thumbnails"] = save_thumbnails(folder, item.name, thumbs)
        _write_json(folder / "curves" / f"{item.name}.json", curves)
        records.append(record)
    aggregate, skipped = evaluator.aggregate(records)
    results = {
        "title": title or f"emo-evaluate: {os.fspath(generated)}",
        "label": Path(generated).name,
        "metrics": list(evaluator.metrics),
        "fid_stride": evaluator.fid_stride,
        "fid_dims": evaluator.fid_dims,
        "weights": evaluator.weights,
        "aggregate": aggregate,
        "skipped": skipped,
        "videos": records,
    }
    _write_json(folder / "results.json", results)
    write_report(folder, [results])
    return results

"""`emo-preprocess`: a folder of raw talking-head videos -> the clip dataset EMO's training reads.

EMO (Tian et al. 2024, arXiv 2402.17485, Sec. 4.1) trains on 3-12 s clips of one talking or singing person,
cropped square around the face at 512x512, with wav2vec2 audio features, the face-region mask (union of the face
boxes) and the head rotation speed. The stages, one module each:

* `preprocess_config`: the dataset's settings (`PreprocessConfig`) and shared constants;
* `video`: one source video -> clip folders (`process_video`: probe, decode, scene cuts, face checks, crops);
* `clips`: one clip's checks and its atomic write (see there for the clip folder layout);
* `workers`: videos in parallel spawn processes, surviving a worker that crashes;
* `records`: the dataset folder's bookkeeping that makes a run resumable and its outputs reproducible;
* this module: `preprocess_videos`, which runs them over a folder.

`preprocess_videos` runs the videos (in `workers` spawn processes), and keeps the dataset resumable: a video's
result is recorded in `.state/` when it is done; a re-run skips done videos and clips already written, and retries
failed videos only with `retry_failed`. `manifest.jsonl`, `failures.jsonl`, `stats.json` and
`speed_buckets.yaml` are rebuilt from those records, sorted, so an interrupted and resumed run produces the same
files as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emo_pipeline.data.clips import CLIPS_DIR, TMP_PREFIX
from emo_pipeline.data.preprocess_config import (
    ANALYSIS_SIDE,
    DEFAULT_AUDIO_ENCODER,
    VIDEO_EXTENSIONS,
    WINDOW,
    PreprocessConfig,
)
from emo_pipeline.data.records import (
    FAILURES_FILE,
    MANIFEST_FILE,
    STATE_DIR,
    check_config,
    find_videos,
    locked,
    read_state,
    record_video,
    write_manifest,
    write_statistics,
)
from emo_pipeline.data.scenes import DEFAULT_SCENE_THRESHOLD
from emo_pipeline.data.video import FAILURE_REASONS, VideoResult, load_audio_encoder, process_video, video_key
from emo_pipeline.data.workers import run_pool
from emo_pipeline.errors import EMOInputError
from emo_pipeline.face import DEFAULT_FACE_SCALE

__all__ = [
    "ANALYSIS_SIDE",
    "DEFAULT_AUDIO_ENCODER",
    "FAILURE_REASONS",
    "VIDEO_EXTENSIONS",
    "WINDOW",
    "PreprocessConfig",
    "PreprocessSummary",
    "VideoResult",
    "find_videos",
    "preprocess_videos",
    "process_video",
    "video_key",
]

logger = logging.getLogger(__name__)

_MANIFEST_INTERVAL = 30.0  # seconds between rewrites of the manifest during a run (it is always written at the end)
_load_audio_encoder = load_audio_encoder  # the name benchmarks/bench_preprocess.py imports


@dataclass
class PreprocessSummary:
    """Outcome of a `preprocess_videos` run. `videos`: videos found; `processed`/`skipped`: this run; `failed`:
    videos listed in failures.jsonl; `clips`/`hours`: the whole manifest; `rejected`: rejected candidate clips
    per reason; `failures`: failed videos per reason."""

    output_dir: str
    videos: int
    processed: int
    skipped: int
    failed: int
    clips: int
    hours: float
    rejected: dict[str, int]
    failures: dict[str, int]
    seconds: float

    def describe(self) -> str:
        lines = [
            f"{self.videos} videos: {self.processed} processed, {self.skipped} already done; {self.failed} failed "
            f"(see {FAILURES_FILE})",
            f"{self.clips} clips, {self.hours * 60:.1f} min, in {self.output_dir}/{MANIFEST_FILE} "
            f"({self.seconds:.1f} s)",
        ]
        if self.rejected:
            lines.append("rejected clips: " + ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())))
        if self.failures:
            lines.append("failed videos: " + ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items())))
        return "\n".join(lines)


def preprocess_videos(
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    fps: float = 25.0,
    size: int = 512,
    min_seconds: float = 3.0,
    max_seconds: float = 12.0,
    crop_scale: float = DEFAULT_FACE_SCALE,
    min_face: float = 100.0,
    max_jump: float = 0.25,
    max_bad_frame_fraction: float = 0.05,
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD,
    detection_confidence: float = 0.5,
    audio_encoder: str | os.PathLike[str] | None = DEFAULT_AUDIO_ENCODER,
    features_fp16: bool = False,
    crf: int = 18,
    speed_buckets: int = 9,
    frame_cache_mb: float = 1024.0,
    device: str = "cpu",
    workers: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
) -> PreprocessSummary:
    """Turn every video under `input_dir` into clips of an EMO training dataset in `output_dir` (resumable).

    The settings are `PreprocessConfig`'s fields (see there for the reasons behind the defaults); `audio_encoder`
    is a wav2vec2 hub id or a local folder (None: no features). `workers` > 1 runs videos in that many spawn
    processes (each loads its own audio encoder); 1 runs them in this process. `retry_failed` reprocesses
    the videos listed in `failures.jsonl` (otherwise a re-run skips them, as it skips finished videos).

    Writes `<output_dir>/clips/<clip_id>/` (layout: `emo_pipeline.data.clips`), `manifest.jsonl` (one row per
    clip, sorted by source and start time), `failures.jsonl` (one row per failed video: video, reason, message,
    rejected, clips), `stats.json` and `speed_buckets.yaml`.

    Raises:
        EMOInputError: missing input folder, no videos in it, a bad setting, an audio encoder that cannot be
            loaded, another run on the same output folder, or an output folder made with other settings. Bad
            videos never raise: they are recorded in `failures.jsonl`.
    """
    started = time.perf_counter()
    config = PreprocessConfig(
        fps=float(fps),
        size=size,
        min_seconds=float(min_seconds),
        max_seconds=float(max_seconds),
        crop_scale=float(crop_scale),
        min_face=float(min_face),
        max_jump=float(max_jump),
        max_bad_frame_fraction=float(max_bad_frame_fraction),
        scene_threshold=float(scene_threshold),
        detection_confidence=float(detection_confidence),
        audio_encoder=None if audio_encoder is None else os.fspath(audio_encoder),
        features_fp16=bool(features_fp16),
        crf=int(crf),
        speed_buckets=int(speed_buckets),
        frame_cache_mb=float(frame_cache_mb),
        device=str(device),
    )
    config.validate()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise EMOInputError(f"workers must be an int >= 1, got {workers!r}")
    input_path, output_path = Path(input_dir), Path(output_dir)
    sources = _find_sources(input_path, output_path)
    out = os.fspath(output_path.resolve())
    os.makedirs(os.path.join(out, CLIPS_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    with locked(out):
        encoder = load_audio_encoder(config.audio_encoder, config.device)  # fails early on a bad encoder
        check_config(out, config)
        _remove_partial_clips(out)
        states: dict[str, dict[str, Any]] = {}
        jobs: list[tuple[str, str]] = []
        for source in sources:
            state = read_state(out, source, retry_failed)
            if state is not None:
                states[source] = state
            else:
                jobs.append((os.fspath(input_path.resolve() / source), source))
        recorder = _Recorder(out, sources, states, len(sources) - len(jobs), progress)
        try:
            with recorder.logging():
                if workers == 1:
                    for path, source in jobs:
                        recorder(process_video(path, source, out, config, encoder))
                elif jobs:
                    encoder = None  # each worker loads its own
                    run_pool(jobs, workers, config, out, recorder)
        finally:
            recorder.close()
            rows = write_manifest(out, sources, states)
        stats = write_statistics(out, sources, states, rows, config)
    failures = Counter(s["reason"] for s in (states.get(src) for src in sources) if s and s["status"] == "failed")
    return PreprocessSummary(
        output_dir=out,
        videos=len(sources),
        processed=recorder.processed,
        skipped=recorder.skipped,
        failed=sum(failures.values()),
        clips=len(rows),
        hours=stats["hours"],
        rejected=stats["rejected_clips"],
        failures=dict(sorted(failures.items())),
        seconds=round(time.perf_counter() - started, 3),
    )


def _find_sources(input_path: Path, output_path: Path) -> list[str]:
    """The videos under `input_path` (the output folder, if inside it, left out); refuses a bad folder pair."""
    if not input_path.is_dir():
        raise EMOInputError(f"input folder {os.fspath(input_path)!r} does not exist or is not a folder")
    if output_path.exists() and not output_path.is_dir():
        raise EMOInputError(f"output {os.fspath(output_path)!r} exists and is not a folder")
    sources = find_videos(input_path, exclude=output_path)
    if not sources:
        raise EMOInputError(
            f"no videos in {os.fspath(input_path)!r} (looked for {', '.join(VIDEO_EXTENSIONS)}, in subfolders too)"
        )
    return sources


def _remove_partial_clips(output_dir: str) -> None:
    """Clip folders a killed run left half-written (`.tmp-*`)."""
    for name in os.listdir(os.path.join(output_dir, CLIPS_DIR)):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(output_dir, CLIPS_DIR, name), ignore_errors=True)


class _Recorder:
    """Takes each finished video: logs its rejections and failure, records it, moves the progress bar, and
    rewrites the manifest every `_MANIFEST_INTERVAL` seconds so a long run's dataset is usable before its end."""

    def __init__(
        self, output_dir: str, sources: list[str], states: dict[str, dict[str, Any]], skipped: int, progress: bool
    ) -> None:
        from tqdm.auto import tqdm

        self.output_dir, self.sources, self.states = output_dir, sources, states
        self.skipped, self.processed, self.show_progress = skipped, 0, progress
        self.last_write = time.monotonic()
        self.bar = tqdm(
            total=len(sources),
            initial=skipped,
            desc="emo-preprocess",
            unit="video",
            disable=not progress,
            dynamic_ncols=True,
        )

    def logging(self):
        """Log lines printed above the progress bar instead of through it."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm() if self.show_progress else contextlib.nullcontext()

    def __call__(self, video: VideoResult) -> None:
        self.processed += 1
        for clip_index, reason, detail in video.rejections:
            where = f"clip {clip_index}" if clip_index >= 0 else "shot remainder"
            logger.info("%s: %s rejected: %s (%s)", video.source, where, reason, detail)
        if video.status == "failed":
            logger.warning("%s failed: %s (%s)", video.source, video.reason, video.message)
        self.states[video.source] = record_video(self.output_dir, video)
        self.bar.update(1)
        self.bar.set_postfix(
            clips=sum(len(s["clips"]) for s in self.states.values()),
            failed=sum(s["status"] == "failed" for s in self.states.values()),
            refresh=False,
        )
        if time.monotonic() - self.last_write > _MANIFEST_INTERVAL:
            write_manifest(self.output_dir, self.sources, self.states)
            self.last_write = time.monotonic()

    def close(self) -> None:
        self.bar.close()

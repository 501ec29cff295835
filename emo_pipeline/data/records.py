"""The bookkeeping of an `emo-preprocess` dataset folder, which makes a run resumable and its outputs reproducible.

A video's outcome is recorded in `.state/<video key>.json` when it is done; `manifest.jsonl`, `failures.jsonl`,
`stats.json` and `speed_buckets.yaml` are rebuilt from those records, sorted, so an interrupted and resumed run
writes the same files as an uninterrupted one. The folder keeps the settings it was made with
(`preprocess_config.json`) and one run at a time holds its lock.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emo_pipeline.data.clips import CLIPS_DIR, META_FILE, load_annotations
from emo_pipeline.data.preprocess_config import VIDEO_EXTENSIONS, PreprocessConfig
from emo_pipeline.data.stats import dataset_statistics, write_speed_buckets_yaml
from emo_pipeline.data.video import VideoResult, video_key
from emo_pipeline.errors import EMOInputError

__all__ = [
    "CONFIG_FILE",
    "FAILURES_FILE",
    "MANIFEST_FILE",
    "SPEED_BUCKETS_FILE",
    "STATE_DIR",
    "STATS_FILE",
    "check_config",
    "find_videos",
    "locked",
    "read_state",
    "record_video",
    "write_manifest",
    "write_statistics",
]

MANIFEST_FILE = "manifest.jsonl"
FAILURES_FILE = "failures.jsonl"
STATS_FILE = "stats.json"
SPEED_BUCKETS_FILE = "speed_buckets.yaml"
CONFIG_FILE = "preprocess_config.json"
STATE_DIR = ".state"
LOCK_FILE = ".lock"


def find_videos(input_dir: str | os.PathLike[str], exclude: str | os.PathLike[str] | None = None) -> list[str]:
    """Video files under `input_dir` (recursive, `VIDEO_EXTENSIONS`, any case; hidden files and folders and the
    `exclude` folder skipped), as sorted posix paths relative to `input_dir`."""
    root = Path(input_dir).resolve()
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and (skip is None or here / d != skip))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(VIDEO_EXTENSIONS):
                found.append((here / name).relative_to(root).as_posix())
    return sorted(found)


@contextlib.contextmanager
def locked(output_dir: str) -> Iterator[None]:
    """One run per dataset folder at a time (an advisory lock the OS releases if the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no lock
        yield
        return
    handle = open(os.path.join(output_dir, LOCK_FILE), "w")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            raise EMOInputError(f"another emo-preprocess run is writing to {output_dir!r}; wait for it") from error
        yield
    finally:
        handle.close()


def check_config(output_dir: str, config: PreprocessConfig) -> None:
    path = os.path.join(output_dir, CONFIG_FILE)
    wanted = config.fingerprint()
    existing = _read_json(path)
    if existing is None:
        _write_atomic(path, json.dumps(wanted, indent=1, sort_keys=True) + "\n")
        return
    differences = {k: (existing.get(k), v) for k, v in wanted.items() if existing.get(k) != v}
    if differences:
        listed = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in sorted(differences.items()))
        raise EMOInputError(
            f"output folder {output_dir!r} holds a dataset made with other settings ({listed}); use a new output "
            "folder, or the same settings to resume it"
        )


def read_state(output_dir: str, source: str, retry_failed: bool) -> dict[str, Any] | None:
    """The record of `source` if it needs no new run: done, or failed and not retried, with its clips all there."""
    state = _read_json(_state_path(output_dir, source))
    if state is not None and _state_complete(output_dir, state) and (state["status"] == "done" or not retry_failed):
        return state
    return None


def record_video(output_dir: str, video: VideoResult) -> dict[str, Any]:
    """Write the record of a processed video (`.state/<key>.json`, atomically) and return it."""
    state = {
        "source": video.source,
        "status": video.status,
        "reason": video.reason,
        "message": video.message,
        "clips": sorted(row["clip_id"] for row in video.clips),
        "rejected": dict(sorted(video.rejected.items())),
        "frames": video.frames,
        "timings": video.timings,
    }
    _write_atomic(_state_path(output_dir, video.source), json.dumps(state, indent=1, sort_keys=True) + "\n")
    return state


def write_manifest(output_dir: str, sources: list[str], states: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rebuild manifest.jsonl and failures.jsonl from the recorded videos; return the manifest rows."""
    rows, failures = [], []
    for source in sources:
        state = states.get(source)
        if state is None:
            continue
        for clip_id in state["clips"]:
            row = _read_json(os.path.join(output_dir, CLIPS_DIR, clip_id, META_FILE))
            if row is not None:
                rows.append(row)
        if state["status"] == "failed":
            failures.append(
                {
                    "video": source,
                    "reason": state["reason"],
                    "message": state["message"],
                    "rejected": state["rejected"],
                    "clips": len(state["clips"]),
                }
            )
    rows.sort(key=lambda row: (row["source"], row["start"], row["clip_id"]))
    _write_atomic(
        os.path.join(output_dir, MANIFEST_FILE), "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    )
    _write_atomic(
        os.path.join(output_dir, FAILURES_FILE), "".join(json.dumps(row, sort_keys=True) + "\n" for row in failures)
    )
    return rows


def write_statistics(
    output_dir: str,
    sources: list[str],
    states: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
    config: PreprocessConfig,
) -> dict[str, Any]:
    speeds = [load_annotations(os.path.join(output_dir, row["path"]))["speed"] for row in rows]
    stats = dataset_statistics(rows, speeds, num_buckets=config.speed_buckets)
    recorded = [states[s] for s in sources if s in states]
    rejected: Counter[str] = Counter()
    for state in recorded:
        rejected.update(state["rejected"])
    stats.update(
        videos=len(sources),
        videos_with_clips=sum(bool(s["clips"]) for s in recorded),
        videos_failed=sum(s["status"] == "failed" for s in recorded),
        videos_pending=len(sources) - len(recorded),
        failures=dict(sorted(Counter(s["reason"] for s in recorded if s["status"] == "failed").items())),
        rejected_clips=dict(sorted(rejected.items())),
        config=config.fingerprint(),
    )
    _write_atomic(os.path.join(output_dir, STATS_FILE), json.dumps(stats, indent=1, sort_keys=True) + "\n")
    buckets = stats["speed_buckets"]
    write_speed_buckets_yaml(
        os.path.join(output_dir, SPEED_BUCKETS_FILE), buckets["centers"], buckets["radii"], stats["frames"]
    )
    return stats


def _state_path(output_dir: str, source: str) -> str:
    return os.path.join(output_dir, STATE_DIR, f"{video_key(source)}.json")


def _state_complete(output_dir: str, state: dict[str, Any]) -> bool:
    """A recorded video whose clip folders are all still there."""
    return state.get("status") in ("done", "failed") and all(
        os.path.exists(os.path.join(output_dir, CLIPS_DIR, clip_id, META_FILE)) for clip_id in state.get("clips", [])
    )


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None

"""Many (portrait, audio) -> mp4 jobs at once: `emo-animate --jobs jobs.csv`, spread over processes with accelerate.

A job file is CSV (a header row) or JSON Lines (one object per line) with the columns `image`, `audio`, `output`
and, optionally, per-job settings (`JOB_SETTINGS`: `seed`, `steps`, `guidance_scale`, ...; an empty cell takes the
command line's value), and `pose_video` (EchoMimic's pose weights: the job's driving video). Relative paths are
relative to the job file's folder.

    accelerate launch --num_processes 4 -m emo_pipeline.cli.animate --jobs jobs.csv --model path/or/hub-id
    torchrun --nproc_per_node 2 -m emo_pipeline.cli.animate --jobs jobs.csv      # the same with torchrun

Each process loads the pipeline once (on its own GPU: accelerate's `PartialState().device`) and takes its share of
the pending jobs (`split_between_processes`). Jobs whose output exists are skipped, so re-running resumes. A job
that fails (bad input, no face, any error) is recorded in `failures.jsonl` with its reason and the batch goes on.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emo_pipeline.errors import EMOInputError

__all__ = ["JOB_SETTINGS", "BatchSummary", "Job", "read_jobs", "run_batch"]

#: Per-job settings a job file may carry, with their types. Names follow emo-animate's options (`--guidance-scale`
#: is the column `guidance_scale`).
JOB_SETTINGS: dict[str, type] = {
    "seed": int,
    "steps": int,
    "guidance_scale": float,
    "height": int,
    "fps": float,
    "speed": float,
    "scheduler": str,
    "frames_per_clip": int,
    "motion_frames": int,
    "face_index": int,
    "crf": int,
}
_REQUIRED = ("image", "audio", "output")
_OPTIONAL_PATHS = ("pose_video",)  # per-job input files (EchoMimic's pose weights: the driving video)


@dataclass
class Job:
    """One line of a job file: absolute paths and the settings it overrides. `line` is its line in the file."""

    image: str
    audio: str
    output: str
    line: int
    settings: dict[str, Any] = field(default_factory=dict)


def _say(line: str, stream: Any = None) -> None:
    """Write `line` and its newline in one write, flushed: the processes of a batch share one output pipe, and
    `print` writes the text and the newline separately when unbuffered (as under torchrun), so two processes' lines
    could interleave ("a.mp4[rank 1] wrote c.mp4")."""
    stream = sys.stdout if stream is None else stream
    stream.write(line + "\n")
    stream.flush()


def _convert(value: Any, kind: type, column: str, where: str) -> Any:
    if kind is str:
        return str(value)
    if isinstance(value, bool) or (isinstance(value, float) and kind is int and not value.is_integer()):
        raise EMOInputError(f"{where}: {column} must be {kind.__name__}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError) as error:
        raise EMOInputError(f"{where}: {column} must be {kind.__name__}, got {value!r}") from error


def read_jobs(path: str | os.PathLike, scheduler_names: tuple[str, ...] | None = None) -> list[Job]:
    """Read and check a job file (`.csv` or `.jsonl`). The inputs themselves are checked per job, later.

    Raises:
        EMOInputError naming the file and line: missing/unreadable file, unknown suffix, bad JSON, a missing
        required column or value, an unknown column, a value of the wrong type, two jobs with the same output,
        or no jobs at all.
    """
    source = Path(path)
    if not source.is_file():
        raise EMOInputError(f"job file {str(path)!r} does not exist")
    suffix = source.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise EMOInputError(f"job file {str(path)!r}: expected a .csv or .jsonl file")
    try:
        text = source.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise EMOInputError(f"job file {str(path)!r} could not be read as UTF-8 text ({error})") from error

    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        header = [name.strip() for name in (reader.fieldnames or [])]
        for row in reader:
            if None in row:  # more cells than header columns
                raise EMOInputError(f"{path}:{reader.line_num}: more values than the header has columns")
            cleaned = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
            rows.append((reader.line_num, {k: v for k, v in cleaned.items() if v not in ("", None)}))
        missing = [name for name in _REQUIRED if name not in header]
        if missing:
            raise EMOInputError(f"job file {str(path)!r}: the header lacks the column(s) {', '.join(missing)}")
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise EMOInputError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise EMOInputError(f"{path}:{number}: each line must be a JSON object")
            rows.append((number, {k: v for k, v in row.items() if v is not None and v != ""}))

    jobs: list[Job] = []
    outputs: dict[str, int] = {}
    for number, row in rows:
        where = f"{path}:{number}"
        unknown = sorted(set(row) - set(_REQUIRED) - set(_OPTIONAL_PATHS) - set(JOB_SETTINGS))
        if unknown:
            known = ", ".join((*_REQUIRED, *_OPTIONAL_PATHS, *JOB_SETTINGS))
            raise EMOInputError(f"{where}: unknown column(s) {', '.join(unknown)}; known: {known}")
        for name in _REQUIRED:
            if name not in row:
                raise EMOInputError(f"{where}: no {name} given")
        paths = {name: str((source.parent / os.path.expanduser(str(row[name]))).absolute()) for name in _REQUIRED}
        settings = {name: _convert(row[name], JOB_SETTINGS[name], name, where) for name in JOB_SETTINGS if name in row}
        for name in _OPTIONAL_PATHS:
            if name in row:
                settings[name] = str((source.parent / os.path.expanduser(str(row[name]))).absolute())
        if scheduler_names is not None and settings.get("scheduler", scheduler_names[0]) not in scheduler_names:
            raise EMOInputError(f"{where}: scheduler must be one of {', '.join(scheduler_names)}")
        if paths["output"] in outputs:
            raise EMOInputError(
                f"{where}: output {paths['output']!r} is also the output of line {outputs[paths['output']]}"
            )
        outputs[paths["output"]] = number
        jobs.append(Job(**paths, line=number, settings=settings))
    if not jobs:
        raise EMOInputError(f"job file {str(path)!r} has no jobs")
    return jobs


@dataclass
class BatchSummary:
    """Counts of one batch run over all processes, and the failures (`{"line", "output", "reason", ...}`)."""

    total: int
    written: int
    skipped: int
    failures: list[dict[str, Any]]
    seconds: float

    def describe(self) -> str:
        text = (
            f"{self.total} jobs: {self.written} written, {self.skipped} skipped (output existed), "
            f"{len(self.failures)} failed, in {self.seconds:.1f} s"
        )
        for failure in self.failures:
            text += f"\n  failed: line {failure['line']} -> {failure['output']}: {failure['reason']}"
        return text


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single O_APPEND write, so lines of concurrent processes never interleave."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def run_batch(
    jobs: list[Job],
    defaults: dict[str, Any],
    *,
    model: str | None,
    failures_path: str | os.PathLike,
    device: str | None = None,
    dtype: str = "fp32",
    speed: Any = None,
    watermark: bool = True,
    max_audio_seconds: float | None = 3600.0,
    progress: bool = True,
    family_settings: dict[str, Any] | None = None,
    c2pa_signer: Any = None,
) -> BatchSummary:
    """Run `jobs` over all processes of the current launch (accelerate, torchrun, or just this one).

    Args:
        jobs: from `read_jobs` (every process passes the same list).
        defaults: settings of jobs that do not set them (keys of `JOB_SETTINGS`; `height`/`steps` may be None for
            the model's default: 512 px / 40 steps, the demo model's 64 px / 4 steps).
        model: EMOPipeline folder or Hub id; None for the tiny random demo pipeline.
        failures_path: `failures.jsonl` to (re)write: one line per failed job, as it fails.
        device: default: this process's accelerator (`PartialState().device`), else CPU.
        speed: `emo_pipeline.cli._common.SpeedOptions` (attention backend, compile, quantize, step cache, offload).
        family_settings: settings of the model's weight family for every job (emo-animate's `--mode`,
            `--face-analysis-dir`, `--vocal-separation`); a model of another family refuses them (each job fails).

    A model that fails to load in any process ends the whole run: every process raises that `EMOInputError`
    (none is left waiting for the others).
        c2pa_signer: an `emo_pipeline.provenance.C2PASigner` signing every output's C2PA manifest (None: none).

    Returns:
        The `BatchSummary` of all processes (every process gets the same one).
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from emo_pipeline.cli._common import StepProgress, clip_lengths, demo_defaults, load_pipeline, preflight

    start = time.perf_counter()
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)
    label = f"[rank {state.process_index}] " if state.num_processes > 1 else ""
    failures_file = Path(failures_path)
    if state.is_main_process:
        failures_file.unlink(missing_ok=True)  # this run's failures only
    pending = [job for job in jobs if not os.path.exists(job.output)]
    state.wait_for_everyone()  # everyone has listed the pending jobs before anyone writes an output

    demo = model is None
    fallback = demo_defaults(demo)
    results: list[dict[str, Any]] = []

    def fail(job: Job, reason: str) -> None:
        record = {"line": job.line, "image": job.image, "audio": job.audio, "output": job.output, "reason": reason}
        _append_line(failures_file, record)
        results.append({**record, "status": "failed"})
        _say(f"{label}failed: line {job.line} -> {job.output}: {reason}", sys.stderr)

    with state.split_between_processes(pending) as mine:
        ready = []
        for job in mine:  # check every input of this process's jobs before loading the model
            settings = {**defaults, **job.settings}
            size = settings.get("height") or fallback["size"]
            try:
                preflight(
                    job.image,
                    job.audio,
                    job.output,
                    size=size,
                    fps=settings["fps"],
                    face_index=settings.get("face_index"),
                    max_audio_seconds=max_audio_seconds,
                )
            except EMOInputError as error:
                fail(job, str(error))
                continue
            ready.append((job, settings, size))

        pipe, load_error = None, None
        if ready:
            try:
                pipe = load_pipeline(
                    model,
                    device=device or str(state.device),
                    dtype=dtype,
                    notice=state.is_main_process,
                    speed=speed,
                )
                default_scheduler = pipe.scheduler
            except Exception as error:  # noqa: BLE001 - reported to every process below, then raised
                load_error = f"{label}cannot load the model: {error}"
        if state.num_processes > 1:  # every process learns whether any failed, instead of waiting in gather_object
            errors = [e for e in gather_object([load_error]) if e is not None]
        else:
            errors = [load_error] if load_error is not None else []
        if errors:
            if state.num_processes > 1:
                state.destroy_process_group()
            raise EMOInputError("; ".join(errors))
        for number, (job, settings, size) in enumerate(ready, start=1):
            steps = settings.get("steps") or fallback["steps"]
            bar = StepProgress(steps, label=f"{label}job {number}/{len(ready)} ", disable=not progress)
            try:
                pipe.scheduler = default_scheduler
                if settings.get("scheduler"):
                    pipe.set_scheduler(settings["scheduler"])
                pipe.write_video(
                    job.output,
                    job.image,
                    job.audio,
                    crf=settings["crf"],
                    c2pa_signer=c2pa_signer or False,
                    height=size,
                    width=size,
                    fps=settings["fps"],
                    num_inference_steps=steps,
                    guidance_scale=settings["guidance_scale"],
                    speed=settings.get("speed"),
                    face_index=settings.get("face_index"),
                    watermark=watermark,
                    generator=torch.Generator().manual_seed(settings["seed"]),
                    max_audio_seconds=max_audio_seconds,
                    callback_on_step_end=bar,
                    **clip_lengths(settings.get("frames_per_clip"), settings.get("motion_frames")),
                    **(family_settings or {}),
                    **({"pose_video": settings["pose_video"]} if "pose_video" in settings else {}),
                )
            except EMOInputError as error:
                bar.close()
                fail(job, str(error))
                continue
            except Exception as error:  # noqa: BLE001 - one broken job must not stop the batch; its reason is kept
                bar.close()
                traceback.print_exc()
                fail(job, f"{type(error).__name__}: {error}")
                continue
            bar.close()
            results.append({"line": job.line, "output": job.output, "status": "written"})
            _say(f"{label}wrote {job.output}")

    everything = results
    if state.num_processes > 1:
        everything = gather_object(results)
        state.destroy_process_group()  # this launch is done; a clean exit without "process group not destroyed"
    written = sum(r["status"] == "written" for r in everything)
    failures = sorted(
        ({k: v for k, v in r.items() if k != "status"} for r in everything if r["status"] == "failed"),
        key=lambda r: r["line"],
    )
    return BatchSummary(
        total=len(jobs),
        written=written,
        skipped=len(jobs) - len(pending),
        failures=failures,
        seconds=time.perf_counter() - start,
    )

"""What makes `emo-app` safe to share: one generation per pipeline at a time (a run lock and a stop flag the Stop
button sets), login credentials, a warning for an open page, and uploads bounded before they are decoded.

Kept apart from `emo_pipeline.app` (the page) so that the rules can be read and tested on their own.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from pathlib import Path

from emo_pipeline.errors import EMOInputError

__all__ = [
    "DEFAULT_MAX_SECONDS",
    "DEFAULT_MAX_UPLOAD_MB",
    "GenerationGate",
    "JobStopped",
    "check_upload",
    "is_local_address",
    "read_auth",
]

logger = logging.getLogger("emo_pipeline.app")

DEFAULT_MAX_UPLOAD_MB = 50.0
"""Largest upload the page accepts (portrait or audio), in MB: a 5-minute wav at 48 kHz stereo is 58 MB."""

DEFAULT_MAX_SECONDS = 300.0
"""Longest audio the page animates, in seconds (a shared server should not spend hours on one visitor)."""


class JobStopped(Exception):
    """Raised inside a generation (from its step callback) when the visitor pressed Stop."""


class GenerationGate:
    """One generation at a time on one pipeline, and a Stop that stops it.

    Gradio's queue (concurrency limit 1) starts the next job as soon as a stopped job's task is cancelled, while
    the stopped job's worker thread may still be inside a step. The gate closes that gap: a generation holds
    `lock` from its first step to its cleanup, so the next one waits for it; `request_stop` sets the running
    job's flag and the pipeline's `_interrupt`, and the step callback raises `JobStopped` on the next step.
    Every start and end is logged ("generation started/ended"), with the job's session and time.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._guard = threading.Lock()
        self._running: tuple[str | None, threading.Event, object] | None = None
        self._waiting: dict[str | None, threading.Event] = {}

    def enter(self, session: str | None, holder: object) -> threading.Event:
        """Wait for the pipeline, then mark `session`'s job as the running one; returns its stop flag (a Stop while
        waiting is kept: that job stops at its first step). `holder.pipe` is the pipeline to interrupt."""
        stop = threading.Event()
        with self._guard:
            self._waiting[session] = stop
        try:
            self.lock.acquire()
        finally:
            with self._guard:
                self._waiting.pop(session, None)
        with self._guard:
            self._running = (session, stop, holder)
        logger.info("generation started: session %s at %.3f", session, time.time())
        return stop

    def leave(self, session: str | None, outcome: str) -> None:
        """End the running job (`outcome`: finished / stopped / failed) and let the next one start."""
        with self._guard:
            self._running = None
        logger.info("generation ended (%s): session %s at %.3f", outcome, session, time.time())
        self.lock.release()

    def request_stop(self, session: str | None = None) -> bool:
        """Stop `session`'s job (None: the running one), running or waiting. True if one was told to stop."""
        with self._guard:
            if session in self._waiting:
                self._waiting[session].set()
                return True
            if self._running is None or (session is not None and self._running[0] != session):
                return False
            _, stop, holder = self._running
        stop.set()
        pipe = getattr(holder, "pipe", None)
        if pipe is not None:
            pipe._interrupt = True  # the clip in progress skips its remaining steps
        logger.info("stop requested: session %s", session)
        return True


def is_local_address(host: str) -> bool:
    """Whether `host` serves this machine only (loopback)."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_auth(auth: str | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """Login pairs from `--auth user:password` and/or `--auth-file FILE` (one `user:password` per line; blank
    lines and lines starting with # ignored); None when neither is given."""
    pairs: list[tuple[str, str]] = []
    sources: list[tuple[str, str]] = []
    if auth is not None:
        sources.append(("--auth", auth))
    if auth_file is not None:
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise EMOInputError(f"--auth-file {auth_file!r} could not be read ({error})") from error
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                sources.append((f"--auth-file {auth_file}:{number}", line.strip()))
        if not any(where.startswith("--auth-file") for where, _ in sources):
            raise EMOInputError(f"--auth-file {auth_file!r} has no user:password line")
    for where, text in sources:
        user, sep, password = text.partition(":")
        if not sep or not user or not password:
            raise EMOInputError(f"{where}: expected user:password (both non-empty)")
        pairs.append((user, password))
    return pairs or None


def _media_seconds(path: str) -> float | None:
    """Duration from the container's header (no decoding), or None when the header does not say."""
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            if container.duration is not None:
                return container.duration / 1_000_000
            durations = [
                float(s.duration * s.time_base) for s in container.streams if s.duration and s.time_base is not None
            ]
            return max(durations) if durations else None
    except (OSError, av.FFmpegError):
        return None  # not media: the decoder's own check names the problem


def check_upload(path: str | None, what: str, *, max_bytes: float | None, max_seconds: float | None = None) -> None:
    """Refuse an upload over `max_bytes` or, for audio, declaring more than `max_seconds`, before decoding it."""
    if not path:
        return
    name = os.path.basename(path)
    size = os.path.getsize(path)
    if max_bytes is not None and size > max_bytes:
        raise EMOInputError(
            f"{what} {name!r} is {size / 1e6:.1f} MB, more than this server's limit of {max_bytes / 1e6:g} MB"
        )
    if max_seconds is not None:
        seconds = _media_seconds(path)
        if seconds is not None and seconds > max_seconds:
            raise EMOInputError(
                f"{what} {name!r} lasts {seconds / 60:.1f} min, longer than this server's limit of {max_seconds:g} s: "
                "trim it"
            )

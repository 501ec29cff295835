"""Keep the routine start-up chatter of native libraries (mediapipe, TFLite, absl) off the user's terminal.

mediapipe 0.10.21 logs through absl's C++ logger and TFLite's minimal logger, both writing straight to file
descriptor 2 from the graph's worker threads when a graph first runs:

    INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    W0000 00:00:... inference_feedback_manager.cc:114] Feedback manager requires a model with a single ...

Neither honours `GLOG_minloglevel` nor `TF_CPP_MIN_LOG_LEVEL` (tried: the lines still appear), absl's C++
`InitializeLog`/`SetMinLogLevel` are not exposed to Python, and Python's `absl.logging` is a different library.
So `quiet_native_logs()` points descriptor 2 at a temporary file for the few milliseconds a graph is built and
first run, then restores it and replays every captured line that is not native INFO/WARNING noise: errors (and
anything another thread printed meanwhile) still reach the terminal, in order.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator

__all__ = ["NATIVE_NOISE", "quiet_native_logs"]

#: Lines dropped: absl-format INFO/WARNING records (`I0000 00:00:...` / `W0000 ...`), absl's notice that logging is
#: not initialised, and TFLite's INFO lines. Errors (`E...`, `F...`, `ERROR:`) are kept.
NATIVE_NOISE = re.compile(
    r"^(?:[IW]\d{4} [\d:.]+\s+\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|INFO: (?:Created TensorFlow Lite|Initialized TensorFlow Lite|TfLite)"
    r")"
)

_LOCK = threading.RLock()
_active = threading.local()


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Capture file descriptor 2 while native code runs; replay what is not `NATIVE_NOISE` afterwards.

    Re-entrant; concurrent callers take turns. Where descriptor 2 cannot be redirected (no such descriptor), it
    does nothing.
    """
    with _LOCK:
        if getattr(_active, "depth", 0):
            _active.depth += 1
            try:
                yield
            finally:
                _active.depth -= 1
            return
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            yield
            return
        capture = tempfile.TemporaryFile()
        os.dup2(capture.fileno(), 2)
        _active.depth = 1
        try:
            yield
        finally:
            _active.depth = 0
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            capture.close()
            kept = [line for line in text.splitlines(keepends=True) if not NATIVE_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()

"""emo-preprocess's worker processes: videos run in `spawn` processes, each with its own audio encoder, and a
video that kills its worker (a decoder segfault) is retried alone before it is recorded as "crashed"."""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from typing import Any

from emo_pipeline.data.preprocess_config import PreprocessConfig
from emo_pipeline.data.video import VideoResult, load_audio_encoder, process_video

__all__ = ["run_pool"]

# Worker processes: one audio encoder each, loaded by the initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(config: PreprocessConfig, output_dir: str, threads: int) -> None:
    if sys.platform.startswith("linux"):  # die with the parent: a killed run must not leave writers behind
        with contextlib.suppress(Exception):
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    import torch

    torch.set_num_threads(threads)
    _WORKER.update(
        config=config,
        output_dir=output_dir,
        threads=threads,
        encoder=load_audio_encoder(config.audio_encoder, config.device),
    )


def _worker_ping() -> int:
    return os.getpid()


def _worker_job(path: str, source: str) -> VideoResult:
    return process_video(
        path, source, _WORKER["output_dir"], _WORKER["config"], _WORKER["encoder"], decode_threads=_WORKER["threads"]
    )


def run_pool(
    jobs: list[tuple[str, str]], workers: int, config: PreprocessConfig, output_dir: str, on_result: Any
) -> None:
    """Run jobs in `workers` spawn processes. A job whose worker dies (BrokenProcessPool) is retried alone in a
    fresh pool; if it kills that one too it fails as "crashed"."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // workers)
    pending = deque((path, source, 0) for path, source in jobs)

    def new_pool() -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(config, output_dir, threads),
        )
        try:  # a pool that cannot run a no-op is an environment problem, not a bad video: stop the run
            pool.submit(_worker_ping).result()
        except BrokenProcessPool as error:
            pool.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError(
                "emo-preprocess worker processes fail to start (see the errors above); when calling "
                'preprocess_videos(workers > 1) from a script, guard it with `if __name__ == "__main__":`'
            ) from error
        return pool

    pool = new_pool()
    inflight: dict[Any, tuple[str, str, int]] = {}

    def settle(future: Any, job: tuple[str, str, int]) -> bool:
        """Hand a finished job's result on; True if its pool broke (the job is then retried alone, or fails as
        "crashed" if it was already the retry)."""
        path, source, attempts = job
        try:
            result = future.result()
        except BrokenProcessPool:
            if not attempts:
                pending.appendleft((path, source, 1))
                return True
            result = VideoResult(source=source)
            result.fail("crashed", "the worker process died while processing this video, twice")
            on_result(result)
            return True
        on_result(result)
        return False

    try:
        while pending or inflight:
            isolating = any(job[2] for job in inflight.values())
            while pending and not isolating and len(inflight) < 2 * workers:
                if pending[0][2] and inflight:  # a job retried after a crash waits to run alone
                    break
                job = pending.popleft()
                inflight[pool.submit(_worker_job, job[0], job[1])] = job
                isolating = bool(job[2])
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                broken |= settle(future, inflight.pop(future))
            if broken:  # every other job of the broken pool finishes now, with a result or BrokenProcessPool
                wait(inflight)
                for future, job in list(inflight.items()):
                    settle(future, job)
                inflight.clear()
                pool.shutdown(wait=True)
                pool = new_pool()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

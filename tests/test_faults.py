"""emo-animate and its batch mode under faults: a batch process killed outright (SIGKILL) mid-job and re-run, and a
full disk (a per-process file-size limit, RLIMIT_FSIZE, stands in: it needs no privileges and fails writes with the
same kind of error a full disk gives)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import resource
import shutil
import signal
import subprocess
import sys
import time
import wave

import av
import numpy as np
import pytest

from emo_pipeline.cli import animate
from emo_pipeline.errors import EMOInputError
from emo_pipeline.media import VideoWriter
from emo_pipeline.testing import demo_assets
from emo_pipeline.watermark import detect_watermark_in_file

PORTRAIT, SPEECH = demo_assets()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copy(PORTRAIT, folder / "portrait.png")
    with wave.open(str(SPEECH)) as source, wave.open(str(folder / "short.wav"), "wb") as target:
        target.setparams(source.getparams())
        target.writeframes(source.readframes(int(source.getframerate() * 0.6)))
    return folder


def decodable_frames(path):
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_a_batch_killed_mid_job_resumes_and_every_finished_video_is_intact(inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        "image,audio,output,steps\n"
        f"{inputs / 'portrait.png'},{inputs / 'short.wav'},out/a.mp4,1\n"
        f"{inputs / 'portrait.png'},{inputs / 'short.wav'},out/b.mp4,6\n"  # long enough to be caught mid-write
        f"{inputs / 'portrait.png'},{inputs / 'short.wav'},out/c.mp4,1\n"
    )
    command = [sys.executable, "-m", "emo_pipeline.cli.animate", "--jobs", str(jobs), "--no-progress"]
    batch = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out / ".b.partial.mp4"
    deadline = time.monotonic() + 240
    while not partial.exists() and batch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert partial.exists(), f"job b never started writing: {batch.stderr.read().decode()[-2000:]}"
    batch.send_signal(signal.SIGKILL)
    batch.wait(30)
    batch.stderr.close()

    assert (out / "a.mp4").exists() and not (out / "b.mp4").exists() and not (out / "c.mp4").exists()
    assert decodable_frames(out / "a.mp4") == 15 and detect_watermark_in_file(out / "a.mp4").found
    # What the kill left is clearly named and does not play: the mp4 index is written only at close.
    with pytest.raises(av.FFmpegError):
        decodable_frames(partial)

    stamp = (out / "a.mp4").stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    assert animate.main(command[3:]) == 0  # the same command again
    assert "3 jobs: 2 written, 1 skipped (output existed), 0 failed" in capsys.readouterr().out
    assert (out / "a.mp4").stat().st_mtime_ns == stamp  # the finished video was not touched
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4", "c.mp4"]  # the killed job redone, no partial
    assert all(decodable_frames(out / f"{name}.mp4") == 15 for name in "bc")


def _file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@contextlib.contextmanager
def file_size_limit(limit):
    """This process's writes fail past `limit` bytes per file (soft limit only, restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_full_disk_is_a_clear_error_and_leaves_no_video(inputs, tmp_path, capsys):
    output = tmp_path / "out.mp4"
    argv = ["--image", str(inputs / "portrait.png"), "--audio", str(inputs / "short.wav"), "--output", str(output)]
    with file_size_limit(4000):
        code = animate.main([*argv, "--no-progress"])
    assert code == 2
    message = capsys.readouterr().err
    assert f"cannot write video '{output}'" in message and "disk is full" in message and "Traceback" not in message
    assert list(tmp_path.iterdir()) == []  # neither the video nor its partial file


def test_the_writer_reports_a_full_disk_and_removes_its_partial_file(tmp_path):
    code = (
        "import numpy as np\n"
        "from emo_pipeline.media import VideoWriter\n"
        "from emo_pipeline.errors import EMOInputError\n"
        "noise = np.random.default_rng(0).integers(0, 255, (100, 64, 64, 3), dtype=np.uint8)\n"
        "try:\n"
        f"    with VideoWriter({str(tmp_path / 'v.mp4')!r}, fps=25) as writer:\n"
        "        writer.write(noise)\n"
        "except EMOInputError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, preexec_fn=_file_size_limit(20000)
    )
    assert "disk is full or a size limit was reached" in result.stdout, result.stderr
    assert list(tmp_path.iterdir()) == []
    with VideoWriter(tmp_path / "ok.mp4", fps=25) as writer:  # without the limit the same write succeeds
        writer.write(np.zeros((4, 64, 64, 3), np.uint8))
    assert not isinstance(EMOInputError, type(None)) and (tmp_path / "ok.mp4").exists()

"""emo-animate --jobs: job files checked up front, jobs spread over a real 2-process world (torchrun on CPU), a bad
job recorded without stopping the batch, every good output written exactly once, re-runs resume."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import re
import shutil
import subprocess
import sys
import wave

import av
import pytest

from emo_pipeline.batch import read_jobs
from emo_pipeline.cli import animate
from emo_pipeline.errors import EMOInputError
from emo_pipeline.testing import demo_assets

PORTRAIT, SPEECH = demo_assets()


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory):
    """A folder with a portrait, 0.6 s of speech, a text file, and jobs.csv: 4 jobs, the second one bad."""
    folder = tmp_path_factory.mktemp("jobs")
    shutil.copy(PORTRAIT, folder / "portrait.png")
    with wave.open(str(SPEECH)) as source, wave.open(str(folder / "short.wav"), "wb") as target:
        target.setparams(source.getparams())
        target.writeframes(source.readframes(int(source.getframerate() * 0.6)))
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "out").mkdir()
    (folder / "jobs.csv").write_text(
        "image,audio,output,seed,fps\n"
        "portrait.png,short.wav,out/a.mp4,1,\n"
        "notes.txt,short.wav,out/bad.mp4,,\n"
        "portrait.png,short.wav,out/c.mp4,3,\n"
        "portrait.png,short.wav,out/d.mp4,,20\n"
    )
    return folder


def test_read_jobs_csv_and_jsonl(tmp_path):
    (tmp_path / "jobs.csv").write_text(
        "image,audio,output,steps,guidance_scale\na.png,a.wav,a.mp4,8,\nb.png,b.wav,b.mp4,,2\n"
    )
    (tmp_path / "jobs.jsonl").write_text(
        '{"image": "a.png", "audio": "a.wav", "output": "a.mp4", "steps": 8}\n\n'
        '{"image": "b.png", "audio": "b.wav", "output": "b.mp4", "guidance_scale": 2}\n'
    )
    for name in ("jobs.csv", "jobs.jsonl"):
        first, second = read_jobs(tmp_path / name)
        assert first.image == str(tmp_path / "a.png")  # relative to the job file's folder
        assert first.settings == {"steps": 8} and second.settings == {"guidance_scale": 2.0}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("jobs.csv", "image,audio\na.png,a.wav\n", "lacks the column(s) output"),
        ("jobs.csv", "image,audio,output,colour\na.png,a.wav,a.mp4,red\n", "unknown column(s) colour"),
        ("jobs.csv", "image,audio,output,steps\na.png,a.wav,a.mp4,many\n", "jobs.csv:2: steps must be int"),
        ("jobs.csv", "image,audio,output\na.png,a.wav,a.mp4\nb.png,b.wav,a.mp4\n", "also the output of line 2"),
        ("jobs.csv", "image,audio,output\n,a.wav,a.mp4\n", "jobs.csv:2: no image given"),
        ("jobs.csv", "image,audio,output\n", "has no jobs"),
        ("jobs.csv", "image,audio,output,scheduler\na.png,a.wav,a.mp4,fast\n", "scheduler must be one of"),
        (
            "jobs.jsonl",
            '{"image": "a.png", "audio": "a.wav", "output": "a.mp4"}\n{oops\n',
            "jobs.jsonl:2: not valid JSON",
        ),
        ("jobs.txt", "image,audio,output\n", "expected a .csv or .jsonl file"),
    ],
)
def test_a_bad_job_file_exits_2_naming_the_problem(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(EMOInputError, match=re.escape(message)):
        read_jobs(tmp_path / name, scheduler_names=animate.SCHEDULER_NAMES)
    assert animate.main(["--jobs", str(tmp_path / name)]) == 2
    assert message in capsys.readouterr().err


def test_jobs_and_single_video_options_do_not_mix(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        animate.main(["--jobs", str(tmp_path / "jobs.csv"), "--image", str(PORTRAIT)])
    assert exit_info.value.code == 2 and "drop --image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        animate.main(["--jobs", str(tmp_path / "jobs.csv"), "--pose-video", "driver.mp4"])
    assert exit_info.value.code == 2 and "a pose_video column" in capsys.readouterr().err


def video_frames(path):
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0)), len(container.streams.audio)


@pytest.mark.slow
def test_two_processes_write_every_good_output_once_record_the_bad_job_and_resume(job_folder, capsys):
    jobs = job_folder / "jobs.csv"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "emo_pipeline.cli.animate", "--jobs", str(jobs), "--steps", "1", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=job_folder,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 1, result.stderr  # one job failed
    writes = re.findall(r"\[rank (\d)\] wrote (\S+)", result.stdout)
    assert sorted(path for _, path in writes) == [str(job_folder / "out" / f"{n}.mp4") for n in "acd"]  # once each
    assert {rank for rank, _ in writes} == {"0", "1"}  # both processes worked
    assert "4 jobs: 3 written, 0 skipped (output existed), 1 failed" in result.stdout
    assert result.stdout.count("4 jobs:") == 1  # one summary, from the main process

    for name, fps in (("a", 25), ("c", 25), ("d", 20)):
        frames, audio_streams = video_frames(job_folder / "out" / f"{name}.mp4")
        assert frames == math.ceil(0.6 * fps) and audio_streams == 1
    assert not (job_folder / "out" / "bad.mp4").exists()
    assert sorted(p.name for p in (job_folder / "out").iterdir()) == ["a.mp4", "c.mp4", "d.mp4"]  # no partials

    (failure,) = [json.loads(line) for line in (job_folder / "failures.jsonl").read_text().splitlines()]
    assert failure["line"] == 3 and failure["output"] == str(job_folder / "out" / "bad.mp4")
    assert "is not an image file PIL can read" in failure["reason"]

    # Resume: finished outputs are skipped (not rewritten), the bad job fails again, exit 1.
    stamps = {p.name: p.stat().st_mtime_ns for p in (job_folder / "out").iterdir()}
    assert animate.main(["--jobs", str(jobs), "--steps", "1", "--no-progress"]) == 1
    assert "4 jobs: 0 written, 3 skipped (output existed), 1 failed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (job_folder / "out").iterdir()} == stamps

    # Fix the bad line: the batch completes with exit 0 and writes only the missing video.
    jobs.write_text(jobs.read_text().replace("notes.txt", "portrait.png"))
    assert animate.main(["--jobs", str(jobs), "--steps", "1", "--no-progress"]) == 0
    assert "4 jobs: 1 written, 3 skipped (output existed), 0 failed" in capsys.readouterr().out
    assert not (job_folder / "failures.jsonl").exists()
    assert video_frames(job_folder / "out" / "bad.mp4")[0] == 15


def test_family_options_reach_every_job_or_are_refused(job_folder, tmp_path, capsys):
    """--mode (and --face-analysis-dir, --vocal-separation) go to every job: the demo model (EMO weights) refuses
    them in each job, naming them, instead of silently running fast mode; a per-portrait --face-embedding is refused
    with --jobs."""
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        f"image,audio,output\n{job_folder / 'portrait.png'},{job_folder / 'short.wav'},{tmp_path / 'a.mp4'}\n"
    )
    assert animate.main(["--jobs", str(jobs), "--steps", "1", "--no-progress", "--mode", "parity"]) == 1
    assert "['mode'] apply to Hallo / Hallo2 or EchoMimic weights only" in capsys.readouterr().err
    assert not (tmp_path / "a.mp4").exists()
    with pytest.raises(SystemExit) as exit_info:
        animate.main(["--jobs", str(jobs), "--face-embedding", str(tmp_path / "e.npy")])
    assert exit_info.value.code == 2 and "--face-embedding is one portrait's identity" in capsys.readouterr().err


def test_a_pose_video_column_reaches_its_job(job_folder, tmp_path, capsys):
    """`pose_video` (EchoMimic's pose weights) is a per-job path, relative to the job file; the demo model (EMO
    weights) refuses it in that job, naming it, instead of ignoring it."""
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        f"image,audio,output,pose_video\n{job_folder / 'portrait.png'},{job_folder / 'short.wav'},"
        f"{tmp_path / 'a.mp4'},driver.mp4\n"
    )
    (job,) = read_jobs(jobs)
    assert job.settings == {"pose_video": str(tmp_path / "driver.mp4")}
    assert animate.main(["--jobs", str(jobs), "--steps", "1", "--no-progress"]) == 1
    assert "['pose_video'] apply to EchoMimic weights only" in capsys.readouterr().err
    assert not (tmp_path / "a.mp4").exists()


@pytest.mark.slow
def test_a_model_that_fails_to_load_in_one_process_ends_every_process_with_the_error(job_folder, tmp_path):
    """Rank 0 has a good job and loads the model (which fails); rank 1's only job fails its input check, so it never
    loads: it must not wait for rank 0 in gather_object but end with the same error. Exit 2 everywhere, no output."""
    jobs = tmp_path / "jobs.csv"
    folder = job_folder
    jobs.write_text(
        "image,audio,output\n"
        f"{folder / 'portrait.png'},{folder / 'short.wav'},{tmp_path / 'a.mp4'}\n"
        f"{folder / 'notes.txt'},{folder / 'short.wav'},{tmp_path / 'b.mp4'}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "emo_pipeline.cli.animate", "--jobs", str(jobs), "--model", str(tmp_path / "no-such-model")]
        + ["--steps", "1", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert result.returncode != 0
    errors = re.findall(r"error: \[rank 0\] cannot load the model: .*no-such-model", result.stderr)
    assert len(errors) == 2, result.stderr  # printed by both processes
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "b.mp4").exists()


def test_a_progress_line_is_one_write_so_processes_do_not_interleave():
    """The processes of a batch share one pipe; with unbuffered output (torchrun) `print` wrote the text and the
    newline in two writes, and another process's line could land between them ("a.mp4[rank 1] wrote ...")."""
    from emo_pipeline.batch import _say

    class Recording:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            self.writes.append(None)

    stream = Recording()
    _say("[rank 0] wrote a.mp4", stream)
    assert stream.writes == ["[rank 0] wrote a.mp4\n", None]

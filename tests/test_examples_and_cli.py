"""The examples and emo-animate, run for real on the tiny pipeline: files written, readable, right length."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import runpy
import sys
from fractions import Fraction

import av
import numpy as np
import pytest

from emo_pipeline.audio import load_audio
from emo_pipeline.cli import animate
from emo_pipeline.testing import demo_assets
from emo_pipeline.watermark import detect_watermark_in_file, read_ai_metadata

PORTRAIT, SPEECH = demo_assets()
EXPECTED_FRAMES = math.ceil(Fraction(len(load_audio(SPEECH)), 16000) * 25)


def video_facts(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        audio = container.streams.audio[0]
        return frames, float(stream.average_rate), float(audio.duration * audio.time_base)


def run_example(name, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", name), run_name="__main__")


@pytest.mark.parametrize("example", ["animate.py", "long_audio.py"])
def test_examples_write_a_full_length_video_with_audio(example, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out.mp4"
    run_example(example, ["--output", str(output), "--steps", "2"], monkeypatch)
    frames, fps, audio_seconds = video_facts(output)
    assert frames == EXPECTED_FRAMES and fps == 25
    assert abs(audio_seconds - frames / 25) < 0.05
    assert read_ai_metadata(output)
    assert "wrote" in capsys.readouterr().out


def test_emo_animate_demo_writes_a_playable_watermarked_mp4(tmp_path, capsys):
    output = tmp_path / "demo.mp4"
    code = animate.main(["--image", str(PORTRAIT), "--audio", str(SPEECH), "--output", str(output), "--steps", "2"])
    assert code == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err and "NOISE" in captured.err  # said loudly
    frames, fps, audio_seconds = video_facts(output)
    assert frames == EXPECTED_FRAMES and fps == 25 and abs(audio_seconds - frames / 25) < 0.05
    result = detect_watermark_in_file(output)
    assert result.found and result.bit_accuracy >= 0.9


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--image": "missing.png"}, "missing.png"),
        ({"--audio": "missing.wav"}, "missing.wav"),
        ({"--image": "blank"}, "face_box"),
        ({"--steps": "0"}, "num_inference_steps"),
    ],
)
def test_emo_animate_bad_input_exits_2_and_leaves_no_file(tmp_path, capsys, change, message):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((128, 128, 3), 200, dtype=np.uint8)).save(blank)
    args = {"--image": str(PORTRAIT), "--audio": str(SPEECH), "--output": str(tmp_path / "out.mp4")}
    args.update(
        {
            k: (str(blank) if v == "blank" else str(tmp_path / v) if v.startswith("missing") else v)
            for k, v in change.items()
        }
    )
    code = animate.main([token for pair in args.items() for token in pair])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".mp4"]


def test_emo_animate_interrupted_exits_130_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    from emo_pipeline.pipeline_emo import EMOPipeline

    original = EMOPipeline._generate

    def interrupted(self, *args, **kwargs):
        clips = original(self, *args, **kwargs)
        yield next(clips)
        raise KeyboardInterrupt  # Ctrl-C during the second clip

    monkeypatch.setattr(EMOPipeline, "_generate", interrupted)
    output = tmp_path / "out.mp4"
    code = animate.main(["--image", str(PORTRAIT), "--audio", str(SPEECH), "--output", str(output), "--steps", "1"])
    assert code == 130
    assert list(tmp_path.iterdir()) == []

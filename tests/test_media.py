"""Tests of emo_pipeline.media: the streaming mp4 writer (frames, fps, duration, audio length, metadata, atomic
publish, kill/interrupt safety) re-read with PyAV and decord, and decord reading with its errors."""

from __future__ import annotations

import importlib.resources
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import av
import numpy as np
import pytest

from emo_pipeline.audio import load_audio
from emo_pipeline.errors import EMOInputError
from emo_pipeline.media import VideoInfo, VideoWriter, read_video_frames, read_video_info

SPEECH = Path(str(importlib.resources.files("emo_pipeline") / "assets" / "speech.wav"))
AAC_FRAME = 1024  # AAC's decoder keeps the encoder's padding of the last frame: decoded audio may be < 1024 longer


def _gradient_frames(num_frames: int, height: int = 64, width: int = 96, start: int = 0) -> np.ndarray:
    """Smooth, distinct frames (x264 keeps them within a few grey levels at crf 18)."""
    rows, cols = np.mgrid[0:height, 0:width]
    frames = []
    for index in range(start, start + num_frames):
        red = (rows * 2 + index * 3) % 256
        green = (cols * 2 + index * 5) % 256
        blue = np.full_like(rows, (index * 7) % 256)
        frames.append(np.stack([red, green, blue], axis=-1).astype(np.uint8))
    return np.stack(frames)


def _probe(path: Path) -> dict:
    """What PyAV reads back: stream counts, frames, rates, durations, decoded audio and tags."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        result = {
            "metadata": dict(container.metadata),
            "codec": video.codec_context.name,
            "pix_fmt": video.codec_context.pix_fmt,
            "fps": float(video.average_rate),
            "video_duration": float(video.duration * video.time_base),
            "num_audio_streams": len(container.streams.audio),
        }
        result["num_frames"] = sum(1 for _ in container.decode(video=0))
    if result["num_audio_streams"]:
        with av.open(str(path)) as container:
            audio = container.streams.audio[0]
            result["audio_codec"] = audio.codec_context.name
            result["audio_rate"] = audio.rate
            result["audio_duration"] = float(audio.duration * audio.time_base)
            result["audio"] = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(audio=0)])
    return result


def test_writer_output_reread_with_pyav_and_decord(tmp_path):
    speech = load_audio(SPEECH)
    path = tmp_path / "talk.mp4"
    frames = _gradient_frames(75)
    with VideoWriter(path, fps=25, audio=speech, metadata={"comment": "made by a test"}) as writer:
        for start in range(0, 75, 12):  # clip by clip, as the pipeline does
            writer.write(frames[start : start + 12])
            assert not path.exists()  # nothing at the target until the writer closes
        assert writer.frames_written == 75 and writer.duration == 3.0
    probe = _probe(path)
    assert probe["codec"] == "h264" and probe["pix_fmt"] == "yuv420p"
    assert probe["num_frames"] == 75 and probe["fps"] == 25.0 and probe["video_duration"] == pytest.approx(3.0)
    assert probe["metadata"]["comment"] == "made by a test"
    # The 3.37 s of speech is trimmed to the 3.0 s video.
    assert probe["audio_codec"] == "aac" and probe["audio_rate"] == 16000
    assert probe["audio_duration"] == pytest.approx(3.0, abs=1e-3)
    decoded = probe["audio"]
    assert 48000 <= decoded.size < 48000 + AAC_FRAME
    relative_rms = np.sqrt(np.mean((decoded[:48000] - speech[:48000]) ** 2) / np.mean(speech[:48000] ** 2))
    assert relative_rms < 0.1  # AAC, aligned to the sample (measured ~0.02)

    info = read_video_info(path)
    assert info == VideoInfo(fps=25.0, num_frames=75, width=96, height=64, duration=3.0)
    pixels = read_video_frames(path)
    assert pixels.shape == (75, 64, 96, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - frames).mean() < 3.0
    picked = read_video_frames(path, [74, 0, -1, 10])
    np.testing.assert_array_equal(picked, pixels[[74, 0, 74, 10]])


def test_short_audio_is_padded_with_silence(tmp_path):
    path = tmp_path / "padded.mp4"
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)).astype(np.float32)  # 0.5 s
    with VideoWriter(path, fps=25, audio=tone) as writer:
        writer.write(_gradient_frames(50))  # 2 s
    probe = _probe(path)
    assert probe["num_frames"] == 50 and probe["audio_duration"] == pytest.approx(2.0, abs=1e-3)
    decoded = probe["audio"]
    assert 32000 <= decoded.size < 32000 + AAC_FRAME
    assert np.abs(decoded[1000:7000]).max() > 0.4
    assert np.abs(decoded[9000:32000]).max() < 0.01  # silence after the tone


def test_float_frames_ntsc_rate_and_custom_metadata(tmp_path):
    path = tmp_path / "ntsc.mp4"
    frames = _gradient_frames(30).astype(np.float32) / 255.0
    with VideoWriter(path, fps=29.97, metadata={"description": "d", "emo_provenance": "tiny"}) as writer:
        writer.write(frames[0])  # a single (H, W, 3) frame
        writer.write(frames[1:])
    probe = _probe(path)
    assert probe["num_frames"] == 30 and probe["num_audio_streams"] == 0
    assert probe["fps"] == pytest.approx(29.97, abs=1e-3)
    assert probe["video_duration"] == pytest.approx(30 / 29.97, abs=1e-3)
    assert probe["metadata"]["description"] == "d" and probe["metadata"]["emo_provenance"] == "tiny"
    info = read_video_info(path)
    assert info.num_frames == 30 and info.fps == pytest.approx(29.97, abs=1e-3)


def test_frames_stream_to_disk_as_they_are_written(tmp_path):
    path = tmp_path / "stream.mp4"
    writer = VideoWriter(path, fps=25, preset="ultrafast")
    partial = Path(writer.partial_path)
    assert partial.name == ".stream.partial.mp4" and partial.parent == tmp_path
    rng = np.random.default_rng(0)
    sizes = []
    for _ in range(10):
        writer.write(rng.integers(0, 256, (12, 128, 128, 3), dtype=np.uint8))  # noise: ~40 kB per frame
        sizes.append(partial.stat().st_size)
    assert sizes[-1] > sizes[4] > sizes[0]  # packets reach the file as the clips come, nothing waits in memory
    assert sizes[-1] > 500_000
    assert not path.exists()
    writer.close()
    assert path.exists() and not partial.exists()
    assert read_video_info(path).num_frames == 120


def test_failure_inside_the_writer_leaves_no_file(tmp_path):
    path = tmp_path / "failed.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(path, fps=25) as writer:
            writer.write(_gradient_frames(10))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, fps=25) as writer:
            writer.write(_gradient_frames(10))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_an_existing_file(tmp_path):
    path = tmp_path / "keep.mp4"
    path.write_bytes(b"the previous video")
    with pytest.raises(EMOInputError):
        with VideoWriter(path, fps=25) as writer:
            writer.write(_gradient_frames(5))
            writer.write(np.zeros((2, 32, 32, 3), np.uint8))  # size changes mid-video
    assert path.read_bytes() == b"the previous video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]


def test_unclosed_writer_garbage_collected_leaves_no_file(tmp_path):
    path = tmp_path / "forgotten.mp4"
    writer = VideoWriter(path, fps=25)
    writer.write(_gradient_frames(5))
    del writer
    assert list(tmp_path.iterdir()) == []


_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    import numpy as np
    from emo_pipeline.media import VideoWriter

    # A process started in the background by a non-interactive shell inherits SIGINT ignored; Ctrl-C is what
    # this child stands for, so restore Python's KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    with VideoWriter(sys.argv[1], fps=25, audio=np.zeros(160000, np.float32)) as writer:
        writer.write(np.zeros((12, 64, 64, 3), np.uint8))
        print("writing", flush=True)
        while True:
            writer.write(np.full((1, 64, 64, 3), 128, np.uint8))
            time.sleep(0.01)
    """
)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_killed_mid_write_leaves_no_target_file(tmp_path, how):
    """SIGINT (Ctrl-C: KeyboardInterrupt) cleans up fully; SIGKILL cannot run any cleanup, so a clearly named
    `.partial` file may remain, but never a file at the target path."""
    target = tmp_path / "out.mp4"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        time.sleep(0.2)
        child.send_signal(getattr(signal, how))
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode != 0
    assert not target.exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    if how == "SIGINT":
        assert leftovers == [], child.stderr.read()
    else:
        assert leftovers in ([], [".out.partial.mp4"])


def test_bad_writer_inputs_raise_naming_the_file(tmp_path):
    path = tmp_path / "bad.mp4"
    with pytest.raises(EMOInputError, match=r"bad\.mp4.*odd side.*even"):
        with VideoWriter(path, fps=25) as writer:
            writer.write(np.zeros((1, 63, 64, 3), np.uint8))
    with pytest.raises(EMOInputError, match=r"bad\.mp4.*must lie in \[0, 1\], found \[0, 2\]"):
        with VideoWriter(path, fps=25) as writer:
            writer.write(np.linspace(0, 2, 64 * 64 * 3, dtype=np.float32).reshape(1, 64, 64, 3))
    with pytest.raises(EMOInputError, match=r"bad\.mp4.*\(N, H, W, 3\)"):
        with VideoWriter(path, fps=25) as writer:
            writer.write(np.zeros((1, 64, 64, 4), np.uint8))
    with pytest.raises(EMOInputError, match=r"no frames were written to video .*bad\.mp4"):
        with VideoWriter(path, fps=25):
            pass
    with pytest.raises(EMOInputError, match=r"audio for video .*bad\.mp4.*1-D float"):
        VideoWriter(path, fps=25, audio=np.zeros((2, 100), np.float32))
    with pytest.raises(EMOInputError, match=r"directory .*missing_dir.* does not exist"):
        VideoWriter(tmp_path / "missing_dir" / "x.mp4", fps=25)
    with pytest.raises(EMOInputError, match=r"fps must be positive"):
        VideoWriter(path, fps=0)
    with pytest.raises(EMOInputError, match=r"preset must be one of the x264 presets.*'quick'"):
        VideoWriter(path, fps=25, preset="quick")
    assert list(tmp_path.iterdir()) == []


def test_reading_bad_videos_raises_naming_the_file(tmp_path):
    with pytest.raises(EMOInputError, match=r"missing\.mp4.*does not exist"):
        read_video_info(tmp_path / "missing.mp4")
    with pytest.raises(EMOInputError, match=r"speech\.wav.*has no video stream"):
        read_video_info(SPEECH)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(EMOInputError, match=r"junk\.mp4.*could not be read as a video"):
        read_video_frames(junk)
    path = tmp_path / "ok.mp4"
    with VideoWriter(path, fps=25) as writer:
        writer.write(_gradient_frames(10))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EMOInputError, match=r"truncated\.mp4"):
        read_video_frames(truncated)
    with pytest.raises(EMOInputError, match=r"frame index 10 out of range for video file .*ok\.mp4.*10 frames"):
        read_video_frames(path, [0, 10])

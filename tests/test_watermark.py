"""Provenance watermark: invisibility, survival through an h264 mp4, false positives, metadata tag, CLI."""

import functools
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402

from emo_pipeline.cli.watermark import main  # noqa: E402
from emo_pipeline.errors import EMOInputError  # noqa: E402
from emo_pipeline.testing import demo_assets  # noqa: E402
from emo_pipeline.watermark import (  # noqa: E402
    AI_GENERATED_METADATA,
    DEFAULT_PAYLOAD,
    DEFAULT_PAYLOAD_TAG,
    _ll_blocks,
    _top_singular_triplet,
    detect_watermark,
    detect_watermark_in_file,
    detection_threshold,
    embed_watermark,
    false_positive_probability,
    payload_bits,
    read_ai_metadata,
    watermark_capacity,
)

NUM_FRAMES = 25  # one second at 25 fps
# Unwatermarked video: each of the 48 aggregated bits is a fair coin, std 0.072; 0.5 +- 0.25 is +-3.5 std.
CHANCE_BAND = (0.25, 0.75)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@functools.cache
def portrait() -> np.ndarray:
    """(512, 512, 3) uint8: the bundled demo portrait (a public-domain astronaut photo), read once."""
    return np.asarray(PIL.Image.open(demo_assets()[0]).convert("RGB"))


def talking_head(size: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """(F, size, size, 3) uint8: the demo portrait, resized, drifting a few pixels per frame like a head."""
    big = cv2.resize(portrait(), (size + 16, size + 16), interpolation=cv2.INTER_AREA)
    frames = []
    for i in range(num_frames):
        dy, dx = round(4 + 2 * np.cos(i / 5)), round(4 + 3 * np.sin(i / 4))
        frames.append(big[dy : dy + size, dx : dx + size])
    return np.stack(frames)


def smooth_video(height: int, width: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """(F, H, W, 3) uint8 noise-free smooth colour gradients and low-frequency waves, slowly moving."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    frames = []
    for i in range(num_frames):
        t = i / num_frames
        r = 128 + 90 * np.sin(2 * np.pi * (x + 0.3 * y + 0.1 * t))
        g = 110 + 80 * np.cos(2 * np.pi * (1.5 * y - 0.2 * x + 0.05 * t))
        b = 60 + 150 * x * y
        frames.append(np.stack([r, g, b], axis=-1))
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def write_mp4(path, frames: np.ndarray, crf: int = 18, metadata: dict[str, str] | None = None) -> str:
    """Encode RGB frames with libx264 yuv420p at `crf` (PyAV), as the pipeline's writer does."""
    with av.open(str(path), "w") as container:
        if metadata:
            container.metadata.update(metadata)
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def read_rgb(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


# --- scheme -------------------------------------------------------------------------------------------------------


def test_default_payload_and_threshold():
    assert len(DEFAULT_PAYLOAD) == 48
    assert np.packbits(payload_bits(DEFAULT_PAYLOAD)).tobytes() == DEFAULT_PAYLOAD_TAG
    np.testing.assert_array_equal(payload_bits(DEFAULT_PAYLOAD_TAG), payload_bits(DEFAULT_PAYLOAD))
    assert detection_threshold(48) == 41 / 48
    assert 3.0e-7 < false_positive_probability(48, 41) < 3.2e-7  # the figure quoted in the docstrings
    assert false_positive_probability(48, 40) > 1e-6  # so 41 is the smallest admissible count
    with pytest.raises(EMOInputError, match="payload"):
        payload_bits("01x")


def test_capacity():
    assert watermark_capacity(64, 64) == 64
    assert watermark_capacity(512, 512) == 4096
    assert watermark_capacity(67, 93) == 8 * 11


def test_dct_does_not_change_singular_values():
    """Why the per-block DCT of DWT-DCT-SVD is skipped: an orthonormal 2-D DCT keeps the singular values."""
    block = np.random.default_rng(0).uniform(0, 510, (4, 4)).astype(np.float32)
    np.testing.assert_allclose(
        np.linalg.svd(cv2.dct(block), compute_uv=False), np.linalg.svd(block, compute_uv=False), rtol=1e-5
    )


def test_top_singular_triplet_matches_svd():
    frames = smooth_video(64, 96, num_frames=2)
    blocks = _ll_blocks((frames @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.float32))
    # Add the hard cases: a zero block, equal singular values (slow power iteration) and a near-tie.
    special = np.stack([np.zeros((4, 4)), 100 * np.eye(4), np.diag([100.0, 99.9, 3.0, 1.0])]).astype(np.float32)
    blocks = np.concatenate([blocks.reshape(-1, 4, 4), special])
    s0, u0, v0 = _top_singular_triplet(blocks)
    np.testing.assert_allclose(s0, np.linalg.svd(blocks, compute_uv=False)[:, 0], atol=1e-2, rtol=1e-5)
    reconstructed = np.einsum("n,ni,nj->nij", s0, u0, v0)  # s0 u0 v0^T is the best rank-1 approximation
    assert np.allclose(np.einsum("nij,nij->n", blocks, reconstructed), s0**2, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(u0[-3], 0.5)  # zero block: uniform vectors, a change spreads evenly


@pytest.mark.parametrize("size", [512, 128, 64])
def test_invisible_and_exact_before_compression(size):
    frames = talking_head(size, num_frames=4)
    marked = embed_watermark(frames)
    assert marked.shape == frames.shape and marked.dtype == np.uint8
    assert psnr(frames, marked) >= 39.0  # measured 39.9 dB at 512, 40.2 at 128, 40.6 at 64
    result = detect_watermark(marked)
    assert result.found and result.bit_accuracy == 1.0 and result.num_frames == 4
    assert result.per_frame_accuracy.shape == (4,)
    # A single (H, W, 3) frame works too and gives the same pixels.
    np.testing.assert_array_equal(embed_watermark(frames[0]), marked[0])


def test_odd_size_leaves_the_border_alone():
    frames = smooth_video(67, 93, num_frames=2)
    marked = embed_watermark(frames)
    np.testing.assert_array_equal(marked[:, 64:], frames[:, 64:])  # rows past the last full 8x8 block
    np.testing.assert_array_equal(marked[:, :, 88:], frames[:, :, 88:])
    assert detect_watermark(marked).found


def test_tiny_frames_warn_and_are_not_detected():
    frames = smooth_video(32, 32, num_frames=2)  # 16 blocks < 48 bits
    with pytest.warns(UserWarning, match="fewer than the 48-bit payload"):
        marked = embed_watermark(frames)
    assert marked.shape == frames.shape
    assert not detect_watermark(marked).found


def test_bad_frames_are_rejected():
    with pytest.raises(EMOInputError, match="uint8 RGB"):
        embed_watermark(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(EMOInputError, match="uint8 RGB"):
        detect_watermark(np.zeros((64, 64), np.uint8))


def test_global_luma_offset_is_tolerated():
    """A decoder that shifts luma (swscale's yuv420p -> rgb24 darkens by ~1.2 levels) must not hide the mark."""
    marked = embed_watermark(smooth_video(128, 128, num_frames=4)).astype(np.int16)
    for offset in (-2, 2):
        assert detect_watermark(np.clip(marked + offset, 0, 255).astype(np.uint8)).found


def test_wrong_payload_is_not_found():
    marked = embed_watermark(smooth_video(128, 128, num_frames=4))
    result = detect_watermark(marked, payload=b"other!")
    assert not result.found and CHANCE_BAND[0] <= result.bit_accuracy <= CHANCE_BAND[1]


# --- through an mp4 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crf", [18, 23])
@pytest.mark.parametrize("size", [512, 256])
def test_survives_h264(tmp_path, crf, size):
    for name, frames in [("head", talking_head(size)), ("smooth", smooth_video(size, size))]:
        path = write_mp4(tmp_path / f"{name}.mp4", embed_watermark(frames), crf=crf)
        from_file = detect_watermark_in_file(path)
        from_rgb = detect_watermark(read_rgb(path))  # the usual rgb24 re-read, with its luma bias
        for result in (from_file, from_rgb):
            assert result.found, (name, crf, result)
            assert result.bit_accuracy >= 0.9, (name, crf, result)
            assert result.num_frames == NUM_FRAMES


@pytest.mark.parametrize("size", [64, 128])
def test_small_frames_survive_crf18(tmp_path, size):
    path = write_mp4(tmp_path / "small.mp4", embed_watermark(talking_head(size)), crf=18)
    result = detect_watermark_in_file(path)
    assert result.found and result.bit_accuracy >= 0.9, result


def test_unwatermarked_video_is_at_chance(tmp_path):
    contents = [talking_head(256), smooth_video(128, 128), np.full((NUM_FRAMES, 64, 64, 3), 128, np.uint8)]
    for i, frames in enumerate(contents):
        result = detect_watermark_in_file(write_mp4(tmp_path / f"clean{i}.mp4", frames, crf=18))
        assert not result.found
        assert CHANCE_BAND[0] <= result.bit_accuracy <= CHANCE_BAND[1], (i, result)


def test_max_frames_and_bad_files(tmp_path):
    path = write_mp4(tmp_path / "clip.mp4", embed_watermark(smooth_video(64, 64)))
    assert detect_watermark_in_file(path, max_frames=5).num_frames == 5
    with pytest.raises(EMOInputError, match="max_frames"):
        detect_watermark_in_file(path, max_frames=0)
    with pytest.raises(EMOInputError, match="missing.mp4"):
        detect_watermark_in_file(tmp_path / "missing.mp4")
    with pytest.raises(EMOInputError, match="no video stream"):
        detect_watermark_in_file(write_audio_only(tmp_path / "speech.m4a"))


def write_audio_only(path) -> str:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        samples = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def test_metadata_tag_round_trip(tmp_path):
    tagged = write_mp4(tmp_path / "tagged.mp4", smooth_video(64, 64, 2), metadata=AI_GENERATED_METADATA)
    assert read_ai_metadata(tagged) == AI_GENERATED_METADATA
    assert read_ai_metadata(write_mp4(tmp_path / "plain.mp4", smooth_video(64, 64, 2))) == {}
    with pytest.raises(EMOInputError, match="nowhere.mp4"):
        read_ai_metadata(tmp_path / "nowhere.mp4")


# --- keys and resynchronisation -------------------------------------------------------------------------------


def test_a_deployers_key_is_needed_to_find_its_mark_and_the_default_key_keeps_working(tmp_path, capsys, monkeypatch):
    frames = smooth_video(128, 128, num_frames=4)
    secret = embed_watermark(frames, key="deployer secret")
    assert detect_watermark(secret, key="deployer secret").found
    assert not detect_watermark(secret).found  # the public key does not see it
    assert not detect_watermark(secret, key="another secret").found
    public = embed_watermark(frames)
    assert detect_watermark(public).found and not detect_watermark(public, key="deployer secret").found
    monkeypatch.setenv("EMO_WATERMARK_KEY", "deployer secret")  # what a deployment sets once
    assert detect_watermark(embed_watermark(frames)).found and detect_watermark(secret).found
    path = write_mp4(tmp_path / "secret.mp4", secret)
    monkeypatch.delenv("EMO_WATERMARK_KEY")
    assert main(["detect", path]) == 1 and main(["detect", path, "--key", "deployer secret"]) == 0
    capsys.readouterr()
    with pytest.raises(EMOInputError, match="watermark key"):
        embed_watermark(frames, key="")


@pytest.mark.parametrize(
    ("change", "resync"),
    [
        (lambda f: f[:, :, ::-1], "horizontal flip"),
        (lambda f: np.clip(f.astype(np.int16) + 20, 0, 255).astype(np.uint8), ""),  # every bit flipped: inverted
        (lambda f: np.clip((f.astype(np.float32) - 128) * 1.2 + 128, 0, 255).round().astype(np.uint8), "gain"),
        (lambda f: np.stack([cv2.resize(x, (64, 64), interpolation=cv2.INTER_AREA) for x in f]), "rescaled to 128"),
    ],
    ids=["flip", "brightness", "contrast", "downscale"],
)
def test_resynchronisation_finds_the_mark_after_common_edits(change, resync):
    marked = embed_watermark(talking_head(128, num_frames=6))
    result = detect_watermark(change(marked))
    assert result.found and result.bit_accuracy >= 0.9 and resync in result.resync, result
    if resync:  # found only by undoing the edit
        assert not detect_watermark(change(marked), resync=False).found
    else:  # +20 grey levels move every block onto the other bit's lattice
        assert result.inverted


def test_resynchronisation_undoes_a_centre_crop():
    marked = embed_watermark(talking_head(256, num_frames=3))
    cropped = marked[:, 32:-32, 32:-32]  # 25% of each side: 192x192 left, the block grid and payload order lost
    assert not detect_watermark(cropped, resync=False).found
    result = detect_watermark(cropped)
    assert result.found and result.bit_accuracy >= 0.9 and "centre crop of 256x256 undone" in result.resync


def test_resynchronisation_keeps_clean_video_unflagged():
    rng = np.random.default_rng(1)
    for clip in (talking_head(96, num_frames=3), smooth_video(96, 96, num_frames=2)):
        for edit in (lambda f: f, lambda f: f[:, :, ::-1], lambda f: np.clip(f * 1.2, 0, 255).astype(np.uint8)):
            assert not detect_watermark(edit(clip)).found
    noise = rng.integers(0, 256, size=(3, 96, 96, 3), dtype=np.uint8)
    assert not detect_watermark(noise).found


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_exit_codes(tmp_path, capsys):
    frames = smooth_video(128, 128)
    marked = write_mp4(tmp_path / "marked.mp4", embed_watermark(frames), metadata=AI_GENERATED_METADATA)
    clean = write_mp4(tmp_path / "clean.mp4", frames)

    assert main(["detect", marked]) == 0
    out = capsys.readouterr().out
    assert "watermark: found" in out and "bit accuracy: 1.000" in out and "frames examined: 25" in out
    assert AI_GENERATED_METADATA["comment"] in out

    assert main(["detect", clean, "--max-frames", "10"]) == 1
    out = capsys.readouterr().out
    assert "watermark: not found" in out and "frames examined: 10" in out and "ai-generated metadata: none" in out

    missing = str(tmp_path / "missing.mp4")
    assert main(["detect", missing]) == 2
    assert missing in capsys.readouterr().err
    audio = write_audio_only(tmp_path / "speech.m4a")
    assert main(["detect", audio]) == 2
    assert audio in capsys.readouterr().err
    assert main(["detect", marked, "--max-frames", "0"]) == 2
    assert main([]) == 2

"""EMOPipeline: frame counts, clip chaining, determinism, guidance batching, schedulers, save/load, mp4 output."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from emo_pipeline import EMOInputError, EMOPipeline
from emo_pipeline.audio import window_audio_features
from emo_pipeline.pipeline_emo import SCHEDULERS, _AudioWindows
from emo_pipeline.testing import demo_assets, randomize_zero_initialized_layers, tiny_emo_pipeline

FPS, F, N = 25, 4, 2
IMAGE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
FACE_BOX = (16, 12, 48, 52)  # given by hand: these tests need no face detector


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(round(seconds * 16000)) * 0.1).astype(np.float32)


def settings(**overrides):
    base = {
        "height": 64,
        "width": 64,
        "fps": FPS,
        "num_frames_per_clip": F,
        "num_motion_frames": N,
        "num_inference_steps": 2,
        "face_box": FACE_BOX,
        "watermark": False,
        "generator": torch.Generator().manual_seed(0),
    }
    return {**base, **overrides}


@pytest.fixture
def pipe():
    pipe = tiny_emo_pipeline()
    randomize_zero_initialized_layers(pipe.unet)  # so motion frames, speed and the mask all act
    return pipe


def count_calls(module: torch.nn.Module) -> list:
    """A list that grows by one at every forward of `module` (a forward hook: counts real calls, however made)."""
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("seconds", [0.04, 0.1, 0.16, 0.33, 0.5])
def test_video_length_follows_the_audio_and_the_last_clip_is_trimmed(pipe, seconds):
    audio = speech(seconds)
    expected = math.ceil(Fraction(len(audio), 16000) * FPS)
    reference_net_calls = count_calls(pipe.reference_net)
    out = pipe(IMAGE, audio, **settings())
    assert out.frames.shape == (expected, 64, 64, 3)
    assert out.frames.dtype == np.float32 and 0 <= out.frames.min() and out.frames.max() <= 1
    clips = math.ceil(expected / F)
    assert pipe.last_plan.num_clips == clips
    assert len(reference_net_calls) == 1 + clips  # reference once per video, motion frames once per clip
    assert out.audio.shape == audio.shape and out.fps == FPS
    assert out.face_mask.shape == (64, 64)


def test_reference_net_calls_do_not_depend_on_steps(pipe):
    reference_net_calls = count_calls(pipe.reference_net)
    calls = []
    for steps in (1, 3):
        reference_net_calls.clear()
        pipe(IMAGE, speech(0.33), **settings(num_inference_steps=steps))
        calls.append(len(reference_net_calls))
    assert calls == [1 + 3, 1 + 3]


def test_same_seed_is_bit_identical_and_a_different_seed_differs(pipe):
    audio = speech(0.33)
    a = pipe(IMAGE, audio, **settings()).frames
    b = pipe(IMAGE, audio, **settings()).frames
    c = pipe(IMAGE, audio, **settings(generator=torch.Generator().manual_seed(1))).frames
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_batched_guidance_equals_two_separate_branch_calls(pipe):
    audio = speech(0.2)
    batched = pipe(IMAGE, audio, **settings(guidance_scale=3.5)).frames
    forward = pipe.unet.forward

    def one_branch_at_a_time(sample, timestep, audio_features, **kwargs):
        if sample.shape[0] == 1:
            return forward(sample, timestep, audio_features, **kwargs)
        outputs = [forward(s[None], timestep, a[None], **kwargs)[0] for s, a in zip(sample, audio_features)]
        return (torch.cat(outputs),)

    pipe.unet.forward = one_branch_at_a_time
    separate = pipe(IMAGE, audio, **settings(guidance_scale=3.5)).frames
    assert np.abs(batched - separate).max() < 1e-5  # float32 reordering only
    single = pipe(IMAGE, audio, **settings(guidance_scale=1.0)).frames
    assert np.abs(batched - single).max() > 1e-3  # guidance does something


def test_motion_frames_are_the_previous_clips_last_latents(pipe):
    seen = []
    pipe.reference_net.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    latents = pipe(IMAGE, speech(0.33), **settings(output_type="latent")).frames  # (1, 4, 3 clips * F, 8, 8)
    assert latents.shape == (1, 4, 3 * F, 8, 8)
    assert len(seen) == 4 and seen[0].shape == (1, 4, 8, 8)  # reference image, then one call per clip
    assert seen[1].shape == (1, N, 4, 8, 8) and not seen[1].any()  # first clip: zero maps
    for clip in (1, 2):
        previous = latents[:, :, clip * F - N : clip * F].permute(0, 2, 1, 3, 4)
        assert torch.equal(seen[clip + 1], previous)


def test_iter_clips_yields_what_call_returns(pipe):
    audio = speech(0.5)
    clips = list(pipe.iter_clips(IMAGE, audio, **settings()))
    assert [len(c) for c in clips] == [4, 4, 4, 1]
    assert np.array_equal(np.concatenate(clips), pipe(IMAGE, audio, **settings()).frames)


def test_bad_inputs_fail_when_iter_clips_is_called_not_later(pipe):
    with pytest.raises(EMOInputError, match="height"):
        pipe.iter_clips(IMAGE, speech(0.1), **settings(height=60, width=60))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedulers_generate_deterministically(pipe, name):
    pipe.set_scheduler(name)
    audio = speech(0.2)
    a = pipe(IMAGE, audio, **settings(num_inference_steps=3)).frames
    b = pipe(IMAGE, audio, **settings(num_inference_steps=3)).frames
    assert a.shape == (5, 64, 64, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b)
    assert type(pipe.scheduler) is SCHEDULERS[name]


def test_callback_sees_every_step_and_can_change_latents(pipe):
    calls = []

    def callback(p, step, timestep, tensors):
        calls.append((p.clip_index, step))
        return {"latents": tensors["latents"] * 0}

    out = pipe(IMAGE, speech(0.2), **settings(callback_on_step_end=callback, output_type="latent"))
    assert calls == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not out.frames.any()


def test_output_types(pipe):
    audio = speech(0.1)
    pil = pipe(IMAGE, audio, **settings(output_type="pil")).frames
    assert len(pil) == 3 and pil[0].size == (64, 64)
    pt = pipe(IMAGE, audio, **settings(output_type="pt")).frames
    assert pt.shape == (3, 3, 64, 64)
    np_frames = pipe(IMAGE, audio, **settings()).frames
    assert np.abs(pt.permute(0, 2, 3, 1).numpy() - np_frames).max() < 1e-6


def test_speed_face_mask_and_watermark_options(pipe):
    audio = speech(0.2)
    frames = 5
    base = pipe(IMAGE, audio, **settings()).frames
    constant = pipe(IMAGE, audio, **settings(speed=0.8)).frames
    per_frame = pipe(IMAGE, audio, **settings(speed=np.full(frames, 0.8))).frames
    assert np.array_equal(constant, per_frame)
    assert np.abs(constant - base).max() > 1e-4
    with pytest.raises(EMOInputError, match=r"speed must be a float or one value per video frame, shape \(5,\)"):
        pipe(IMAGE, audio, **settings(speed=np.zeros(7)))
    with pytest.raises(EMOInputError, match="speed must be finite and >= 0"):
        pipe(IMAGE, audio, **settings(speed=-1.0))
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[10:50, 20:40] = 1
    masked = pipe(IMAGE, audio, **settings(face_box=None, face_mask=mask))
    assert np.abs(masked.frames - base).max() > 1e-4
    marked = pipe(IMAGE, audio, **settings(watermark=True)).frames
    assert 0 < np.abs(marked - base).max() < 0.2


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"height": 64, "width": 128}, r"height \(64\) and width \(128\) must be equal"),
        ({"height": 60, "width": 60}, "multiple of 8"),
        ({"num_motion_frames": 5}, r"num_motion_frames must be an int in \[0, num_frames_per_clip = 4\]"),
        ({"num_frames_per_clip": 30, "num_motion_frames": 4}, r"= 34 exceeds .*motion_max_seq_length = 32"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"output_type": "gif"}, "output_type"),
        ({"fps": 0}, "fps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
    ],
)
def test_check_inputs_names_the_argument(pipe, overrides, pattern):
    with pytest.raises(EMOInputError, match=pattern):
        pipe(IMAGE, speech(0.1), **settings(**overrides))


def test_missing_face_says_how_to_pass_one(pipe):
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    with pytest.raises(EMOInputError, match="face_box"):
        pipe(blank, speech(0.1), **settings(face_box=None))


def test_streamed_audio_windows_equal_windowing_the_whole_track():
    features = torch.randn(23, 2, 3)
    chunks = iter(features.split([5, 1, 9, 8]))
    windows = _AudioWindows(chunks, num_frames=23, m=2)
    expected = window_audio_features(features, 2)
    for start in range(0, 23, 4):  # clips of 4, the last one padded past the end
        got = windows.window(start, start + 4)
        index = torch.arange(start, start + 4).clamp(max=22)
        assert torch.equal(got, expected[index])
    assert windows.buffer.shape[0] <= 4 + 2 * 2  # memory: only what the next windows can still reach


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.emo_metadata = {"base_model": "tiny-random"}
    pipe.save_pretrained(tmp_path / "emo")
    files = [p.relative_to(tmp_path / "emo").as_posix() for p in (tmp_path / "emo").rglob("*") if p.is_file()]
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".ckpt", ".pth"))]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights
    assert {"model_index.json", "README.md", "emo_metadata.json"} <= set(files)
    loaded = EMOPipeline.from_pretrained(tmp_path / "emo")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.emo_metadata == {"base_model": "tiny-random"}
    audio = speech(0.2)
    assert np.array_equal(loaded(IMAGE, audio, **settings()).frames, pipe(IMAGE, audio, **settings()).frames)

    from diffusers import DiffusionPipeline

    import emo_pipeline.pipeline_emo

    generic = DiffusionPipeline.from_pretrained(  # the documented route for diffusers' generic loader
        tmp_path / "emo", custom_pipeline=emo_pipeline.pipeline_emo.__file__, trust_remote_code=True
    )
    assert type(generic).__name__ == "EMOPipeline"


def test_write_video_streams_a_playable_watermarked_mp4(pipe, tmp_path):
    import av

    from emo_pipeline.watermark import detect_watermark_in_file, read_ai_metadata

    portrait, wav = demo_assets()
    path = pipe.write_video(tmp_path / "out.mp4", portrait, wav, **settings(face_box=None, watermark=True))
    expected = pipe.last_plan.num_frames
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        assert container.streams.audio, "audio stream missing"
        frames = sum(1 for _ in container.decode(video=0))
        assert frames == expected and float(video.average_rate) == FPS
        audio_seconds = float(container.streams.audio[0].duration * container.streams.audio[0].time_base)
    assert abs(audio_seconds - expected / FPS) < 0.05
    assert detect_watermark_in_file(path).found
    assert read_ai_metadata(path)


def test_interrupted_write_leaves_no_file(pipe, tmp_path):
    def interrupt(p, step, timestep, tensors):
        if p.clip_index == 1:
            raise KeyboardInterrupt
        return {}

    target = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        pipe.write_video(target, IMAGE, speech(0.5), **settings(callback_on_step_end=interrupt))
    assert list(tmp_path.iterdir()) == []


def test_runs_in_bfloat16_after_to_dtype(pipe):
    pipe.to(torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.reference_net.dtype == torch.bfloat16
    frames = pipe(IMAGE, speech(0.2), **settings()).frames
    assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.float32 and np.isfinite(frames).all()

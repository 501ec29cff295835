"""EMOPipeline: frame counts, clip chaining, determinism, guidance, schedulers, callbacks, signatures, LoRA, dtypes,
save/load, mp4 output."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import functools
import inspect
import math
import pydoc
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_settings import FACE_BOX, FPS, IMAGE, F, N, settings, speech

from emo_pipeline import EMOInputError, EMOPipeline
from emo_pipeline.audio import FeatureWindows, iter_audio_features, num_video_frames, window_audio_features
from emo_pipeline.face import prepare_portrait
from emo_pipeline.models.attention import ReferenceFeatures
from emo_pipeline.pipeline_emo import SCHEDULERS, GenerationSettings
from emo_pipeline.testing import demo_assets, randomize_zero_initialized_layers, tiny_emo_pipeline


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

    def one_branch_at_a_time(sample, timestep, audio_tokens, **kwargs):  # tokens (B*F, T, C), clip-encoded
        if sample.shape[0] == 1:
            return forward(sample, timestep, audio_tokens=audio_tokens, **kwargs)
        outputs = [
            forward(s[None], timestep, audio_tokens=a, **kwargs)[0] for s, a in zip(sample, audio_tokens.chunk(2))
        ]
        return (torch.cat(outputs),)

    pipe.unet.forward = lambda sample, timestep, audio_tokens=None, **kwargs: one_branch_at_a_time(
        sample, timestep, audio_tokens, **kwargs
    )
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
    windows = FeatureWindows(chunks, num_frames=23, m=2)
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


# (dtype, relative L2 error bound on each clip's latents, max frame error): bfloat16 keeps 8 significant bits, float16
# 11 (measured: 1.2-1.3 % / 0.03 and 0.12-0.14 % / 0.0036).
HALF_PRECISION = [(torch.bfloat16, 0.03, 0.07), (torch.float16, 0.004, 0.01)]


@pytest.mark.parametrize(("dtype", "latent_bound", "frame_bound"), HALF_PRECISION, ids=["bf16", "fp16"])
def test_half_precision_output_is_close_to_float32(pipe, dtype, latent_bound, frame_bound):
    audio = speech(0.33)  # 3 clips: the error must not grow along the clip chain
    latents32 = pipe(IMAGE, audio, **settings(output_type="latent")).frames
    frames32 = pipe.decode_latents(latents32).numpy()
    pipe.to(dtype)
    assert pipe.unet.dtype == pipe.reference_net.dtype == pipe.vae.dtype == dtype
    latents16 = pipe(IMAGE, audio, **settings(output_type="latent")).frames
    assert latents16.dtype == torch.float32  # the scheduler's latents stay float32 (tests/test_fastpath.py)
    frames16 = pipe.decode_latents(latents16).numpy()  # the bf16 VAE
    assert frames16.shape == (12, 3, 64, 64) and frames16.dtype == np.float32
    # bfloat16: each rounding is off by up to 2**-8 = 0.4%; measured 1.2-1.3% relative (L2) error in every clip's
    # latents and at most 0.03 (7/255) in the frames. The bounds leave 2-3x margin; noise that depended on the dtype,
    # a fp32/half mix-up in the guidance or the clip chain, or a cast that loses the seed's noise would give errors
    # of order 100%.
    for clip in range(3):
        a, b = latents32[:, :, clip * F : (clip + 1) * F], latents16[:, :, clip * F : (clip + 1) * F]
        assert (b - a).norm() / a.norm() < latent_bound, clip
    assert np.abs(frames16 - frames32).max() < frame_bound


# --- guidance, schedulers and callbacks, checked against the pieces the pipeline is made of ---------------------


def record_backbone(pipe) -> list[dict]:
    """Each backbone call's audio tokens `(B*F, T, C)`, output and conditioning, from a forward hook."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append({"audio": kwargs["audio_tokens"].clone(), "output": output[0].clone(), "kwargs": kwargs})

    pipe.unet.register_forward_hook(hook, with_kwargs=True)
    return calls


def record_scheduler_steps(pipe) -> list[torch.Tensor]:
    """The `model_output` each `scheduler.step` receives (the step itself runs unchanged)."""
    outputs = []
    step = pipe.scheduler.step

    @functools.wraps(step)  # keeps the signature: the pipeline still sees which kwargs (eta, generator) it takes
    def recording_step(model_output, *args, **kwargs):
        outputs.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    return outputs


def test_guidance_is_u_plus_s_times_c_minus_u_with_u_the_zero_audio_branch(pipe):
    calls, steps = record_backbone(pipe), record_scheduler_steps(pipe)
    pipe(IMAGE, speech(0.2), **settings(guidance_scale=3.5, num_inference_steps=3))
    assert len(calls) == len(steps) == 2 * 3  # 2 clips x 3 steps, one backbone call each
    for call, model_output in zip(calls, steps):
        assert call["output"].shape[0] == 2  # both branches in one batch
        no_audio, audio = call["audio"].chunk(2)  # tokens of [zero audio features, the clip's audio]
        silence = pipe.unet.audio_proj(torch.zeros(1, F, *pipe.unet.audio_proj.expected_feature_shape))
        torch.testing.assert_close(no_audio, silence)
        assert (audio - silence).abs().max() > 1e-3
        u, c = call["output"].chunk(2)
        torch.testing.assert_close(model_output, u + 3.5 * (c - u), rtol=1e-6, atol=1e-6)

    calls.clear(), steps.clear()
    pipe(IMAGE, speech(0.2), **settings(guidance_scale=1.0, num_inference_steps=3))
    for call, model_output in zip(calls, steps):  # no guidance: the audio branch alone
        assert call["output"].shape[0] == 1 and call["audio"].shape[0] == F
        assert torch.equal(model_output, call["output"])


def written_out_clip_loop(pipe, audio: np.ndarray, num_inference_steps: int, guidance_scale: float = 3.5):
    """EMO's clip loop written out from the pipeline's public pieces (portrait preparation, `encode_image`,
    `reference_net`, wav2vec2 features, `unet`), with a fresh scheduler for every clip. Returns `(1, 4, N, h, w)`."""
    device, num_frames = torch.device("cpu"), num_video_frames(len(audio), 16000, FPS)
    portrait = prepare_portrait(IMAGE, size=64, face_box=FACE_BOX)
    pipe.audio_encoder.eval()
    features = torch.cat(list(iter_audio_features(audio, pipe.audio_encoder, pipe.feature_extractor, FPS, num_frames)))
    windows = window_audio_features(features, pipe.audio_window)  # (num_frames, 2m+1, L, D)
    reference = pipe.reference_net(pipe.encode_image(portrait.image, device, torch.float32))
    face_mask = torch.from_numpy(portrait.mask)[None, None]
    generator = torch.Generator().manual_seed(0)
    motion_latents = torch.zeros(1, N, 4, 8, 8)  # the first clip's motion frames: zero maps
    clips = []
    for start in range(0, num_frames, F):
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        step_kwargs = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
        motion = pipe.reference_net(motion_latents).temporal
        conditioning = {"reference_features": ReferenceFeatures(reference.spatial, motion), "face_mask": face_mask}
        clip_audio = windows[torch.arange(start, start + F).clamp(max=num_frames - 1)][None]  # past the end: last
        both_branches = torch.cat([torch.zeros_like(clip_audio), clip_audio])
        latents = torch.randn((1, 4, F, 8, 8), generator=generator) * scheduler.init_noise_sigma
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
            output = pipe.unet(model_input, timestep, both_branches, **conditioning, return_dict=False)[0]
            u, c = output.chunk(2)
            noise = u + guidance_scale * (c - u)
            latents = scheduler.step(noise, timestep, latents, generator=generator, **step_kwargs).prev_sample
        clips.append(latents)
        motion_latents = latents[:, :, F - N :].permute(0, 2, 1, 3, 4)
    return torch.cat(clips, dim=2)


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
@torch.no_grad()
def test_pipeline_equals_the_clip_loop_written_out_with_a_fresh_scheduler_per_clip(pipe, name):
    pipe.set_scheduler(name)  # DPM-Solver++ keeps a history of model outputs: it must restart with every clip
    audio = speech(0.33)
    latents = pipe(IMAGE, audio, **settings(output_type="latent", num_inference_steps=3)).frames
    assert latents.shape == (1, 4, 3 * F, 8, 8)
    assert torch.equal(latents, written_out_clip_loop(pipe, audio, num_inference_steps=3))


def test_callbacks_see_diffusers_call_properties_and_can_change_guidance(pipe):
    calls, steps, seen = record_backbone(pipe), record_scheduler_steps(pipe), []

    def callback(p, step, timestep, tensors):
        seen.append((p.clip_index, step, p.num_timesteps, p.guidance_scale, p.do_classifier_free_guidance))
        if step == 0:  # clip 0: stronger guidance for its other steps; clip 1: none
            p._guidance_scale = 7.0 if p.clip_index == 0 else 1.0
        return {}

    pipe(IMAGE, speech(0.2), **settings(guidance_scale=3.5, num_inference_steps=3, callback_on_step_end=callback))
    assert seen == [
        (0, 0, 3, 3.5, True), (0, 1, 3, 7.0, True), (0, 2, 3, 7.0, True),
        (1, 0, 3, 3.5, True), (1, 1, 3, 1.0, False), (1, 2, 3, 1.0, False),
    ]  # fmt: skip
    scales = [3.5, 7.0, 7.0, 3.5, None, None]  # every clip starts with the caller's guidance_scale
    for call, model_output, scale in zip(calls, steps, scales, strict=True):
        if scale is None:
            assert call["output"].shape[0] == 1 and torch.equal(model_output, call["output"])
        else:
            u, c = call["output"].chunk(2)
            torch.testing.assert_close(model_output, u + scale * (c - u), rtol=1e-6, atol=1e-6)
    assert pipe.guidance_scale == 1.0 and pipe.num_timesteps == 3 and not pipe.interrupt


def test_a_diffusers_pipeline_callback_cuts_guidance_off_by_num_timesteps(pipe):
    from diffusers.callbacks import PipelineCallback

    class AudioGuidanceCutoff(PipelineCallback):  # as diffusers' SDCFGCutoffCallback, for EMO's audio guidance
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
                pipeline._guidance_scale = 0.0
            return callback_kwargs

    calls = record_backbone(pipe)
    cutoff = AudioGuidanceCutoff(cutoff_step_ratio=0.5)
    pipe(IMAGE, speech(0.2), **settings(num_inference_steps=4, callback_on_step_end=cutoff))
    assert [call["output"].shape[0] for call in calls] == [2, 2, 2, 1] * 2  # set after step 2, in every clip


def test_callback_motion_latents_become_the_clips_motion_frames(pipe):
    audio = speech(0.33)
    baseline = pipe(IMAGE, audio, **settings(num_inference_steps=3))
    calls, reference_net_calls = record_backbone(pipe), count_calls(pipe.reference_net)

    def restart_motion(p, step, timestep, tensors):
        assert tensors["motion_latents"].shape == (1, N, 4, 8, 8) and tensors["latents"].shape == (1, 4, F, 8, 8)
        if p.clip_index == 1 and step == 0:
            return {"motion_latents": torch.zeros_like(tensors["motion_latents"])}
        return tensors  # unchanged tensors: nothing to redo

    frames = pipe(
        IMAGE,
        audio,
        **settings(
            num_inference_steps=3,
            callback_on_step_end=restart_motion,
            callback_on_step_end_tensor_inputs=["latents", "motion_latents"],
        ),
    ).frames
    assert len(reference_net_calls) == 1 + 3 + 1  # the replaced motion frames went through the ReferenceNet
    zero_motion = pipe.reference_net(torch.zeros(1, N, 4, 8, 8)).temporal

    def saw_zero_motion(call: dict) -> bool:
        temporal = call["kwargs"]["reference_features"].temporal
        return all(torch.equal(temporal[name], zero_motion[name]) for name in zero_motion)

    # 3 clips x 3 steps: clip 1's step 0 ran with clip 0's last latents, its steps 1 and 2 with the new zero maps.
    assert [saw_zero_motion(call) for call in calls] == [True] * 3 + [False, True, True] + [False] * 3
    assert np.array_equal(frames[:F], baseline.frames[:F])
    assert np.abs(frames[F : 2 * F] - baseline.frames[F : 2 * F]).max() > 1e-3


def test_interrupt_stops_after_the_current_step_and_returns_the_clips_so_far(pipe):
    audio = speech(0.5)  # 13 frames: 4 clips
    full = pipe(IMAGE, audio, **settings(num_inference_steps=3)).frames
    calls = record_backbone(pipe)

    def stop(p, step, timestep, tensors):
        if p.clip_index == 1 and step == 0:
            p._interrupt = True
        return {}

    frames = pipe(IMAGE, audio, **settings(num_inference_steps=3, callback_on_step_end=stop)).frames
    assert len(calls) == 3 + 1  # clip 0 in full, one step of clip 1, nothing after
    assert frames.shape == (2 * F, 64, 64, 3)  # clip 1 as it stood (partly denoised, as in diffusers)
    assert np.array_equal(frames[:F], full[:F]) and pipe.interrupt
    assert np.array_equal(pipe(IMAGE, audio, **settings(num_inference_steps=3)).frames, full)  # reset per call


def test_interrupted_write_video_holds_the_clips_so_far_with_audio_to_match(pipe, tmp_path):
    import av

    def stop(p, step, timestep, tensors):
        p._interrupt = p.clip_index == 1
        return {}

    path = pipe.write_video(tmp_path / "out.mp4", IMAGE, speech(0.5), **settings(callback_on_step_end=stop))
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 2 * F
        audio = container.streams.audio[0]
        assert abs(float(audio.duration * audio.time_base) - 2 * F / FPS) < 0.05


def test_callback_must_return_a_dict(pipe):
    with pytest.raises(TypeError, match="callback_on_step_end must return a dict"):
        pipe(IMAGE, speech(0.1), **settings(callback_on_step_end=lambda *args: None))
    with pytest.raises(EMOInputError, match="callback_on_step_end must be callable"):
        pipe(IMAGE, speech(0.1), **settings(callback_on_step_end="latents"))


# --- signatures and documentation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "own"),
    [
        ("__call__", ["image", "audio", "return_dict"]),
        ("iter_clips", ["image", "audio"]),
        ("write_video", ["output_path", "image", "audio", "crf", "c2pa_signer"]),
    ],
)
def test_signature_and_help_show_every_argument_with_its_default(pipe, method, own):
    fields = [field for field in dataclasses.fields(GenerationSettings) if field.metadata.get("keyword", True)]
    signature = inspect.signature(getattr(pipe, method))
    # A weight family's own settings (Hallo's mode, ...) are documented with the family, not in every signature.
    assert list(signature.parameters) == own + [field.name for field in fields] + ["family_settings"]
    assert signature.parameters["family_settings"].kind is inspect.Parameter.VAR_KEYWORD
    assert "mode" not in signature.parameters and "face_embedding" not in signature.parameters
    for field in fields:
        parameter = signature.parameters[field.name]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default == field.default
    assert signature.parameters["height"].default == 512 and signature.parameters["guidance_scale"].default == 3.5
    text = pydoc.render_doc(getattr(pipe, method), renderer=pydoc.plaintext)
    assert "guidance_scale: float = 3.5" in text and "num_inference_steps: int = 40" in text  # the signature line
    documented = re.findall(r"^ {8}(\w+): \S", text.split("Args:", 1)[1], re.M)
    expected = own + [field.name for field in fields] + ["family_settings"]
    assert documented == expected  # one entry per argument, in signature order


def test_readme_argument_table_names_every_argument():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = re.search(r"\| argument \| default \| meaning \|\n(.*?)\n\n", readme, re.S).group(1)
    named = set(re.findall(r"`(\w+)`", "\n".join(row.split(" | ")[0] for row in table.splitlines())))
    from emo_pipeline.families import all_families

    arguments = {"image", "audio", "return_dict", "crf", "family_settings", "c2pa_signer"} | {
        field.name for field in dataclasses.fields(GenerationSettings) if field.metadata.get("keyword", True)
    }
    for family in all_families():  # each family's own settings, in the row that names the family
        if family.settings is not None:
            arguments |= {field.name for field in dataclasses.fields(family.settings)}
    assert named == arguments


def test_unknown_or_positional_settings_are_type_errors_naming_them(pipe):
    with pytest.raises(TypeError, match=r"__call__\(\): got an unexpected keyword argument 'num_inference_step'"):
        pipe(IMAGE, speech(0.1), num_inference_step=2)
    with pytest.raises(TypeError, match="iter_clips"):
        pipe.iter_clips(IMAGE, speech(0.1), 64, 64)  # settings are keyword-only


# --- write_video with "pt" frames on an accelerator ------------------------------------------------------------


class AcceleratorTensor(torch.Tensor):
    """A CPU tensor that acts like a CUDA one where it matters here: `.numpy()` raises CUDA's error until `.cpu()`
    returns a plain tensor. Lets a CPU-only test catch a `.numpy()` without `.cpu()`."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor first.")

    def cpu(self, *args, **kwargs):
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.cpu(self, *args, **kwargs).as_subclass(torch.Tensor)


def test_write_video_moves_pt_frames_to_the_cpu(pipe, tmp_path, monkeypatch):
    from emo_pipeline.media import read_video_frames

    decode = pipe.decode_latents
    monkeypatch.setattr(pipe, "decode_latents", lambda *a, **k: decode(*a, **k).as_subclass(AcceleratorTensor))
    audio = speech(0.2)
    clips = list(pipe.iter_clips(IMAGE, audio, **settings(output_type="pt")))
    assert all(isinstance(clip, AcceleratorTensor) for clip in clips)  # "pt" frames stay where the VAE put them
    with pytest.raises(TypeError, match="cuda"):
        clips[0].numpy()
    written = read_video_frames(pipe.write_video(tmp_path / "pt.mp4", IMAGE, audio, **settings(output_type="pt")))
    assert written.shape == (5, 64, 64, 3)
    from_np = read_video_frames(pipe.write_video(tmp_path / "np.mp4", IMAGE, audio, **settings(output_type="np")))
    # The same frames reached the encoder. (Two encodes of the same frames can differ by ~0.3 levels on average:
    # x264's threads are not bit-reproducible here, so equal files are not asked for.)
    assert np.abs(written.astype(np.float32) - from_np).mean() < 1.5


# --- LoRA on the backbone (peft) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_state_dict() -> dict[str, torch.Tensor]:
    """A random LoRA for the tiny backbone in diffusers' format, as `save_lora_weights` writes it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from emo_pipeline.testing import tiny_emo_models

    _, donor = tiny_emo_models()
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in donor.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (no effect); a trained LoRA has not
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(donor))
    return {f"unet.{key}": value for key, value in layers.items()}


def test_lora_fuse_unfuse_set_adapters_and_delete_act_on_the_backbone(pipe, lora_state_dict):
    from peft.tuners.tuners_utils import BaseTunerLayer

    generator = torch.Generator().manual_seed(0)
    sample, audio = torch.randn(1, 4, F, 8, 8, generator=generator), torch.randn(1, F, 5, 2, 32, generator=generator)

    @torch.no_grad()
    def backbone() -> torch.Tensor:
        return pipe.unet(sample, 500, audio, return_dict=False)[0]

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    base = backbone()
    weight = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.clone()
    pipe.load_lora_weights(dict(lora_state_dict), adapter_name="style")
    adapted = backbone()
    assert (adapted - base).abs().max() > 1e-2
    lora_layers = [module for module in pipe.unet.modules() if isinstance(module, BaseTunerLayer)]

    pipe.fuse_lora()  # diffusers' default also names a text encoder; EMO's is the backbone alone
    assert all(layer.merged for layer in lora_layers)
    close(backbone(), adapted)  # the update is in the weights now: same output
    pipe.unfuse_lora()
    assert not any(layer.merged for layer in lora_layers)
    close(backbone(), adapted)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    close(layer.base_layer.weight, weight)  # unfusing restored the original weight

    pipe.set_adapters("style", 0.0)
    close(backbone(), base)
    pipe.set_adapters("style", 0.5)
    half = backbone()
    assert (half - base).abs().max() > 1e-3 and (half - adapted).abs().max() > 1e-3
    pipe.set_adapters("style", 1.0)
    close(backbone(), adapted)

    pipe.delete_adapters("style")
    assert pipe.get_list_adapters() in ({}, {"unet": []})
    close(backbone(), base)

"""EchoMimic weights: parity with EchoMimic's own code (goldens from tests/goldens/make_echomimic_goldens.py), the
release-layout converter (`emo-convert --echomimic`), bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from echomimic_goldens import (
    GOLDEN,
    golden_call,
    golden_models,
    golden_pipeline,
    metadata,
    outputs,
    pose_golden,
    release_state_dicts,
    write_release,
)
from pipeline_settings import diffusers_log

from emo_pipeline.echomimic import ECHOMIMIC_VARIANTS, reference_latents
from emo_pipeline.echomimic_conversion import load_echomimic_pipeline
from emo_pipeline.echomimic_inputs import (
    convert_whisper_checkpoint,
    echomimic_face_crop,
    echomimic_frame_count,
    whisper_features,
    whisper_frame_tokens,
)
from emo_pipeline.errors import EMOInputError
from emo_pipeline.families.echomimic import echomimic_context_windows
from emo_pipeline.pipeline_emo import SCHEDULERS


@pytest.fixture(scope="module")
def whisper():
    return convert_whisper_checkpoint(release_state_dicts()["whisper"])


@pytest.fixture(scope="module")
def models():
    return golden_models()


# ------------------------------------------------------------------------------------------------- front end


def test_whisper_features_match_echomimics_whisper_fork(whisper):
    out = outputs()
    features = whisper_features(out["audio"].numpy(), whisper)
    torch.testing.assert_close(features, out["whisper_feature"], atol=1e-5, rtol=0)
    frames = echomimic_frame_count(features.shape[0], metadata()["fps"])
    assert frames == out["whisper_chunks"].shape[0] == metadata()["runs"]["audio"]["frames"]
    tokens = whisper_frame_tokens(features, range(frames), metadata()["fps"])
    torch.testing.assert_close(tokens, out["whisper_chunks"], atol=1e-5, rtol=0)


def test_whisper_features_of_a_40s_track_are_two_segments_normalised_over_the_track(whisper):
    audio = outputs()["audio"].numpy()
    track = np.concatenate([audio] * 31)[: 40 * 16000]
    features = whisper_features(track, whisper)
    assert list(features.shape) == metadata()["long_whisper_feature_shape"]
    stride = metadata()["long_whisper_stride"]
    torch.testing.assert_close(features[::stride], outputs()["long_whisper_feature"], atol=1e-5, rtol=0)


def test_face_crop_and_mask_are_echomimics():
    out, meta = outputs(), metadata()
    crop, mask = echomimic_face_crop(out["portrait_bgr"].numpy(), meta["face_box"], meta["size"], meta["size"])
    np.testing.assert_array_equal(crop, out["face_img_bgr"].numpy())
    np.testing.assert_array_equal(mask, out["face_mask"].numpy())
    # one pixel of box difference moves the crop: the box must be EchoMimic's (MTCNN) or given
    shifted = list(meta["face_box"])
    shifted[0] += 1.0
    assert not np.array_equal(echomimic_face_crop(out["portrait_bgr"].numpy(), shifted, 96, 96)[0], crop)


def test_context_windows_are_echomimics():
    for run in metadata()["runs"].values():
        windows = echomimic_context_windows(run["frames"])
        shifted = [[[(c + 2 * step) % run["frames"] for c in w] for w in windows] for step in range(run["steps"])]
        assert shifted == run["windows"]
    assert len(echomimic_context_windows(28)) == 4  # starts 0, 9, 18, 27 (the last wraps)
    assert echomimic_context_windows(7) == [list(range(7))]


# ---------------------------------------------------------------------------------------------- teacher forced


@pytest.mark.parametrize("run", ["audio", "acc"])
def test_teacher_forced_predictions_match_echomimic(models, run):
    """Every window of the first and last step, from EchoMimic's own step inputs: both guidance branches."""
    models, vae = models
    out, meta = outputs(), metadata()
    settings = meta["runs"][run]
    crop = out["face_img_bgr"].numpy()[:, :, ::-1]
    reference = models.encode_reference(reference_latents(vae, crop))
    face = models.face_features(out["face_mask"].float()[None, None] / 255.0)
    guided = settings["cfg"] > 1
    per_step = len(settings["windows"][0])
    for step in (0, settings["steps"] - 1):
        sample = out[f"{run}/step0/sample"] if step == 0 else out[f"{run}/step{step - 1}/prev"]
        timestep = out[f"{run}/timesteps"][step]
        for index, frames in enumerate(settings["windows"][step]):
            tokens = whisper_frame_tokens(out["whisper_feature"], frames, meta["fps"])
            inputs = models.guidance_inputs(tokens, face, guided)
            prediction = models.predict(sample[:, :, frames], timestep, reference, inputs)
            expected = out[f"{run}/call{step * per_step + index}/pred"]
            assert prediction.shape == expected.shape == (2 if guided else 1, 4, 12, 12, 12)
            # fp32 float noise of the two implementations (op order, BLAS blocking): up to 1.0e-5 seen on 1 of 6912
            # values of magnitude 0.74 (1 thread); the bound is 1e-5 absolute plus 1e-5 relative
            torch.testing.assert_close(prediction, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- whole videos


@pytest.mark.parametrize("run", ["audio", "acc"])
def test_parity_mode_reproduces_echomimics_latents_and_frames(run):
    """The pipeline (front end, the core loop, EchoMimic's windows and CFG<=1 rule) on EchoMimic's inputs: every
    step's latents and the decoded frames."""
    out, meta = outputs(), metadata()
    pipe = golden_pipeline(acc=run == "acc")
    steps = []

    def record(pipe, step, timestep, tensors):
        steps.append(tensors["latents"].clone())
        return {}

    frames = golden_call(pipe, run, mode="parity", callback_on_step_end=record).frames
    assert len(steps) == meta["runs"][run]["steps"] and frames.shape[0] == meta["runs"][run]["frames"]
    for step, latents in enumerate(steps):
        torch.testing.assert_close(latents, out[f"{run}/step{step}/prev"], atol=1e-4, rtol=0)
    torch.testing.assert_close(frames[:: meta["frame_stride"]], out[f"{run}/frames"], atol=1e-4, rtol=0)


def test_cfg_at_most_one_sums_windows_only_in_plain_parity_mode():
    """EchoMimic's plain pipeline without guidance sums overlapping predictions; fast mode averages them."""
    pipe = golden_pipeline(acc=False)
    short = {"num_inference_steps": 1, "guidance_scale": 1.0, "output_type": "latent"}
    parity = golden_call(pipe, "audio", mode="parity", **short).frames
    fast = golden_call(pipe, "audio", mode="fast", **short).frames
    assert (parity - fast).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------- conversion


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """EchoMimic's pretrained_weights/ at the goldens' size, with every variant's files."""
    return write_release(tmp_path_factory.mktemp("pretrained_weights"))


def test_emo_convert_echomimic_gives_a_pipeline_close_to_echomimic(release, tmp_path):
    """The converted acc folder in fast mode (keys/values once, no fp16 bank rounding): within 2e-4 of
    EchoMimic's frames (3.4e-5 measured; parity mode: 8.5e-6, test above)."""
    from emo_pipeline import EMOPipeline
    from emo_pipeline.cli.convert import main

    output = tmp_path / "echomimic-acc"
    assert main(["--echomimic", str(release), "--variant", "acc", "--output", str(output)]) == 0
    card = (output / "README.md").read_text()
    assert "Apache-2.0" in card and "github.com/antgroup/echomimic" in card
    with diffusers_log() as records:  # whisper's encoder is a type the pipeline takes: no "Expected types" warning
        pipe = EMOPipeline.from_pretrained(output)
    assert not [r.getMessage() for r in records if "Expected types" in r.getMessage()]
    assert type(pipe.family).__name__ == "EchoMimicFamily"
    assert type(pipe.scheduler).__name__ == "EchoMimicAccScheduler"
    assert pipe.emo_metadata["generation_defaults"]["num_inference_steps"] == 6
    assert str(release) not in json.dumps(pipe.emo_metadata)  # portable: no absolute path
    frames = golden_call(pipe, "acc", mode="fast").frames
    difference = (frames[:: metadata()["frame_stride"]] - outputs()["acc/frames"]).abs().max()
    assert 0 < difference < 2e-4


@pytest.mark.parametrize("variant", ["audio", "pose", "pose_acc"])
def test_every_variant_converts(release, variant):
    pipe = load_echomimic_pipeline(release, variant)
    channels = ECHOMIMIC_VARIANTS[variant]["face_channels"]
    assert pipe.unet.face_locator.config.in_channels == channels
    assert pipe.emo_metadata["variant"] == variant and pipe.emo_metadata["license"] == "apache-2.0"
    if channels == 3:  # the pose variants need their driving video (tests below generate with one)
        with pytest.raises(EMOInputError, match="pass pose_video="):
            golden_call(pipe, "acc")


def _broken_release(release, tmp_path):
    copy = tmp_path / "pretrained_weights"
    shutil.copytree(release, copy)
    return copy


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda root: (root / "denoising_unet.pth").unlink(), "denoising_unet.pth"),
        (
            lambda root: (root / "motion_module.pth").write_bytes((root / "motion_module.pth").read_bytes()[:999]),
            "motion_module.pth",
        ),
        (
            lambda root: torch.save(
                {
                    "dims": {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 512, "n_audio_head": 8},
                    "model_state_dict": {},
                },
                root / "audio_processor" / "whisper_tiny.pt",
            ),
            "not whisper-tiny",
        ),
        (
            lambda root: torch.save(
                {"denoising_unet.conv_in.weight": torch.zeros(1), "audioproj.proj1.weight": torch.zeros(1)},
                root / "face_locator.pth",
            ),
            "Hallo's net.pth",
        ),
    ],
)
def test_bad_release_files_are_named_exit_2_nothing_written(release, tmp_path, capsys, damage, named):
    from emo_pipeline.cli.convert import main

    root = _broken_release(release, tmp_path)
    damage(root)
    output = tmp_path / "out"
    assert main(["--echomimic", str(root), "--output", str(output)]) == 2
    assert named in capsys.readouterr().err
    assert not output.exists()


def test_other_families_settings_are_refused():
    pipe = golden_pipeline()
    with pytest.raises(EMOInputError, match="Hallo"):
        golden_call(pipe, "audio", motion_scale=(1.0, 0.5, 1.0))
    with pytest.raises(EMOInputError, match="speed"):
        golden_call(pipe, "audio", speed=1.0)
    pipe.set_scheduler("dpm++")
    with pytest.raises(EMOInputError, match="parity"):
        golden_call(pipe, "audio", mode="parity")


# ------------------------------------------------------------------------------------------- pose variants


def _write_pose_video(path, frames, fps=12):
    from emo_pipeline.media import VideoWriter

    with VideoWriter(path, fps=fps) as writer:
        writer.write(np.stack(frames))
    return str(path)


@pytest.fixture(scope="module")
def pose_video(tmp_path_factory):
    """The pose golden's 3 driving faces cycled: 18 frames at 12 fps (1.5 s, longer than the golden's 1.3 s track);
    output frame i at 24 fps takes pose frame i // 2."""
    frames = pose_golden()["frames"]
    return _write_pose_video(tmp_path_factory.mktemp("pose") / "pose.mp4", [frames[i % 3] for i in range(18)])


@pytest.fixture(scope="module")
def pose_pipe(release):
    pipe = load_echomimic_pipeline(release, "pose")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pose_call(pipe, run="audio", **kwargs):
    """12 frames (the first 20 whisper steps), 2 steps, latents."""
    features = outputs()["whisper_feature"][:20]
    options = {"num_inference_steps": 2, "output_type": "latent", "whisper_features": features, **kwargs}
    return golden_call(pipe, run, **options).frames


def test_pose_variant_generates_from_each_frames_landmarks(pose_pipe, pose_video):
    """pose (CFG 2.5): each step the face locator sees the renders of its window's frames, output frame i taking pose
    frame i // 2 (12 fps under 24 fps), the window shifted by 3 frames per step as in EchoMimic's pose pipelines;
    parity mode differs from fast mode only by EchoMimic's fp16 reference bank."""
    from emo_pipeline.echomimic_pose import frame_landmarks, render_poses
    from emo_pipeline.media import read_video_frames

    seen = []
    hook = pose_pipe.unet.face_locator.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    try:
        latents = _pose_call(pose_pipe, pose_video=pose_video)
    finally:
        hook.remove()
    assert latents.shape == (1, 4, 12, 12, 12) and torch.isfinite(latents).all()
    landmarks = np.stack(frame_landmarks(read_video_frames(pose_video, [i // 2 for i in range(12)])))
    renders = render_poses(landmarks, 96, 96)
    assert renders.amax() > 0 and len(seen) == 2  # 2 steps x 1 window
    torch.testing.assert_close(seen[0], renders, atol=0, rtol=0)
    torch.testing.assert_close(seen[1], renders[[(i + 3) % 12 for i in range(12)]], atol=0, rtol=0)
    parity = _pose_call(pose_pipe, pose_video=pose_video, mode="parity")
    assert 0 < (parity - latents).abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["pose", "pose_acc"])
def test_parity_mode_reproduces_echomimics_pose_pipelines(release, pose_pipe, variant):
    """EchoMimic's own pose pipelines (goldens: make_echomimic_pose_golden.py --pipelines) on the audio goldens'
    networks and inputs, output frame i conditioned on the extractor's landmarks of driving frame i % 3 (given as
    pose_landmarks=): every frame's final latents (and one decoded frame) within 1e-4 (measured: pose 2.6e-5, frame
    1.4e-5; pose_acc 1.1e-5; fast mode 6.0e-5 / 2.3e-5)."""
    from safetensors.torch import load_file

    golden = load_file(str(GOLDEN / "pose_pipelines.safetensors"))
    pipe = pose_pipe if variant == "pose" else load_echomimic_pipeline(release, "pose_acc")
    pipe.set_progress_bar_config(disable=True)
    expected = golden[f"{variant}/latents"]
    landmarks = pose_golden()["landmarks"]
    pose = landmarks[[i % len(landmarks) for i in range(expected.shape[2])]]
    final = []

    def record(pipe, step, timestep, tensors):
        final[:] = [tensors["latents"].clone()]
        return {}

    run = "audio" if variant == "pose" else "acc"  # 5 steps at CFG 2.5; 6 steps at CFG 1.0
    frames = golden_call(pipe, run, mode="parity", pose_landmarks=pose, callback_on_step_end=record).frames
    torch.testing.assert_close(final[0], expected, atol=1e-4, rtol=0)
    if variant == "pose":
        torch.testing.assert_close(frames[16], golden["pose/frame16"], atol=1e-4, rtol=0)


def test_offloading_pose_weights_gives_the_plain_latents(release, pose_pipe, pose_video):
    """Under offload hooks the per-frame renders go into the backbone's forward raw (encoded and zeroed for the
    uncond row there): the same latents."""
    expected = _pose_call(pose_pipe, pose_video=pose_video, num_inference_steps=1)
    pipe = load_echomimic_pipeline(release, "pose")
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    latents = _pose_call(pipe, pose_video=pose_video, num_inference_steps=1)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=0)


def test_pose_acc_converts_and_emo_animate_writes_a_video(release, pose_video, tmp_path, capsys):
    """emo-convert --variant pose_acc, then emo-animate --pose-video: the whole track's frames in the mp4."""
    import cv2

    from emo_pipeline.cli.animate import main as animate
    from emo_pipeline.cli.convert import main as convert
    from emo_pipeline.media import read_video_info

    model = tmp_path / "echomimic-pose-acc"
    assert convert(["--echomimic", str(release), "--variant", "pose_acc", "--output", str(model)]) == 0
    image, audio = tmp_path / "portrait.png", tmp_path / "speech.wav"
    cv2.imwrite(str(image), outputs()["portrait_bgr"].numpy())
    _write_wav(audio, outputs()["audio"].numpy())
    box = ",".join(str(v) for v in metadata()["face_box"])
    args = ["--model", str(model), "--image", str(image), "--audio", str(audio), "--height", "96", "--steps", "1"]
    args += ["--face-box", box, "--no-progress", "--no-watermark", "--fps", "24"]
    output = tmp_path / "out.mp4"
    assert animate([*args, "--pose-video", pose_video, "--output", str(output)]) == 0
    frames = read_video_info(output).num_frames
    assert frames == echomimic_frame_count(whisper_features(outputs()["audio"].numpy(), _whisper()).shape[0], 24)
    # a pose video shorter than the track: exit 2, named, nothing written
    short = _write_pose_video(tmp_path / "short.mp4", list(pose_golden()["frames"][:2]))
    output = tmp_path / "short_out.mp4"
    capsys.readouterr()
    assert animate([*args, "--pose-video", short, "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert "pose_video" in error and "is shorter than the audio" in error
    assert not output.exists()


def _write_wav(path, samples, rate=16000):
    import wave

    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def _whisper():
    return convert_whisper_checkpoint(release_state_dicts()["whisper"])


def test_bad_pose_inputs_are_named(pose_pipe, pose_video, tmp_path):
    from emo_pipeline.testing import tiny_emo_pipeline

    frames = pose_golden()["frames"]
    grey = np.full_like(frames[0], 90)
    cases = {
        "does not exist": str(tmp_path / "missing.mp4"),
        "pose_video: video file": str(tmp_path / "text.mp4"),
        "no face found in any of its 6 frames": _write_pose_video(tmp_path / "grey.mp4", [grey] * 6),
        r"no face found in 2 of its 6 frames used: frames 1 \(0.08 s\), 4 \(0.33 s\)": _write_pose_video(
            tmp_path / "gaps.mp4", [frames[0], grey, frames[1], frames[2], grey, frames[0]]
        ),
        r"shorter than the audio: it has 4 frames at 12 fps \(0.33 s\), the video needs 12 frames": _write_pose_video(
            tmp_path / "short.mp4", [frames[0]] * 4
        ),
    }
    (tmp_path / "text.mp4").write_text("not a video")
    for message, path in cases.items():
        with pytest.raises(EMOInputError, match=message):
            _pose_call(pose_pipe, pose_video=path)
    with pytest.raises(EMOInputError, match=r"pose_landmarks must be \(N >= 12 frames, >= 478, 2 or 3\)"):
        _pose_call(pose_pipe, pose_landmarks=np.zeros((11, 478, 2)))
    with pytest.raises(EMOInputError, match="pass pose_video or pose_landmarks, not both"):
        _pose_call(pose_pipe, pose_video=pose_video, pose_landmarks=np.zeros((12, 478, 2)))
    with pytest.raises(EMOInputError, match="pose_video= drives EchoMimic's pose variants only"):
        _short_call(golden_pipeline(), pose_video=pose_video)
    with pytest.raises(EMOInputError, match=r"\['pose_video'\] apply to EchoMimic weights only"):
        tiny_emo_pipeline()("portrait.png", "speech.wav", pose_video=pose_video)


# ------------------------------------------------------------------------------------ what the loop guarantees


def _short_call(pipe, **kwargs):
    """One window (the first 20 whisper steps: 12 frames), 2 steps."""
    features = outputs()["whisper_feature"][:20]
    options = {"num_inference_steps": 2, "output_type": "latent", "whisper_features": features, **kwargs}
    return golden_call(pipe, "audio", **options).frames


@pytest.fixture(scope="module")
def audio_pipe():
    pipe = golden_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs_on_echomimic_weights_in_fast_mode(audio_pipe, name):
    default = audio_pipe.scheduler
    try:
        audio_pipe.set_scheduler(name)
        latents = _short_call(audio_pipe, mode="fast", eta=0.3)
    finally:
        audio_pipe.scheduler = default
    assert latents.shape == (1, 4, 12, 12, 12) and torch.isfinite(latents).all()


@pytest.mark.parametrize("offload", ["model", "group_leaf"])
def test_offloading_echomimic_weights_gives_the_plain_latents(audio_pipe, offload):
    """Under offload hooks the whisper tokens and face features (zeroed for the uncond row) are encoded inside the
    backbone's forward and the reference keys/values are not cached: the same latents."""
    expected = _short_call(audio_pipe, mode="fast")
    pipe = golden_pipeline()
    cpu = torch.device("cpu")
    if offload == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.enable_group_offload(
            offload_type="leaf_level", onload_device=cpu, offload_device=cpu, num_blocks_per_group=1
        )
    torch.testing.assert_close(_short_call(pipe, mode="fast"), expected, atol=1e-4, rtol=0)


def test_without_a_face_box_parity_needs_echomimics_detector_and_fast_mode_finds_the_face(audio_pipe):
    """MTCNN (facenet-pytorch) is EchoMimic's detector; without it parity mode asks for face_box=, fast mode takes
    mediapipe's box."""
    from emo_pipeline.testing import demo_assets

    image, _ = demo_assets()
    features = outputs()["whisper_feature"][:20]
    options = {"height": 96, "width": 96, "num_inference_steps": 1, "output_type": "latent", "watermark": False}
    options["whisper_features"] = features
    audio = outputs()["audio"].numpy()
    try:
        import facenet_pytorch  # noqa: F401
    except Exception:
        with pytest.raises(EMOInputError, match="face_box"):
            audio_pipe(str(image), audio, mode="parity", **options)
    latents = audio_pipe(str(image), audio, mode="fast", **options).frames
    assert latents.shape == (1, 4, 12, 12, 12)
    box = audio_pipe.last_plan.portrait.face_box
    assert box[2] > box[0] and box[3] > box[1]

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
    release_state_dicts,
)
from pipeline_settings import diffusers_log
from safetensors.torch import save_file

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
    root = tmp_path_factory.mktemp("pretrained_weights")
    parts = release_state_dicts()
    denoiser = parts["denoising_unet"]
    motion = {k: v for k, v in denoiser.items() if "motion_modules" in k}
    for variant in ECHOMIMIC_VARIANTS.values():
        torch.save(parts["reference_unet"], root / variant["reference_unet"])
        # motion module file = the trained values perturbed: denoising_unet.pth must win (EchoMimic's load order)
        torch.save({k: v + 1.0 for k, v in motion.items()}, root / variant["motion_module"])
        torch.save(denoiser, root / variant["denoising_unet"])
        locator = dict(parts["face_locator"])
        if variant["face_channels"] == 3:
            locator["conv_in.weight"] = locator["conv_in.weight"].repeat(1, 3, 1, 1) / 3
        torch.save(locator, root / variant["face_locator"])
    base = root / "sd-image-variations-diffusers" / "unet"
    base.mkdir(parents=True)
    shutil.copy(GOLDEN / "unet_config.json", base / "config.json")
    save_file(
        {k: v.contiguous() for k, v in parts["reference_unet"].items()},
        str(base / "diffusion_pytorch_model.safetensors"),
    )
    _, vae = golden_models()
    vae.save_pretrained(root / "sd-vae-ft-mse")
    (root / "audio_processor").mkdir()
    whisper = parts["whisper"]
    decoder = {"decoder.token_embedding.weight": torch.zeros(8, 384)}
    checkpoint = {"dims": whisper["dims"], "model_state_dict": {**whisper["model_state_dict"], **decoder}}
    torch.save(checkpoint, root / "audio_processor" / "whisper_tiny.pt")
    return root


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
    if channels == 3:  # generation from landmark renders (pose_video=) is not there yet: refused with a message
        with pytest.raises(EMOInputError, match="pose"):
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

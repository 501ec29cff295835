"""Hallo / Hallo2 weights through EMOPipeline: `emo-convert --hallo` on a release-layout folder, both sampling modes,
the pipeline's outputs against the goldens made from Hallo's own code, and the errors on a bad folder.

The release folder is built at tiny size from the committed goldens (tests/goldens/hallo: net.pth in the released
layout, the tiny VAE and wav2vec2), laid out as Hallo's `pretrained_models/`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hallo_goldens import GOLDENS, golden, golden_conditioning, half_size_conditioning
from pipeline_settings import diffusers_log

from emo_pipeline.cli.convert import main as convert
from emo_pipeline.errors import EMOInputError
from emo_pipeline.hallo import HalloConditioning
from emo_pipeline.hallo_conversion import HALLO_LAYOUT
from emo_pipeline.testing import demo_assets

SIZE = 64  # the front-end runs (portrait + track); the golden runs use the goldens' own size
GOLDEN_SIZE = json.loads((GOLDENS / "hallo" / "metadata.json").read_text())["size"]


def make_release_folder(root: Path, net_path: str = HALLO_LAYOUT["net"]) -> Path:
    """Hallo's `pretrained_models/` at tiny size: net.pth, SD's UNet config, the VAE, wav2vec2, the motion module."""
    hallo = GOLDENS / "hallo"
    (root / net_path).parent.mkdir(parents=True)
    shutil.copy(hallo / "net.pth", root / net_path)
    (root / HALLO_LAYOUT["unet_config"]).parent.mkdir(parents=True)
    shutil.copy(hallo / "unet" / "config.json", root / HALLO_LAYOUT["unet_config"])
    shutil.copytree(hallo / "vae", root / HALLO_LAYOUT["vae"])
    shutil.copytree(hallo / "wav2vec" / "model", root / HALLO_LAYOUT["wav2vec"])
    # AnimateDiff's file holds the motion modules that net.pth overwrites (same keys without `denoising_unet.`)
    state = torch.load(root / net_path, map_location="cpu", weights_only=True)
    motion = {k.removeprefix("denoising_unet."): v for k, v in state.items() if ".motion_modules." in k}
    (root / HALLO_LAYOUT["motion_module"]).parent.mkdir(parents=True)
    torch.save(motion, root / HALLO_LAYOUT["motion_module"])
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return make_release_folder(tmp_path_factory.mktemp("pretrained_models"))


@pytest.fixture(scope="module")
def converted(release: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("converted") / "hallo-emo"
    assert convert(["--hallo", str(release), "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def pipe(converted: Path):
    from emo_pipeline import EMOPipeline

    pipe = EMOPipeline.from_pretrained(converted)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, conditioning: HalloConditioning, **kwargs):
    options = {"num_inference_steps": 3, "height": GOLDEN_SIZE, "width": GOLDEN_SIZE, "output_type": "pt"}
    options["watermark"] = False
    options["generator"] = torch.Generator().manual_seed(42)
    return pipe(None, None, hallo_conditioning=conditioning, **{**options, **kwargs}).frames


def test_converted_folder_is_a_hallo_pipeline_with_hallos_defaults_and_card(converted: Path, pipe) -> None:
    assert pipe.is_hallo and pipe.identity_proj is not None
    metadata = json.loads((converted / "emo_metadata.json").read_text())
    assert metadata["family"] == "hallo" and "fudan-generative-vision/hallo" in metadata["source"]
    assert metadata["generation_defaults"]["num_frames_per_clip"] == 16
    assert "all overwritten by net.pth" in metadata["converted_from"]["motion_module"]
    card = (converted / "README.md").read_text()
    assert "MIT" in card and "terms of use are the upstream project's" in card and "non-commercial" in card
    assert "fudan-generative-vision/hallo" in card
    from emo_pipeline import EMOPipeline

    with diffusers_log() as records:  # the components' types are the pipeline's (no "Expected types ..." warning)
        EMOPipeline.from_pretrained(converted)
    assert not [r.getMessage() for r in records if "Expected types" in r.getMessage()]


def test_parity_mode_reproduces_hallos_own_video(pipe) -> None:
    """Free-running from Hallo's seed through the converted pipeline (f = 16, n = 2 from the pipeline's Hallo
    defaults, not passed): both clips within twice Hallo's own float-noise floor (tests/goldens/hallo/README.md)."""
    data = golden("hallo")
    meta, outputs = data["meta"], data["outputs"]
    frames = run(pipe, golden_conditioning(data["inputs"], meta["audio_length"]), mode="parity")
    assert frames.shape == (meta["audio_length"], 3, GOLDEN_SIZE, GOLDEN_SIZE)
    for clip in range(meta["num_clips"]):
        expected = outputs[f"frames_clip{clip}"][0].permute(1, 0, 2, 3)
        floor = meta["float_noise_floor"][f"frames_clip{clip}"]
        torch.testing.assert_close(frames[clip * 16 : (clip + 1) * 16], expected, atol=2 * floor, rtol=0)


def test_fast_mode_runs_the_reference_net_on_new_inputs_only_and_stays_near_parity(pipe) -> None:
    """Fast: the portrait through the ReferenceNet once per video plus the motion frames once per clip (parity: the
    whole bank per clip); clip 0 has the same motion frames in both modes, so it differs by float32-vs-float16 bank
    rounding only. Clip 1's motion frames skip the VAE round trip (with this random tiny VAE the round trip is far
    from the identity, so clip 1 differs much more than it would with SD's VAE)."""
    data = golden("hallo")  # at the goldens' 128 px: at 64 px the 1x1 deepest level turns the bank rounding into 1e-2
    conditioning = golden_conditioning(data["inputs"], data["meta"]["audio_length"])
    batches = []
    hook = pipe.reference_net.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[:2]))
    try:
        parity = run(pipe, conditioning, mode="parity")
        parity_calls, batches[:] = list(batches), []
        fast = run(pipe, conditioning, mode="fast")
    finally:
        hook.remove()
    assert parity_calls == [(2, 3), (2, 3)]  # [source, 2 motion frames] x 2 guidance copies, every clip
    assert batches == [(2, 1), (2, 2), (2, 2)]  # the source once, then each clip's 2 motion frames
    first = (fast[:16] - parity[:16]).abs().max().item()
    assert first < 5e-4, first  # seen 8.5e-5 (1.7e-3 at 64 px)
    assert torch.isfinite(fast).all() and (fast[16:] - parity[16:]).abs().mean() < 0.1


def test_hallo2_converted_with_net_option_reproduces_hallo2s_masked_long_video_loop(release: Path, tmp_path) -> None:
    """`--net hallo2/net.pth` (the same networks) and Hallo2's motion-frame masking in parity mode."""
    from emo_pipeline import EMOPipeline

    root = tmp_path / "pretrained_models"
    shutil.copytree(release, root)
    (root / "hallo2").mkdir()
    (root / HALLO_LAYOUT["net"]).rename(root / "hallo2" / "net.pth")
    assert convert(["--hallo", str(root), "--net", "hallo2/net.pth", "--output", str(tmp_path / "out")]) == 0
    pipe = EMOPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.emo_metadata["family"] == "hallo2"
    data = golden("hallo2")
    meta = data["meta"]
    conditioning = golden_conditioning(data["inputs"], meta["audio_length"])
    frames = run(pipe, conditioning, mode="parity", motion_frame_mask_rate=0.25)
    for clip in range(meta["num_clips"]):
        expected = data["outputs"][f"frames_clip{clip}"][0].permute(1, 0, 2, 3)
        floor = meta["float_noise_floor"][f"frames_clip{clip}"]
        torch.testing.assert_close(frames[clip * 16 : (clip + 1) * 16], expected, atol=2 * floor, rtol=0)


def test_callbacks_see_the_latents_and_can_interrupt(pipe) -> None:
    data = golden("hallo")
    conditioning = half_size_conditioning(data["inputs"], data["meta"]["audio_length"])
    seen = []

    def stop_after_first_step(p, step, timestep, tensors):
        seen.append((p.clip_index, step, tuple(tensors["latents"].shape)))
        p._interrupt = True
        return {}

    frames = run(pipe, conditioning, callback_on_step_end=stop_after_first_step, height=SIZE, width=SIZE)
    assert seen == [(0, 0, (1, 4, 16, SIZE // 8, SIZE // 8))]
    assert frames.shape[0] == 16  # the clip in progress is returned as it stands, then generation stops

    def zero_latents(p, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if step == p.num_timesteps - 1 else {}

    zeroed = run(
        pipe,
        conditioning,
        callback_on_step_end=zero_latents,
        num_inference_steps=1,
        output_type="latent",
        height=SIZE,
        width=SIZE,
    )
    assert torch.equal(zeroed, torch.zeros_like(zeroed))


def test_settings_of_the_other_family_are_refused(pipe) -> None:
    data = golden("hallo")
    conditioning = golden_conditioning(data["inputs"], data["meta"]["audio_length"])
    with pytest.raises(EMOInputError, match="not available with Hallo weights"):
        run(pipe, conditioning, speed=0.3)
    with pytest.raises(EMOInputError, match="use it with mode='parity'"):
        run(pipe, conditioning, mode="fast", motion_frame_mask_rate=0.25)
    with pytest.raises(EMOInputError, match="decoder='vae'"):
        run(pipe, conditioning, mode="parity", decoder="tiny")
    with pytest.raises(EMOInputError, match="mode must be one of"):
        run(pipe, conditioning, mode="exact")
    with pytest.raises(EMOInputError, match="motion_scale must be three finite numbers"):
        run(pipe, conditioning, motion_scale=1.0)
    with pytest.raises(EMOInputError, match="fps must be a whole number"):
        run(pipe, conditioning, fps=29.97)
    with pytest.raises(EMOInputError, match="height/width"):
        run(pipe, conditioning, height=2 * GOLDEN_SIZE, width=2 * GOLDEN_SIZE)
    portrait, _ = demo_assets()
    with pytest.raises(EMOInputError, match="face_analysis_dir= .* or face_embedding="):
        pipe(portrait, np.zeros(16000, dtype=np.float32), height=SIZE, width=SIZE, face_analysis_dir=None)


def test_hallo_settings_on_emo_weights_are_refused() -> None:
    from emo_pipeline.testing import tiny_emo_pipeline

    refused = r"\['mode'\] apply to Hallo / Hallo2 or EchoMimic weights only; \['motion_scale'\] apply to Hallo / "
    with pytest.raises(EMOInputError, match=refused):
        tiny_emo_pipeline()("portrait.png", np.zeros(16000, dtype=np.float32), mode="parity", motion_scale=(1, 2, 1))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_vae", "sd-vae-ft-mse is missing"),
        ("truncated_net", "cannot read Hallo checkpoint"),
        ("foreign_motion_module", "not in net.pth"),
    ],
)
def test_a_bad_release_folder_exits_2_naming_the_file_and_writes_nothing(
    release: Path, tmp_path, capsys, damage: str, message: str
) -> None:
    root = tmp_path / "pretrained_models"
    shutil.copytree(release, root)
    if damage == "no_vae":
        shutil.rmtree(root / HALLO_LAYOUT["vae"])
    elif damage == "truncated_net":
        net = root / HALLO_LAYOUT["net"]
        net.write_bytes(net.read_bytes()[: net.stat().st_size // 2])
    else:
        motion = torch.load(root / HALLO_LAYOUT["motion_module"], weights_only=True)
        motion["down_blocks.0.motion_modules.0.extra.weight"] = torch.zeros(1)
        torch.save(motion, root / HALLO_LAYOUT["motion_module"])
    output = tmp_path / "out"
    assert convert(["--hallo", str(root), "--output", str(output)]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists() and not list(tmp_path.glob("out.partial-*"))


def test_hallo_and_sd15_sources_are_exclusive(tmp_path, capsys) -> None:
    assert convert(["--hallo", str(tmp_path), "--sd15", "x", "--output", str(tmp_path / "o")]) == 2
    assert "pass one of --hallo DIR, --echomimic DIR, or both --sd15 and --wav2vec2" in capsys.readouterr().err


def test_a_portrait_and_a_track_go_through_hallos_front_end_into_an_mp4(pipe, converted: Path, tmp_path) -> None:
    """The whole path with the converted folder: face crop, landmarks -> Hallo's masks, wav2vec2 interpolated before
    its transformer, both modes, streamed to an mp4 (the insightface embedding passed, no models offline)."""
    import wave

    import av

    from emo_pipeline.cli.animate import main as animate

    portrait, full_speech = demo_assets()
    speech = tmp_path / "speech.wav"  # the demo track's first 0.7 s: 18 frames, 2 clips
    with wave.open(str(full_speech)) as source, wave.open(str(speech), "wb") as target:
        target.setparams(source.getparams())
        target.writeframes(source.readframes(int(source.getframerate() * 0.7)))
    embedding = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    settings = {"height": SIZE, "width": SIZE, "num_inference_steps": 1, "face_embedding": embedding}
    path = pipe.write_video(tmp_path / "fast.mp4", portrait, speech, **settings)
    plan = pipe.last_plan
    assert plan.num_frames == 18 and plan.num_clips == 2  # ceil(0.7 s * 25); 16 frames per clip (Hallo's default)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 18 and container.streams.audio
    np.save(tmp_path / "embedding.npy", embedding)
    output = tmp_path / "parity.mp4"
    code = animate(
        ["--model", str(converted), "--image", str(portrait), "--audio", str(speech), "--output", str(output)]
        + [
            "--height",
            str(SIZE),
            "--steps",
            "1",
            "--mode",
            "parity",
            "--face-embedding",
            str(tmp_path / "embedding.npy"),
        ]
        + ["--no-progress"]
    )
    assert code == 0 and output.is_file()
    missing = tmp_path / "missing.mp4"
    code = animate(
        ["--model", str(converted), "--image", str(portrait), "--audio", str(speech), "--output", str(missing)]
        + ["--height", str(SIZE), "--steps", "1", "--no-progress"]
    )
    assert code == 2 and not missing.exists()  # no face embedding and no insightface models: exit 2, no file


def test_audio_features_in_chunks_give_the_same_video_and_serve_one_generation(pipe) -> None:
    """Long audio: the features may come as chunks (Hallo2's segments) consumed as the clips need them."""
    data = golden("hallo")
    whole = half_size_conditioning(data["inputs"], data["meta"]["audio_length"])
    features = whole.audio_features
    chunked = half_size_conditioning(data["inputs"], data["meta"]["audio_length"])
    chunked.audio_features, chunked.audio_frames = iter(features.split([10, 13, 9])), features.shape[0]
    small = {"num_inference_steps": 1, "height": SIZE, "width": SIZE}
    expected = run(pipe, whole, **small)
    assert torch.equal(run(pipe, chunked, **small), expected)
    with pytest.raises(EMOInputError, match="consumed by an earlier generation"):
        run(pipe, chunked, **small)


def test_a_converted_folder_works_after_being_moved_and_stores_nothing_of_the_machine(
    converted: Path, release: Path, tmp_path
) -> None:
    """Portable: convert, move the folder elsewhere, load, generate. No path of the converting machine is stored
    (the insightface models and the vocal separator are given at call time), and vocal separation is off."""
    from emo_pipeline import EMOPipeline

    stored = "".join(p.read_text() for p in converted.rglob("*.json")) + (converted / "README.md").read_text()
    assert str(release) not in stored and str(converted) not in stored and str(Path.home()) not in stored
    metadata = json.loads((converted / "emo_metadata.json").read_text())
    assert "face_analysis_dir" not in metadata["generation_defaults"]
    assert not any(key in metadata["generation_defaults"] for key in ("audio_separator_model", "vocal_separation"))
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    moved = shutil.move(copy, tmp_path / "elsewhere" / "hallo-emo")
    pipe = EMOPipeline.from_pretrained(moved)
    pipe.set_progress_bar_config(disable=True)
    data = golden("hallo")
    frames = run(pipe, half_size_conditioning(data["inputs"], 16), num_inference_steps=1, height=SIZE, width=SIZE)
    assert frames.shape == (16, 3, SIZE, SIZE) and torch.isfinite(frames).all()


def test_bad_face_analysis_vocal_separation_and_sampler_inputs_exit_2_naming_them(pipe, converted, tmp_path, capsys):
    """A face-analysis folder that is missing or lacks a model, a vocal-separation model that does not exist, a
    sampler parity mode cannot use: EMOInputError naming it (before any work), exit 2 from the CLI, no file."""
    from emo_pipeline.cli.animate import main as animate

    portrait, speech = demo_assets()
    audio = np.zeros(16000, dtype=np.float32)
    with pytest.raises(EMOInputError, match=r"face analysis folder .*no-such-dir.* does not exist"):
        pipe(portrait, audio, height=SIZE, width=SIZE, face_analysis_dir=tmp_path / "no-such-dir")
    partial = tmp_path / "face_analysis"
    (partial / "models").mkdir(parents=True)
    (partial / "models" / "scrfd_10g_bnkps.onnx").write_bytes(b"x")
    with pytest.raises(EMOInputError, match=r"lacks them .*glintr100.onnx"):
        pipe(portrait, audio, height=SIZE, width=SIZE, face_analysis_dir=partial)
    embedding = np.zeros(512, dtype=np.float32)
    with pytest.raises(EMOInputError, match=r"vocal_separation model .*Kim_Vocal_2.onnx.* does not exist"):
        pipe(portrait, audio, height=SIZE, width=SIZE, face_embedding=embedding, vocal_separation="Kim_Vocal_2.onnx")
    cases = [
        (["--face-analysis-dir", str(partial)], "glintr100.onnx"),
        (["--face-analysis-dir", str(partial.parent)], "face analysis folder"),
        (["--vocal-separation", str(tmp_path / "Kim_Vocal_2.onnx"), "--face-analysis-dir", str(partial)], "onnx"),
        (["--mode", "parity", "--scheduler", "dpm++", "--face-analysis-dir", str(partial)], "mode='parity'"),
    ]
    for index, (options, message) in enumerate(cases):
        output = tmp_path / f"out{index}.mp4"
        code = animate(
            ["--model", str(converted), "--image", str(portrait), "--audio", str(speech), "--output", str(output)]
            + ["--height", str(SIZE), "--steps", "1", "--no-progress", *options]
        )
        assert code == 2 and message in capsys.readouterr().err and not output.exists(), options


def test_vocal_separation_is_opt_in_and_runs_at_the_tracks_own_rate(pipe, tmp_path, monkeypatch) -> None:
    """Hallo separates the vocals of the file as it is (here 44.1 kHz), then resamples them to 16 kHz; without
    `vocal_separation` nothing is separated."""
    import wave

    from emo_pipeline import hallo_inputs

    rate, seconds = 44100, 0.5
    samples = (np.random.default_rng(0).standard_normal(int(rate * seconds)) * 3000).astype(np.int16)
    track = tmp_path / "speech.wav"
    with wave.open(str(track), "wb") as file:
        file.setnchannels(1), file.setsampwidth(2), file.setframerate(rate), file.writeframes(samples.tobytes())
    model = tmp_path / "Kim_Vocal_2.onnx"
    model.write_bytes(b"stand-in")
    calls = []

    def separate(audio, sample_rate, model_dir, model_name, *, output_sample_rate=None):
        calls.append((len(audio), sample_rate, Path(model_dir) / model_name, output_sample_rate))
        return np.zeros(int(seconds * output_sample_rate), dtype=np.float32)

    monkeypatch.setattr(hallo_inputs, "separate_vocals", separate)
    portrait, _ = demo_assets()
    options = {"height": SIZE, "width": SIZE, "num_inference_steps": 1, "output_type": "latent", "watermark": False}
    options["face_embedding"] = np.zeros(512, dtype=np.float32)
    pipe(portrait, track, **options)
    assert calls == []  # opt-in
    pipe(portrait, track, vocal_separation=model, **options)
    assert calls == [(int(rate * seconds), rate, model, 16000)]


@pytest.mark.parametrize("mode", ["fast", "parity"])
def test_the_modes_front_end_encodes_the_track_as_the_mode_says(pipe, monkeypatch, mode) -> None:
    """Long audio: fast mode's wav2vec2 runs in bounded chunks (flat memory), parity mode over the whole track as
    Hallo does; the pipeline hands its mode to the audio front end."""
    from emo_pipeline import hallo_inputs

    modes, original = [], hallo_inputs.iter_hallo_audio_features

    def recording(*args, **kwargs):
        modes.append(kwargs.get("mode", "parity"))
        return original(*args, **kwargs)

    monkeypatch.setattr(hallo_inputs, "iter_hallo_audio_features", recording)
    portrait, _ = demo_assets()
    options = {"height": SIZE, "width": SIZE, "num_inference_steps": 1, "output_type": "latent", "watermark": False}
    pipe(portrait, np.zeros(8000, dtype=np.float32), mode=mode, face_embedding=np.zeros(512, np.float32), **options)
    assert modes == [mode]

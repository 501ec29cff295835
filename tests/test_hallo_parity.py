"""Hallo's released checkpoint layout runs in EMO's model classes with Hallo's numbers (network-level parity).

The tiny golden `net.pth` (tests/goldens/hallo, made from Hallo's own code by tests/goldens/make_hallo_goldens.py)
is loaded through `emo_pipeline.hallo` into `ReferenceNet`, `EMOUNet3DConditionModel` (audio modules, per-frame
temporal norm, ...) and `IdentityProjection`; every network's output is compared with what Hallo computed.
Denoiser outputs are compared teacher-forced (golden latents and reference latents in, one step out), as the
goldens' README prescribes: Hallo rounds its reference bank to float16, so float noise flips roundings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from hallo_goldens import golden_conditioning, golden_reference
from safetensors.torch import load_file

from emo_pipeline.errors import EMOInputError
from emo_pipeline.hallo import (
    HALLO_PREFIXES,
    HalloModels,
    convert_hallo_state_dict,
    load_hallo_models,
    load_hallo_state_dict,
    load_hallo_weights,
)

GOLDENS = Path(__file__).parent / "goldens" / "hallo"
FRAMES = 16
# Our own ReferenceNet's bank, rounded to float16 as Hallo's reader does, against Hallo's step 0: float noise flips
# a float16 rounding now and then (8.0e-6 seen), so 2e-5; a float32 bank instead gives 5.8e-5.
FIRST_STEP_ATOL = 2e-5
# Teacher-forced steps: each fed Hallo's own inputs of that step (its latents and its reference bank as its reader
# rounds it), so only float32 noise separates the two (2.4e-6 seen on predictions of std ~0.4).
STEP_ATOL = 1e-5
# Golden runs stepped through in full: {folder: clips}. hallo_motion_scale: motion_scale (1.0, 0.6, 1.4), one clip.
GOLDEN_RUNS = {"hallo": 2, "hallo_motion_scale": 1}
_LOADED: dict[str, dict] = {}


def _golden_run(variant: str) -> dict:
    """meta, inputs, outputs and the reference bank of one golden run (loaded once per session)."""
    if variant not in _LOADED:
        folder = GOLDENS.parent / variant
        _LOADED[variant] = {
            "meta": json.loads((folder / "metadata.json").read_text()),
            "inputs": load_file(folder / "inputs.safetensors"),
            "outputs": load_file(folder / "outputs.safetensors"),
            "bank": load_file(folder / "reference_bank.safetensors"),
        }
    return _LOADED[variant]


def _conditioning(models: HalloModels, inputs: dict) -> dict:
    return {
        "id_tokens": models.identity_tokens(inputs["face_emb"]),
        "face": models.face_features(inputs["face_region"][None]),
        "masks": {
            level: tuple(inputs[f"{kind}_mask_{level}"] for kind in ("full", "face", "lip")) for level in range(4)
        },
    }


@pytest.fixture(scope="module")
def golden() -> dict:
    return _golden_run("hallo")


@pytest.fixture(scope="module")
def models() -> HalloModels:
    return load_hallo_models(GOLDENS / "net.pth", GOLDENS / "unet" / "config.json", audio_dim=32)


@pytest.fixture(scope="module")
def conditioning(models: HalloModels, golden: dict) -> dict:
    return _conditioning(models, golden["inputs"])


def test_every_key_of_the_released_layout_finds_its_place() -> None:
    state = torch.load(GOLDENS / "net.pth", map_location="cpu", weights_only=True)
    converted = convert_hallo_state_dict(state)
    placed = sum(len(part) for part in converted.values())
    # everything but the second attention block's copy of each temporal position table (diffusers keeps one)
    duplicates = [k for k in state if ".attention_blocks.1.pos_encoder.pe" in k]
    assert placed == len(state) - len(duplicates)
    assert {k.split(".")[0] + "." for k in state} == set(HALLO_PREFIXES)


def test_identity_audio_and_face_locator_match_hallo(models: HalloModels, golden: dict, conditioning: dict) -> None:
    inputs, outputs = golden["inputs"], golden["outputs"]
    torch.testing.assert_close(conditioning["id_tokens"], outputs["id_tokens"], atol=1e-5, rtol=0)
    for clip in range(2):
        windows = inputs["audio_emb_windowed"][clip * FRAMES : (clip + 1) * FRAMES][None]
        torch.testing.assert_close(
            models.audio_tokens(windows), outputs[f"audio_tokens_clip{clip}"][0], atol=1e-5, rtol=0
        )
        face = outputs[f"face_locator_clip{clip}"]  # (2, C, 1, h, w): zeros (uncond), the locator (cond)
        assert face[0].abs().max() == 0
        torch.testing.assert_close(conditioning["face"][0], face[1, :, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("variant", "clip"), [("hallo", 0), ("hallo", 1), ("hallo2", 0), ("hallo2", 1)])
def test_reference_net_writes_hallos_bank(models: HalloModels, variant: str, clip: int) -> None:
    golden = _golden_run(variant)
    id_tokens = models.identity_tokens(golden["inputs"]["face_emb"])
    ref_latents = golden["outputs"][f"ref_latents_clip{clip}"]
    # unrounded: our ReferenceNet's tokens are Hallo's float32 bank, source image and motion frames
    models.bank_dtype = None
    try:
        unrounded = models.encode_reference(ref_latents, id_tokens)
    finally:
        models.bank_dtype = torch.float16
    hallos = golden_reference(models, golden["bank"], clip, rounded=False)
    assert unrounded.spatial.keys() == hallos.spatial.keys() and unrounded.temporal.keys() == hallos.temporal.keys()
    # float32 noise only: 8.6e-6 seen (9.5e-6 with 2 threads) on tokens up to 4, hence 1e-6 of |value| on top
    for name in hallos.spatial:
        torch.testing.assert_close(unrounded.spatial[name], hallos.spatial[name], atol=1e-5, rtol=1e-6)
    for name in hallos.temporal:
        torch.testing.assert_close(unrounded.temporal[name], hallos.temporal[name], atol=1e-5, rtol=1e-6)
    # rounded as Hallo's reader rounds the bank
    reference = models.encode_reference(ref_latents, id_tokens)
    assert reference.spatial, "no reference tokens"
    for name, tokens in reference.spatial.items():
        bank = golden["bank"][f"clip{clip}/{name.removesuffix('.attn1')}"]  # (2 (1 + n), L, C), float32
        bank = bank.reshape(2, -1, *bank.shape[1:]).half().float()
        # one float16 step at |x| < 2 at most (float noise flips a rounding now and then)
        torch.testing.assert_close(tokens, bank[:, 0], atol=2**-9, rtol=0)
        block, _, rest = name.partition(".attentions.")
        temporal = reference.temporal.get(f"{block}.motion_modules.{rest.split('.')[0]}")
        if temporal is not None:  # (2, n, C, h, w) <- bank rows 1..n of each copy, tokens in (y, x) order
            motion = bank[:, 1:].reshape(*temporal.shape[:2], *temporal.shape[3:], -1).permute(0, 1, 4, 2, 3)
            torch.testing.assert_close(temporal, motion, atol=2**-9, rtol=0)
    # the motion modules Hallo never runs get no motion frames; every other one does
    assert sorted(reference.temporal) == sorted(n for n, m in models.backbone.temporal_layers.items() if m.enabled)


def _step_input(golden: dict, clip: int, step: int) -> torch.Tensor:
    if step == 0:
        return golden["inputs"][f"init_latents_clip{clip}"]
    return golden["outputs"][f"latents_clip{clip}_step{step - 1}"]


def _teacher_forced(models: HalloModels, golden: dict, clip: int, step: int, masks: dict | None = None, scale=None):
    """Our denoiser on step `step` of clip `clip` given Hallo's own inputs of that step (its latents, its
    reference bank as its reader rounds it): both guidance branches, and the latents after guidance + DDIM."""
    meta, inputs, outputs = golden["meta"], golden["inputs"], golden["outputs"]
    conditioning = _conditioning(models, inputs)
    reference = golden_reference(models, golden["bank"], clip)
    audio = models.audio_tokens(inputs["audio_emb_windowed"][clip * FRAMES : (clip + 1) * FRAMES][None])
    latents, timestep = _step_input(golden, clip, step), outputs["timesteps"][step]
    scale = tuple(meta["motion_scale"]) if scale is None else scale
    masks = conditioning["masks"] if masks is None else masks
    args = (reference, conditioning["id_tokens"], audio, conditioning["face"], masks, scale)
    eps = models.denoise(latents, timestep, *args)
    scheduler = DDIMScheduler(**{k: v for k, v in meta["scheduler_config"].items() if not k.startswith("_")})
    scheduler.set_timesteps(meta["num_inference_steps"])
    uncond, cond = eps.chunk(2)
    guided = uncond + meta["guidance_scale"] * (cond - uncond)
    return eps, scheduler.step(guided, timestep, latents, eta=0.0, return_dict=False)[0]


@pytest.mark.parametrize(
    ("variant", "clip", "step"),
    [(variant, clip, step) for variant, clips in GOLDEN_RUNS.items() for clip in range(clips) for step in range(3)]
    # Hallo2 differs from Hallo in its reference bank only (masked motion-frame pixels: test_reference_net_writes_
    # hallos_bank), so two of its steps suffice here
    + [("hallo2", 0, 0), ("hallo2", 1, 2)],
)
def test_denoiser_matches_both_guidance_branches(models: HalloModels, variant: str, clip: int, step: int) -> None:
    """Every step of every clip of the three golden runs (Hallo; Hallo2's masked motion frames; unequal
    motion_scale), teacher-forced: both branches, and Hallo's guidance + DDIM step on our prediction."""
    golden = _golden_run(variant)
    eps, stepped = _teacher_forced(models, golden, clip, step)
    expected = golden["outputs"][f"noise_pred_clip{clip}_step{step}"]  # row 0 uncond, row 1 cond
    for branch in (0, 1):
        torch.testing.assert_close(eps[branch], expected[branch], atol=STEP_ATOL, rtol=0)
    # the step scales the prediction's noise by up to ~3 (7.2e-6 seen on latents up to ~4)
    expected_latents = golden["outputs"][f"latents_clip{clip}_step{step}"]
    torch.testing.assert_close(stepped, expected_latents, atol=STEP_ATOL, rtol=1e-6)


def test_swapped_regions_are_caught(models: HalloModels) -> None:
    """The golden masks give every region >= 0.2 of the area at every level and the motion_scale run weighs them
    1.0 / 0.6 / 1.4: swapping two regions' masks (face <-> lip), or two regions' weights (full <-> lip), moves the
    prediction far past STEP_ATOL (0.085 seen when the weights were applied in reverse order)."""
    golden = _golden_run("hallo_motion_scale")
    expected = golden["outputs"]["noise_pred_clip0_step0"]
    masks = _conditioning(models, golden["inputs"])["masks"]
    swapped = {level: (full, lip, face) for level, (full, face, lip) in masks.items()}
    full, face, lip = golden["meta"]["motion_scale"]
    for kwargs in ({"masks": swapped}, {"scale": (lip, face, full)}):
        eps, _ = _teacher_forced(models, golden, 0, 0, **kwargs)
        assert (eps - expected).abs().max() > 1000 * STEP_ATOL, kwargs.keys()


def test_float16_bank_rounding_is_what_makes_the_first_step_match(
    models: HalloModels, golden: dict, conditioning: dict
) -> None:
    inputs, outputs = golden["inputs"], golden["outputs"]
    audio = models.audio_tokens(inputs["audio_emb_windowed"][:FRAMES][None])
    errors = {}
    for bank_dtype in (torch.float16, None):
        models.bank_dtype = bank_dtype
        try:
            reference = models.encode_reference(outputs["ref_latents_clip0"], conditioning["id_tokens"])
        finally:
            models.bank_dtype = torch.float16
        eps = models.denoise(
            inputs["init_latents_clip0"],
            outputs["timesteps"][0],
            reference,
            conditioning["id_tokens"],
            audio,
            conditioning["face"],
            conditioning["masks"],
        )
        errors[bank_dtype] = (eps - outputs["noise_pred_clip0_step0"]).abs().max().item()
    assert errors[torch.float16] < FIRST_STEP_ATOL < errors[None]


def test_a_checkpoint_of_another_kind_is_named(tmp_path: Path) -> None:
    animatediff = {"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": torch.zeros(2, 2)}
    torch.save(animatediff, tmp_path / "mm.ckpt")
    with pytest.raises(EMOInputError, match="AnimateDiff motion-module"):
        load_hallo_state_dict(tmp_path / "mm.ckpt")
    with pytest.raises(EMOInputError, match="Stable Diffusion"):
        convert_hallo_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})
    with pytest.raises(EMOInputError, match="does not exist"):
        load_hallo_state_dict(tmp_path / "absent.pth")


def test_missing_and_unexpected_keys_are_listed(models: HalloModels) -> None:
    state = torch.load(GOLDENS / "net.pth", map_location="cpu", weights_only=True)
    dropped = "denoising_unet.up_blocks.1.audio_modules.0.transformer_blocks.0.attn2_2.to_k.weight"
    broken = {k: v for k, v in state.items() if k != dropped}
    with pytest.raises(EMOInputError, match=r"1 missing keys.*audio_modules\.0\.transformer_blocks\.0\.attn2_2\.to_k"):
        load_hallo_weights(models, broken)
    extra = {**state, "denoising_unet.down_blocks.0.attentions.0.extra.weight": torch.zeros(1)}
    with pytest.raises(EMOInputError, match=r"1 unexpected.*attentions\.0\.extra\.weight"):
        load_hallo_weights(models, extra)
    unplaced = {**state, "vae.encoder.conv_in.weight": torch.zeros(1)}
    with pytest.raises(EMOInputError, match="no model takes"):
        load_hallo_weights(models, unplaced)


# ------------------------------------------------------------------------------------ the options, one by one


def test_audio_module_widths_follow_hallos_rule_at_sd15_size() -> None:
    from emo_pipeline.models.audio_modules import audio_module_inner_dims

    dims = audio_module_inner_dims([320, 640, 1280, 1280], layers_per_block=2)
    # docs/hallo_architecture.md section 1.2, read off Hallo's instantiated classes
    expected = {"down_blocks.0.audio_modules.0": 320, "down_blocks.0.audio_modules.1": 320}
    expected |= {"down_blocks.1.audio_modules.0": 320, "down_blocks.1.audio_modules.1": 640}
    expected |= {"down_blocks.2.audio_modules.0": 640, "down_blocks.2.audio_modules.1": 1280}
    expected |= {"mid_block.audio_modules.0": 1280}
    expected |= {f"up_blocks.{i}.audio_modules.{j}": w for i, w in ((1, 640), (2, 320), (3, 320)) for j in range(3)}
    assert dims == expected


def test_hallo_backbone_options_and_emo_defaults(models: HalloModels) -> None:
    from emo_pipeline.models.backbone import EMOUNet3DConditionModel

    config = models.backbone.config
    assert (config.audio_attention, config.temporal_norm) == ("audio_modules", "per_frame")
    assert sorted(config.disabled_temporal_layers) == ["down_blocks.3.motion_modules.0"] + [
        f"up_blocks.0.motion_modules.{j}" for j in range(2)
    ]
    defaults = EMOUNet3DConditionModel.from_config(
        {
            **config,
            "audio_attention": "attn2",
            "temporal_norm": "across_frames",
            "disabled_temporal_layers": None,
            "audio_module_config": None,
        }
    )
    assert not any(".audio_modules." in k for k in defaults.state_dict())
    assert all(m.enabled and m.temporal_norm == "across_frames" for m in defaults.temporal_layers.values())


def test_a_disabled_temporal_layer_is_the_identity(models: HalloModels) -> None:
    layer = models.backbone.temporal_layers["down_blocks.3.motion_modules.0"]
    states = torch.randn(2 * 3, layer.in_channels, 2, 2)
    assert not layer.enabled
    assert layer(states, num_frames=3) is states


def test_samples_without_reference_rows_get_plain_self_attention(
    models: HalloModels, golden: dict, conditioning: dict
) -> None:
    """Hallo's unconditional branch: the same call with and without reference tokens gives the same row 0."""
    outputs = golden["outputs"]
    reference = models.encode_reference(outputs["ref_latents_clip0"], conditioning["id_tokens"])
    frames = 2
    latents = golden["inputs"]["init_latents_clip0"][:, :, :frames]
    audio = models.audio_tokens(golden["inputs"]["audio_emb_windowed"][:frames][None])
    args = (latents, outputs["timesteps"][0])
    kwargs = {"id_tokens": conditioning["id_tokens"], "audio_tokens": audio, "face_features": conditioning["face"]}
    kwargs["region_masks"] = conditioning["masks"]
    with_reference = models.denoise(*args, reference, **kwargs)
    no_tokens = type(reference)(spatial={}, temporal=reference.temporal)
    without = models.denoise(*args, no_tokens, **kwargs)
    # equal up to float rounding: the masked keys add exact zeros, but the sums run in another order (1.4e-6 seen
    # with one thread)
    torch.testing.assert_close(with_reference[0], without[0], atol=1e-5, rtol=0)
    assert (with_reference[1] - without[1]).abs().max() > 1e-2  # the cond branch does see the reference


def test_face_locator_and_audio_projection_options_keep_emo_defaults() -> None:
    from emo_pipeline.models.audio_projection import AudioProjection
    from emo_pipeline.models.face_locator import FaceLocator

    emo, hallo = FaceLocator(), FaceLocator(in_channels=3, same_width_convs=True)
    assert [type(m).__name__ for m in emo.encoder] == ["Conv2d", "SiLU"] * 4
    assert [m.stride[0] for m in hallo.encoder if isinstance(m, torch.nn.Conv2d)] == [1, 1, 2, 1, 2, 1, 2]
    assert isinstance(AudioProjection().mlp[1], torch.nn.SiLU)
    assert isinstance(AudioProjection(activation="relu").mlp[1], torch.nn.ReLU)
    with pytest.raises(ValueError, match="activation"):
        AudioProjection(activation="gelu")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["hallo", "hallo2"])
def test_hallo_generate_reproduces_the_golden_video(models: HalloModels, variant: str) -> None:
    """The whole clip loop, free-running from Hallo's seed: frames within Hallo's own float-noise floor."""
    from diffusers import AutoencoderKL

    from emo_pipeline.hallo import hallo_scheduler
    from emo_pipeline.hallo_conversion import hallo_generate

    folder = GOLDENS.parent / variant
    meta = json.loads((folder / "metadata.json").read_text())
    inputs, outputs = load_file(folder / "inputs.safetensors"), load_file(folder / "outputs.safetensors")
    vae = AutoencoderKL.from_pretrained(GOLDENS / "vae").eval()
    conditioning = golden_conditioning(inputs, meta["audio_length"])
    video = hallo_generate(
        models,
        vae,
        hallo_scheduler(),
        conditioning,
        num_frames=meta["num_frames_per_clip"],
        num_motion_frames=meta["num_motion_frames"],
        num_inference_steps=meta["num_inference_steps"],
        guidance_scale=meta["guidance_scale"],
        generator=torch.Generator().manual_seed(meta["seed"]),
        motion_frame_mask_rate=0.25 if variant == "hallo2" else None,
    )
    assert video.shape == (1, 3, meta["audio_length"], meta["size"], meta["size"])
    for clip in range(meta["num_clips"]):
        frames = video[:, :, clip * FRAMES : (clip + 1) * FRAMES]
        floor = meta["float_noise_floor"][f"frames_clip{clip}"]
        torch.testing.assert_close(frames, outputs[f"frames_clip{clip}"], atol=2 * floor, rtol=0)


def test_audio_windows_are_hallos_process_audio_emb(golden: dict) -> None:
    inputs = golden["inputs"]
    conditioning = golden_conditioning(inputs, golden["meta"]["audio_length"])
    total = inputs["audio_emb"].shape[0]
    assert torch.equal(conditioning.audio_windows(0, total, 5), inputs["audio_emb_windowed"])


def test_fast_mode_reference_pieces_equal_hallos_bank_on_any_processor(
    models: HalloModels, golden: dict, conditioning: dict
) -> None:
    """The source image and the motion frames through the ReferenceNet apart (fast mode), the copies tiled over the
    frames instead of materialised per frame, the keys/values projected once with the unconditional rows masked:
    the same step as Hallo's unrounded bank. Also through a processor that gets tokens instead of keys/values."""
    from diffusers.models.attention_processor import AttnProcessor

    outputs, inputs = golden["outputs"], golden["inputs"]
    ref_latents, id_tokens = outputs["ref_latents_clip0"], conditioning["id_tokens"]
    models.bank_dtype = None
    try:
        bank = models.encode_reference(ref_latents, id_tokens)
    finally:
        models.bank_dtype = torch.float16
    source = models.encode_source(ref_latents[:1], id_tokens, num_motion_frames=2)
    pieces = type(bank)(spatial=source.spatial, temporal=models.encode_motion(ref_latents[1:], id_tokens), tiled=True)
    cached = models.backbone.prepare_reference(pieces)
    assert cached.tiled and cached.key_value
    audio = models.audio_tokens(inputs["audio_emb_windowed"][:FRAMES][None])
    args = (inputs["init_latents_clip0"], outputs["timesteps"][0])
    kwargs = {"id_tokens": id_tokens, "audio_tokens": audio, "face_features": conditioning["face"]}
    kwargs["region_masks"] = conditioning["masks"]
    expected = models.denoise(*args, bank, **kwargs)
    torch.testing.assert_close(models.denoise(*args, cached, **kwargs), expected, atol=2e-5, rtol=0)
    processors = models.backbone.attn_processors
    models.backbone.set_attn_processor(AttnProcessor())
    try:
        torch.testing.assert_close(models.denoise(*args, pieces, **kwargs), expected, atol=2e-5, rtol=0)
    finally:
        models.backbone.set_attn_processor(processors)

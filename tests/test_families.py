"""The one sampling loop (emo_pipeline.sampling) with each weight family: what the loop guarantees every family
(every scheduler, noise via randn_tensor, one backbone branch at guidance <= 1, callbacks that replace motion
latents, offloading), and the Hallo family's parity details that the loop carries (eta's seeded generator, Hallo's
image-processor rescale, Hallo2's motion-frame pixel mask, fast mode's clip chaining).

Hallo's networks are the goldens' tiny ones (tests/goldens/hallo), built into a pipeline without conversion.
"""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from hallo_goldens import GOLDENS, golden, golden_conditioning, half_size_conditioning
from pipeline_settings import IMAGE, settings, speech

from emo_pipeline.errors import EMOInputError
from emo_pipeline.families import all_families
from emo_pipeline.hallo import load_hallo_models
from emo_pipeline.hallo_conversion import build_hallo_pipeline
from emo_pipeline.pipeline_emo import SCHEDULERS

SIZE = 64


def make_hallo_pipe():
    models = load_hallo_models(GOLDENS / "hallo" / "net.pth", GOLDENS / "hallo" / "unet" / "config.json", audio_dim=32)
    pipe = build_hallo_pipeline(models, AutoencoderKL.from_pretrained(GOLDENS / "hallo" / "vae").eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_hallo_pipe()


@pytest.fixture(scope="module")
def data() -> dict:
    return golden("hallo")


def conditioning(data: dict, frames: int = 8):
    return half_size_conditioning(data["inputs"], frames)  # 64 px: the goldens at half their size


def run(pipe, data, frames: int = 8, **kwargs):
    """`frames` frames of the goldens' conditioning in clips of 8 (2 steps, 64 px, seed 42)."""
    options = {"num_inference_steps": 2, "height": SIZE, "width": SIZE, "output_type": "pt", "watermark": False}
    options["num_frames_per_clip"] = 8
    options["generator"] = torch.Generator().manual_seed(42)
    full_size = kwargs.pop("full_size", False)  # the goldens' own size (128 px) instead of half of it
    hallo = golden_conditioning(data["inputs"], frames) if full_size else conditioning(data, frames)
    if full_size:
        options["height"] = options["width"] = hallo.source_image.shape[-1]
    return pipe(None, None, hallo_conditioning=hallo, **{**options, **kwargs}).frames


def backbone_batches(pipe) -> tuple[list[int], object]:
    batches = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    return batches, hook


# --- what the loop guarantees every family ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs_on_hallo_weights_in_fast_mode(pipe, data, name) -> None:
    """The loop scales the model input and passes `eta`/`generator` only to schedulers that take them."""
    default = pipe.scheduler
    try:
        pipe.set_scheduler(name)
        frames = run(pipe, data, mode="fast", eta=0.3)
    finally:
        pipe.scheduler = default
    assert frames.shape == (8, 3, SIZE, SIZE) and torch.isfinite(frames).all()


def test_parity_mode_refuses_other_samplers_naming_the_mode(pipe, data) -> None:
    default = pipe.scheduler
    try:
        pipe.set_scheduler("euler")
        with pytest.raises(EMOInputError, match=r"mode='parity' is Hallo's own DDIM loop.*EulerDiscreteScheduler"):
            run(pipe, data, mode="parity")
    finally:
        pipe.scheduler = default


def test_noise_is_drawn_as_randn_tensor_from_a_list_of_generators(pipe, data) -> None:
    """diffusers' generator idioms: a list of generators (one per batch row) draws the same noise as the generator
    itself; the first clip starts from `randn_tensor`'s draw."""
    one = run(pipe, data, num_inference_steps=1, output_type="latent")
    generators = [torch.Generator().manual_seed(42)]
    listed = run(pipe, data, num_inference_steps=1, output_type="latent", generator=generators)
    torch.testing.assert_close(listed, one, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["hallo", "emo"])
def test_guidance_at_most_one_runs_the_conditional_branch_alone(pipe, data, family) -> None:
    """At guidance_scale <= 1 the backbone sees batch 1 (no unconditional branch); above, both branches in one call
    of batch 2; a callback lowering the guidance mid-clip switches to batch 1 from the next step."""
    from emo_pipeline.testing import tiny_emo_pipeline

    model = pipe if family == "hallo" else tiny_emo_pipeline()
    model.set_progress_bar_config(disable=True)

    def generate(**kwargs):
        if family == "hallo":
            return run(model, data, **kwargs)
        return model(IMAGE, speech(0.1), **settings(**kwargs)).frames

    batches, hook = backbone_batches(model)
    try:
        generate(guidance_scale=1.0)
        assert batches == [1, 1]  # 2 steps
        batches.clear()
        generate(guidance_scale=3.5)
        assert batches == [2, 2]
        batches.clear()

        def lower(p, step, timestep, tensors):
            p._guidance_scale = 1.0
            return {}

        generate(guidance_scale=3.5, callback_on_step_end=lower)
        assert batches == [2, 1]
    finally:
        hook.remove()


def test_a_callback_replaces_hallos_motion_latents_in_fast_mode(pipe, data) -> None:
    """`motion_latents` returned by a callback are this clip's motion frames from the next step: the ReferenceNet
    encodes them (with Hallo's two guidance copies)."""
    inputs = []
    hook = pipe.reference_net.register_forward_hook(lambda module, args, output: inputs.append(args[0].clone()))
    replacement = torch.full((1, 2, 4, 8, 8), 0.5)

    def replace(p, step, timestep, tensors):
        assert tensors["motion_latents"].shape == (1, 2, 4, 8, 8)
        return {"motion_latents": replacement} if step == 0 else {}

    try:
        changed = run(pipe, data, callback_on_step_end=replace, callback_on_step_end_tensor_inputs=["motion_latents"])
    finally:
        hook.remove()
    # source (once per video), clip 0's motion frames, then the replacement, both guidance copies
    assert len(inputs) == 3
    torch.testing.assert_close(inputs[2], replacement[0][None].repeat(2, 1, 1, 1, 1), atol=0, rtol=0)
    assert not torch.equal(changed, run(pipe, data))


def test_fast_mode_continues_each_clip_from_the_previous_clips_last_latents(pipe, data) -> None:
    """Hallo fast mode's clip chaining: clip 1's ReferenceNet input (motion frames) is clip 0's last n latents."""
    inputs = []
    hook = pipe.reference_net.register_forward_hook(lambda module, args, output: inputs.append(args[0].clone()))
    try:
        latents = run(pipe, data, frames=16, output_type="latent", mode="fast")
    finally:
        hook.remove()
    assert len(inputs) == 3  # the source once, each clip's motion frames
    expected = latents[:, :, 6:8].permute(0, 2, 1, 3, 4)  # clip 0's last 2 latents, (1, n, 4, h, w)
    torch.testing.assert_close(inputs[2], expected.repeat(2, 1, 1, 1, 1), atol=0, rtol=0)


# --- offloading with Hallo weights ----------------------------------------------------------------------------


def _offloads():
    from test_offload import group_offload_to_disk, sequential_cpu_offload

    cpu = torch.device("cpu")
    group = {"onload_device": cpu, "offload_device": cpu, "num_blocks_per_group": 1}
    return {
        "model": lambda p, tmp: p.enable_model_cpu_offload(device="cpu"),
        "sequential": lambda p, tmp: sequential_cpu_offload(p),
        "group_leaf": lambda p, tmp: p.enable_group_offload(offload_type="leaf_level", **group),
        "group_block_disk": lambda p, tmp: [
            group_offload_to_disk(c, tmp / n) for n, c in p.components.items() if isinstance(c, torch.nn.Module)
        ],
    }


@pytest.mark.parametrize("offload", ["model", "sequential", "group_leaf", "group_block_disk"])
def test_offloading_hallo_weights_gives_the_plain_frames(pipe, data, offload, tmp_path) -> None:
    """Under offload hooks the per-clip conditioning (audio tokens, face features with the unconditional branch's
    zeroed) is encoded inside the backbone's forward; the frames are the plain pipeline's."""
    # 2 clips of 6 frames (the second continued from the first), 1 step: float noise between the paths (reference
    # keys/values projected once vs per call, ~1e-6 per call) stays under 5e-5 on latents of magnitude ~2.
    options = {"frames": 12, "num_frames_per_clip": 6, "num_inference_steps": 1, "output_type": "latent"}
    expected = run(pipe, data, **options)
    offloaded = make_hallo_pipe()
    _offloads()[offload](offloaded, tmp_path)
    torch.testing.assert_close(run(offloaded, data, **options), expected, atol=1e-4, rtol=0)


# --- Hallo parity details the loop carries -------------------------------------------------------------------


def test_parity_mode_with_eta_draws_ddims_variance_noise_from_the_seeded_generator(pipe, data) -> None:
    """Hallo passes its seeded generator to DDIM's step: with eta > 0 the same seed gives the same video whatever
    the global RNG did in between."""
    torch.manual_seed(0)
    first = run(pipe, data, mode="parity", eta=0.5)
    torch.manual_seed(1)
    second = run(pipe, data, mode="parity", eta=0.5)
    torch.testing.assert_close(second, first, atol=0, rtol=0)


def test_parity_mode_rescales_a_bright_batch_as_hallos_image_processor(pipe, data) -> None:
    """Hallo runs `[source, motion frames]` through diffusers' `VaeImageProcessor.preprocess`, which maps a batch
    with no value below 0 (no pixel below mid-grey) to `2x - 1` again; parity mode feeds the VAE the same."""
    bright = conditioning(data)
    bright.source_image = bright.source_image.abs()  # every pixel at or above mid-grey
    encoded = []
    hook = pipe.vae.encoder.register_forward_hook(lambda module, args, output: encoded.append(args[0].clone()))
    try:
        pipe(
            None,
            None,
            hallo_conditioning=bright,
            mode="parity",
            num_inference_steps=1,
            height=SIZE,
            width=SIZE,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        hook.remove()
    batch = torch.cat([bright.source_image, bright.source_image.repeat(2, 1, 1, 1)])
    expected = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True).preprocess(batch, SIZE, SIZE)
    torch.testing.assert_close(encoded[0], expected, atol=0, rtol=0)
    assert encoded[0].min() < 0  # rescaled: Hallo's quirk kept, not the portrait as given


def test_hallo2_parity_masks_the_motion_frames_exactly_as_the_golden(pipe) -> None:
    """Our parity mode's motion-frame pixel mask (Hallo2, rate 0.25) equals the one Hallo2's own loop applied
    (`motion_pixel_mask_clipK` of the hallo2 goldens), for both clips: read from the pixels our VAE encodes."""
    data = golden("hallo2")
    meta, outputs = data["meta"], data["outputs"]
    encoded = []
    hook = pipe.vae.encoder.register_forward_hook(lambda module, args, output: encoded.append(args[0].clone()))
    try:
        run(
            pipe,
            data,
            frames=meta["audio_length"],
            num_frames_per_clip=meta["num_frames_per_clip"],
            mode="parity",
            motion_frame_mask_rate=0.25,
            num_inference_steps=meta["num_inference_steps"],
            full_size=True,
        )
    finally:
        hook.remove()
    assert len(encoded) == meta["num_clips"]
    for clip, pixels in enumerate(encoded):
        applied = (pixels[1:] != 0).all(dim=1).to(torch.uint8)  # (n, H, W): masked pixels are exactly 0
        assert torch.equal(applied, outputs[f"motion_pixel_mask_clip{clip}"]), clip


def test_settings_of_another_family_are_refused_and_unknown_names_are_type_errors(data) -> None:
    from emo_pipeline.testing import tiny_emo_pipeline

    emo = tiny_emo_pipeline()
    with pytest.raises(EMOInputError, match=r"\['vocal_separation'\] apply to Hallo / Hallo2 weights only"):
        emo(IMAGE, speech(0.1), vocal_separation="Kim_Vocal_2.onnx")
    # a setting several families take names all of them, from the registry (not only the first one found)
    with_modes = [f.label for f in all_families() if f.settings and "mode" in {x.name for x in fields(f.settings)}]
    assert len(with_modes) >= 2 and "EchoMimic" in with_modes
    with pytest.raises(EMOInputError, match=re.escape(f"['mode'] apply to {' or '.join(with_modes)} weights only")):
        emo(IMAGE, speech(0.1), mode="parity")
    with pytest.raises(TypeError, match="unexpected keyword argument 'moed'"):
        emo(IMAGE, speech(0.1), moed="fast")
    assert emo.family.name == "emo" and emo.family.settings is None

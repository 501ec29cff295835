"""The switches a diffusers user flips on day one: attention backends, casting, compile; EMO's conditioning kept."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
)

from emo_pipeline import ReferenceFeatures
from emo_pipeline.models.attention import EMOAttnProcessor
from emo_pipeline.testing import randomize_zero_initialized_layers, tiny_emo_models

B, F, H = 2, 3, 8


@pytest.fixture(scope="module")
def setup():
    """Tiny models with every layer non-zero, and inputs that use every conditioning path."""
    torch.manual_seed(0)
    reference_net, backbone = tiny_emo_models()
    randomize_zero_initialized_layers(backbone)
    reference_net.eval(), backbone.eval()
    g = torch.Generator().manual_seed(0)
    x = {
        "sample": torch.randn(B, 4, F, H, H, generator=g),
        "audio_features": torch.randn(B, F, 5, 2, 32, generator=g),
        "face_mask": torch.rand(1, 1, 8 * H, 8 * H, generator=g),
        "speed": torch.rand(1, F, generator=g),
    }
    reference_latents = torch.randn(1, 4, H, H, generator=g)
    motion_latents = torch.randn(1, 2, 4, H, H, generator=g)
    return reference_net, backbone, x, reference_latents, motion_latents


def features(reference_net, reference_latents, motion_latents):
    with torch.no_grad():
        return ReferenceFeatures(
            spatial=reference_net(reference_latents).spatial, temporal=reference_net(motion_latents).temporal
        )


def denoise(backbone, x, reference, timestep=None):
    timestep = torch.tensor(10) if timestep is None else timestep
    with torch.no_grad():
        return backbone(
            x["sample"], timestep, x["audio_features"], reference, x["face_mask"], x["speed"], return_dict=False
        )[0]


@pytest.fixture(scope="module")
def expected(setup):
    reference_net, backbone, x, reference_latents, motion_latents = setup
    reference = features(reference_net, reference_latents, motion_latents)
    return reference, denoise(backbone, x, reference)


def _processor_types(model, suffix):
    return {type(p) for n, p in model.attn_processors.items() if n.endswith(suffix) and "motion_modules" not in n}


BACKENDS = {
    "sdpa": lambda m: m.set_attn_processor(AttnProcessor2_0()),
    "classic": lambda m: m.set_attn_processor(AttnProcessor()),
    "sliced": lambda m: m.set_attention_slice(1),
    "fused_qkv": lambda m: m.fuse_qkv_projections(),
    "default": lambda m: m.set_default_attn_processor(),
}
UNDO = {"sliced": lambda m: m.set_attention_slice(None), "fused_qkv": lambda m: m.unfuse_qkv_projections()}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_attention_backend_keeps_reference_motion_and_face_conditioning(setup, expected, backend):
    """Same features and noise prediction under each backend, on both networks, and back to EMO's processor after."""
    reference_net, backbone, x, reference_latents, motion_latents = setup
    reference, noise = expected
    for model in (reference_net, backbone):
        BACKENDS[backend](model)
    try:
        got = features(reference_net, reference_latents, motion_latents)
        for kind in ("spatial", "temporal"):
            for name, value in getattr(reference, kind).items():
                assert torch.allclose(getattr(got, kind)[name], value, atol=1e-5), (backend, name)
        assert (denoise(backbone, x, got) - noise).abs().max() < 1e-4
        # the cached reference keys/values (EMO's processor) or the tokens (any other processor): same result
        assert (denoise(backbone, x, backbone.prepare_reference(got)) - noise).abs().max() < 1e-4
    finally:
        for model in (reference_net, backbone):
            UNDO.get(backend, lambda m: m.set_default_attn_processor())(model)
    assert _processor_types(backbone, "attn1.processor") == {EMOAttnProcessor}


def test_pipeline_level_slicing_reaches_both_networks_and_turns_off_cleanly():
    """`pipe.enable_attention_slicing()` / `disable_attention_slicing()` as diffusers' pipelines route them."""
    from emo_pipeline.testing import tiny_emo_pipeline

    pipe = tiny_emo_pipeline()
    pipe.enable_attention_slicing("max")
    assert _processor_types(pipe.unet, "attn1.processor") == {SlicedAttnProcessor}
    assert _processor_types(pipe.reference_net, "attn1.processor") == {SlicedAttnProcessor}
    pipe.disable_attention_slicing()
    assert _processor_types(pipe.unet, "attn1.processor") == {EMOAttnProcessor}
    assert _processor_types(pipe.reference_net, "attn1.processor") == {EMOAttnProcessor}
    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.reference_net.set_attn_processor(AttnProcessor())
    pipe.disable_xformers_memory_efficient_attention()  # needs no xformers; diffusers walks every child module
    assert _processor_types(pipe.unet, "attn1.processor") == {EMOAttnProcessor}
    assert _processor_types(pipe.reference_net, "attn1.processor") == {EMOAttnProcessor}


def test_fused_qkv_projections_restore_the_previous_processors(setup, expected):
    reference_net, backbone, x, *_ = setup
    reference, noise = expected
    backbone.fuse_qkv_projections()
    # EMO's processor, fused: the attention backend still applies
    assert {(type(p), p.fused) for p in backbone.attn_processors.values()} == {(EMOAttnProcessor, True)}
    assert (denoise(backbone, x, reference) - noise).abs().max() < 1e-4
    assert (denoise(backbone, x, backbone.prepare_reference(reference)) - noise).abs().max() < 1e-4
    backbone.unfuse_qkv_projections()
    assert _processor_types(backbone, "attn1.processor") == {EMOAttnProcessor}


def test_a_user_processor_sees_reference_tokens_as_keys(setup, expected):
    """Any processor set through the processor API gets the reference as extra keys/values."""
    _, backbone, x, *_ = setup
    reference, _ = expected
    seen = []

    class Recording(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            seen.append(
                (hidden_states.shape[1], None if encoder_hidden_states is None else encoder_hidden_states.shape[1])
            )
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    processors = {
        n: Recording() if n.endswith("attn1.processor") and "motion" not in n else p
        for n, p in backbone.attn_processors.items()
    }
    backbone.set_attn_processor(processors)
    try:
        denoise(backbone, x, reference)
    finally:
        backbone.set_default_attn_processor()
    assert len(seen) == 6 and all(keys == 2 * tokens for tokens, keys in seen)  # own tokens + as many reference


@pytest.mark.parametrize("broken", ["attn1_hook", "conv_in", "temporal"])
def test_conditioning_that_does_not_arrive_fails_loudly(broken):
    """A replaced module or a removed hook must raise, not drop reference / motion / face features silently."""
    reference_net, backbone = tiny_emo_models()
    g = torch.Generator().manual_seed(1)
    x = {
        "sample": torch.randn(1, 4, F, H, H, generator=g),
        "audio_features": torch.randn(1, F, 5, 2, 32, generator=g),
        "face_mask": torch.rand(1, 1, 8 * H, 8 * H, generator=g),
        "speed": torch.rand(1, F, generator=g),
    }
    reference = features(reference_net, torch.randn(1, 4, H, H), torch.randn(1, 2, 4, H, H))
    denoise(backbone, x, reference)  # fine as built
    if broken == "attn1_hook":
        attn = backbone.get_submodule(backbone.reference_layer_names[0])
        attn._forward_pre_hooks.clear()
        match = "did not reach 1 layers"
    elif broken == "conv_in":
        conv = backbone.conv_in
        backbone.conv_in = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)  # a user's swap
        match = "conv_in"
    else:
        name = next(iter(backbone.temporal_layers))
        backbone.get_submodule(name)._emo_state = type(backbone._conditioning)()  # a layer not wired to the state
        match = "did not reach 1 layers"
    with pytest.raises(RuntimeError, match=match):
        denoise(backbone, x, reference)


def test_reference_net_capture_fails_loudly_when_a_hook_is_removed():
    reference_net, _ = tiny_emo_models()
    reference_net.get_submodule(reference_net.spatial_layer_names[0])._forward_pre_hooks.clear()
    with pytest.raises(RuntimeError, match="not every capture point ran"):
        reference_net(torch.randn(1, 4, H, H))


def test_layerwise_casting_float8_storage_bf16_compute(setup, expected):
    """`enable_layerwise_casting` stores weights in float8 and computes in bf16: inputs go to the compute dtype."""
    _, _, x, reference_latents, motion_latents = setup
    reference_net, backbone = tiny_emo_models()
    randomize_zero_initialized_layers(backbone)
    reference_net.eval(), backbone.eval()
    for model in (reference_net, backbone):  # as diffusers documents it: load in the compute dtype, then cast
        model.to(torch.bfloat16)
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    reference = features(reference_net, reference_latents.bfloat16(), motion_latents.bfloat16())
    bf16 = {k: v.bfloat16() for k, v in x.items()}
    noise = denoise(backbone, bf16, reference)
    assert noise.dtype == torch.bfloat16 and torch.isfinite(noise).all()
    assert next(backbone.conv_in.parameters()).dtype == torch.float8_e4m3fn  # still stored in float8


def test_clip_encoders_onload_the_backbone_under_model_offload(setup, expected):
    """`encode_conditioning` / `prepare_reference` are not `forward`: like the VAE's `encode`, they must call the
    offload hook (what `enable_model_cpu_offload` installs as `_hf_hook`) so the weights are on the device first."""
    _, backbone, x, *_ = setup
    reference, _ = expected
    calls = []

    class OffloadHook:  # accelerate's CpuOffload interface
        def pre_forward(self, module, *args, **kwargs):
            calls.append(module)
            return args, kwargs

    backbone._hf_hook = OffloadHook()
    try:
        backbone.encode_conditioning(x["audio_features"], x["face_mask"], x["speed"])
        backbone.prepare_reference(reference)
    finally:
        del backbone._hf_hook
    assert calls == [backbone, backbone]

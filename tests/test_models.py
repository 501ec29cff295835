"""Core models: SD1.5 parity, conditioning reach, AnimateDiff loading, round trips, gradients, shape errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from emo_pipeline import EMOInputError, EMOUNet3DConditionModel, ReferenceFeatures, ReferenceNet
from emo_pipeline.models.animatediff import load_motion_adapter
from emo_pipeline.models.backbone import parameter_group
from emo_pipeline.models.speed import SpeedEncoder, speed_bucket_encoding, window_frames
from emo_pipeline.testing import (
    TINY_EMO_CONFIG,
    randomize_zero_initialized_layers,
    tiny_emo_models,
    tiny_motion_adapter,
    tiny_unet2d,
    to_original_animatediff_state_dict,
)

B, F, N_MOTION, H = 2, 3, 2, 8
AUDIO_SHAPE = (5, 2, 32)  # (2m+1, L, D) of the tiny config


def inputs(seed=0, batch=B, frames=F, motion=N_MOTION):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, frames, H, H, generator=g),
        "audio_features": torch.randn(batch, frames, *AUDIO_SHAPE, generator=g),
        "reference_latents": torch.randn(batch, 4, H, H, generator=g),
        "motion_latents": torch.randn(batch, motion, 4, H, H, generator=g),
        "face_mask": (torch.rand(batch, 1, 8 * H, 8 * H, generator=g) > 0.5).float(),
        "speed": torch.rand(batch, frames, generator=g) * 2,
    }


@pytest.fixture(scope="module")
def models():
    return tiny_emo_models()


def conditioned(reference_net, x):
    reference = reference_net(x["reference_latents"])
    motion = reference_net(x["motion_latents"])
    return ReferenceFeatures(spatial=reference.spatial, temporal=motion.temporal)


def run(backbone, x, timestep=10, **kwargs):
    return backbone(x["sample"], timestep, x["audio_features"], **kwargs).sample


# ------------------------------------------------------------------------------------------------- SD1.5 parity


@torch.no_grad()
def test_backbone_matches_sd_unet_frame_by_frame():
    unet = tiny_unet2d()
    _, backbone = tiny_emo_models()
    x = inputs()
    timesteps = torch.tensor([10, 500])
    out = backbone(x["sample"], timesteps, x["audio_features"]).sample
    assert out.shape == x["sample"].shape
    tokens = backbone.audio_proj(x["audio_features"])  # (B*F, T, C)
    frames = x["sample"].permute(0, 2, 1, 3, 4).reshape(B * F, 4, H, H)
    expected = unet(frames, timesteps.repeat_interleave(F), encoder_hidden_states=tokens).sample
    expected = expected.reshape(B, F, 4, H, H).permute(0, 2, 1, 3, 4)
    assert (out - expected).abs().max() < 1e-5


@torch.no_grad()
def test_reference_net_captures_match_hooks_on_sd_unet():
    unet = tiny_unet2d()
    reference_net, backbone = tiny_emo_models()
    latents = inputs()["reference_latents"]
    spatial, temporal = {}, {}
    handles = []
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args, kwargs, name=name: (
                        spatial.__setitem__(name, kwargs.get("hidden_states", args[0])) and None
                    ),
                    with_kwargs=True,
                )
            )
    modules = dict(unet.named_modules())
    for target, source in {
        "down_blocks.0.motion_modules.1": "down_blocks.0.attentions.1",
        "down_blocks.1.motion_modules.0": "down_blocks.1.resnets.0",
        "mid_block.motion_modules.0": "mid_block.attentions.0",
        "up_blocks.0.motion_modules.2": "up_blocks.0.resnets.2",
        "up_blocks.1.motion_modules.2": "up_blocks.1.attentions.2",
    }.items():
        handles.append(
            modules[source].register_forward_hook(
                lambda m, i, o, target=target: temporal.__setitem__(target, o[0] if isinstance(o, tuple) else o)
            )
        )
    unet(latents, 0, encoder_hidden_states=reference_net.null_context.expand(B, -1, -1))
    for handle in handles:
        handle.remove()

    features = reference_net(latents)
    assert set(features.spatial) == set(spatial) == set(backbone.reference_layer_names)
    assert set(features.temporal) == set(backbone.temporal_layers)
    for name, value in spatial.items():
        assert (features.spatial[name] - value).abs().max() < 1e-5, name
    for name, value in temporal.items():
        assert (features.temporal[name][:, 0] - value).abs().max() < 1e-5, name


@torch.no_grad()
def test_reference_net_motion_frames_layout_and_null_context(models):
    reference_net, backbone = models
    x = inputs()
    motion = reference_net(x["motion_latents"])
    for name, layer in backbone.temporal_layers.items():
        assert motion.temporal[name].shape[:3] == (B, N_MOTION, layer.in_channels)
    # frame k of the motion features is the single-image encoding of motion latent k
    single = reference_net(x["motion_latents"][:, 1])
    name = "up_blocks.1.motion_modules.2"
    assert torch.allclose(motion.temporal[name][:, 1], single.temporal[name][:, 0], atol=1e-5)
    assert reference_net(torch.zeros(B, 0, 4, H, H)).temporal == {}

    with pytest.raises(EMOInputError, match=r"null context must have shape \(1, 77, 32\)"):
        reference_net.set_null_context(torch.zeros(1, 5, 32))
    fresh = ReferenceNet.from_unet2d(tiny_unet2d())
    before = fresh(x["reference_latents"]).temporal[name]
    fresh.set_null_context(torch.randn(1, 77, 32))
    assert not torch.allclose(fresh(x["reference_latents"]).temporal[name], before)


# ------------------------------------------------------------------------------------------- conditioning inputs


@torch.no_grad()
def test_zero_initialised_conditioning_changes_nothing_until_trained():
    reference_net, backbone = tiny_emo_models()
    x = inputs()
    motion_only = ReferenceFeatures(temporal=reference_net(x["motion_latents"]).temporal)
    base = run(backbone, x)
    zero_init = {
        "motion frames": {"reference_features": motion_only},
        "speed": {"speed": x["speed"]},
        "face mask": {"face_mask": x["face_mask"]},
    }
    for name, kwargs in zero_init.items():
        assert torch.equal(run(backbone, x, **kwargs), base), name

    randomize_zero_initialized_layers(backbone)
    base = run(backbone, x)
    for name, kwargs in zero_init.items():
        assert (run(backbone, x, **kwargs) - base).abs().max() > 1e-4, name
    # reference attention has no zero-initialised layer: it acts from the start
    reference_only = ReferenceFeatures(spatial=reference_net(x["reference_latents"]).spatial)
    assert (run(backbone, x, reference_features=reference_only) - base).abs().max() > 1e-4
    other_audio = dict(x, audio_features=torch.randn_like(x["audio_features"]))
    assert (run(backbone, other_audio) - base).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["train", "eval"])
@torch.no_grad()
def test_reference_and_motion_features_reach_every_layer(mode):
    """Perturb one layer's features at a time: each one must move the output, in train and in eval mode."""
    reference_net, backbone = tiny_emo_models()
    randomize_zero_initialized_layers(backbone)
    getattr(backbone, mode)()
    x = inputs()
    features = conditioned(reference_net, x)
    base = run(backbone, x, reference_features=features)

    def reached(kind):
        count = 0
        for name, value in getattr(features, kind).items():
            perturbed = ReferenceFeatures(spatial=dict(features.spatial), temporal=dict(features.temporal))
            getattr(perturbed, kind)[name] = value + 1.0
            count += bool((run(backbone, x, reference_features=perturbed) - base).abs().max() > 1e-6)
        return count

    assert reached("spatial") == len(backbone.reference_layer_names) == 6
    assert reached("temporal") == len(backbone.temporal_layers) == 11


@torch.no_grad()
def test_batch_one_conditioning_is_tiled_for_guidance_batches(models):
    reference_net, backbone = models
    x = inputs(batch=1)
    features = conditioned(reference_net, x)
    doubled = {k: torch.cat([v, v]) for k, v in x.items()}
    tiled = run(backbone, doubled, reference_features=features, speed=x["speed"], face_mask=x["face_mask"])
    explicit_features = conditioned(reference_net, doubled)
    explicit = run(
        backbone, doubled, reference_features=explicit_features, speed=doubled["speed"], face_mask=doubled["face_mask"]
    )
    assert (tiled - explicit).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ motion frames


@torch.no_grad()
def test_temporal_layer_equals_diffusers_animatediff_on_motion_then_clip_frames():
    """One temporal layer with n motion frames == diffusers' AnimateDiffTransformer3D on cat([motion, clip]) along
    the frame axis, its output sliced to the clip's frames (order and slicing matter)."""
    import copy

    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    from emo_pipeline.models.attention import ConditioningState
    from emo_pipeline.models.temporal import EMOTemporalTransformer3D

    torch.manual_seed(0)
    reference = AnimateDiffTransformer3D(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
        positional_embeddings="sinusoidal", num_positional_embeddings=16,
    ).eval()  # fmt: skip
    for parameter in reference.parameters():  # diffusers zero-initialises nothing here, but be sure all weights act
        torch.nn.init.normal_(parameter, std=0.2)
    state = ConditioningState()
    layer = EMOTemporalTransformer3D.from_animatediff(copy.deepcopy(reference), "layer", speed_dim=8, state=state)
    batch, frames, motion_frames, channels, size = 2, 3, 2, 16, 4
    clip = torch.randn(batch * frames, channels, size, size)
    motion = torch.randn(batch, motion_frames, channels, size, size)
    state.temporal = {"layer": motion}
    ours = layer(clip, num_frames=frames)
    state.clear()
    joined = torch.cat([motion, clip.reshape(batch, frames, channels, size, size)], dim=1)
    theirs = reference(joined.flatten(0, 1), num_frames=motion_frames + frames)
    theirs = theirs.reshape(batch, motion_frames + frames, channels, size, size)[:, motion_frames:].flatten(0, 1)
    assert (ours - theirs).abs().max() < 1e-5
    # without motion frames it is diffusers' layer exactly
    assert torch.equal(layer(clip, num_frames=frames), reference(clip, num_frames=frames))


@torch.no_grad()
def test_audio_of_frame_f_moves_only_frame_f():
    """With the temporal layers zeroed, frames are independent: perturbing `audio_features[b, f]` changes only
    `out[b, :, f]` (the audio tokens are laid out per frame in the order the backbone's frames are)."""
    _, backbone = tiny_emo_models()  # zero-initialised temporal output projections: no mixing across frames
    x = inputs()
    base = run(backbone, x)
    for b, f in ((0, 1), (1, 2)):
        audio = x["audio_features"].clone()
        audio[b, f] += 1.0
        changed = (run(backbone, dict(x, audio_features=audio)) - base).abs().amax(dim=(1, 3, 4))  # (B, F)
        assert changed[b, f] > 1e-4
        changed[b, f] = 0
        assert changed.max() < 1e-6, (b, f)


@torch.no_grad()
def test_motion_frames_output_keeps_clip_length_and_positional_table_is_checked():
    reference_net, backbone = tiny_emo_models(motion_max_seq_length=8)
    randomize_zero_initialized_layers(backbone)
    x = inputs(frames=5, motion=3)
    features = conditioned(reference_net, x)
    assert run(backbone, x, reference_features=features).shape == (B, 4, 5, H, H)
    x = inputs(frames=5, motion=4)
    with pytest.raises(EMOInputError, match=r"num_motion_frames \(4\) \+ num_frames \(5\) = 9 exceeds .*8"):
        run(backbone, x, reference_features=conditioned(reference_net, x))


# -------------------------------------------------------------------------------------------------- AnimateDiff


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_original_animatediff_checkpoint_loads_into_the_backbone(tmp_path, suffix):
    adapter = tiny_motion_adapter()
    original = to_original_animatediff_state_dict(adapter)
    assert (
        "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight"
        in (original)
    )
    path = tmp_path / f"mm_tiny{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": original}, path)
    else:
        from safetensors.torch import save_file

        save_file(original, path)
    loaded = load_motion_adapter(path, motion_num_attention_heads=2, motion_norm_num_groups=8)
    expected = adapter.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key

    unet = tiny_unet2d()
    backbone = EMOUNet3DConditionModel.from_unet2d(
        unet,
        motion_adapter=loaded,
        **{k: v for k, v in TINY_EMO_CONFIG.items() if k.startswith(("audio", "face", "sp"))},
    )
    own = backbone.state_dict()
    temporal = {k for k in own if "motion_modules" in k and ".speed_" not in k}
    assert temporal == {k for k in expected if "motion_modules" in k}
    for key in temporal:
        assert torch.equal(own[key], expected[key]), key


def test_motion_adapter_folder_and_load_into_existing_backbone(tmp_path):
    adapter = tiny_motion_adapter()
    adapter.save_pretrained(tmp_path / "adapter")
    loaded = load_motion_adapter(tmp_path / "adapter")
    _, backbone = tiny_emo_models(motion_adapter=loaded)
    for key, value in adapter.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key

    _, zero_init = tiny_emo_models(motion_num_attention_heads=2)
    zero_init.load_motion_adapter(adapter)
    assert torch.equal(
        zero_init.state_dict()["up_blocks.1.motion_modules.2.proj_out.weight"],
        adapter.state_dict()["up_blocks.1.motion_modules.2.proj_out.weight"],
    )


def test_bad_motion_checkpoints_raise_input_errors(tmp_path):
    with pytest.raises(EMOInputError, match="does not exist"):
        load_motion_adapter(tmp_path / "missing.ckpt")
    path = tmp_path / "not_motion.ckpt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(EMOInputError, match="no AnimateDiff motion module weights"):
        load_motion_adapter(path)
    # a pickle that needs code execution is refused: weights_only=True
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"motion_modules": SpeedEncoder}}, path)
    with pytest.raises(EMOInputError, match="cannot read motion module checkpoint"):
        load_motion_adapter(path)


# ------------------------------------------------------------------------------------------------- round trips


@torch.no_grad()
def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    reference_net, backbone = tiny_emo_models()
    randomize_zero_initialized_layers(backbone)
    reference_net.set_null_context(torch.randn(1, 77, 32))
    x = inputs()
    features = conditioned(reference_net, x)
    expected = run(backbone, x, reference_features=features, speed=x["speed"], face_mask=x["face_mask"])

    reference_net.save_pretrained(tmp_path / "reference_net")
    backbone.save_pretrained(tmp_path / "unet")
    for folder in ("reference_net", "unet"):
        files = sorted(p.name for p in (tmp_path / folder).iterdir())
        assert files == ["config.json", "diffusion_pytorch_model.safetensors"], files

    reference_net2 = ReferenceNet.from_pretrained(tmp_path / "reference_net")
    backbone2 = EMOUNet3DConditionModel.from_pretrained(tmp_path / "unet")
    assert backbone2.config.audio_projection_config["num_tokens"] == 4
    assert torch.equal(reference_net2.null_context, reference_net.null_context)
    features2 = conditioned(reference_net2, x)
    out = run(backbone2, x, reference_features=features2, speed=x["speed"], face_mask=x["face_mask"])
    assert torch.equal(out, expected)


# -------------------------------------------------------------------------------------------------- gradients


def test_gradients_reach_every_trained_parameter_group():
    reference_net, backbone = tiny_emo_models()
    randomize_zero_initialized_layers(backbone)
    reference_net.train()
    backbone.train()
    x = inputs()
    out = run(
        backbone, x, reference_features=conditioned(reference_net, x), speed=x["speed"], face_mask=x["face_mask"]
    )
    out.square().mean().backward()
    for model in (reference_net, backbone):
        without = [n for n, p in model.named_parameters() if p.grad is None]
        assert not without, f"{type(model).__name__}: no gradient for {without[:5]}"
    norms = {}
    for name, parameter in backbone.named_parameters():
        norms[parameter_group(name)] = norms.get(parameter_group(name), 0.0) + parameter.grad.norm().item()
    norms["reference_net"] = sum(p.grad.norm().item() for p in reference_net.parameters())
    assert set(norms) == {"spatial", "temporal", "audio", "speed", "face_locator", "reference_net"}
    assert all(value > 0 for value in norms.values()), norms


def test_gradient_checkpointing_keeps_conditioning_and_gradients():
    results = []
    for checkpointing in (False, True):
        reference_net, backbone = tiny_emo_models()
        randomize_zero_initialized_layers(backbone)
        backbone.train()
        if checkpointing:
            backbone.enable_gradient_checkpointing()
            reference_net.enable_gradient_checkpointing()
        x = inputs()
        features = conditioned(reference_net, x)
        out = run(backbone, x, reference_features=features, speed=x["speed"], face_mask=x["face_mask"])
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in backbone.named_parameters()}
        grads.update({f"ref.{n}": p.grad.clone() for n, p in reference_net.named_parameters()})
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-6)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name


# ------------------------------------------------------------------------------------------------- shape errors


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"sample": torch.zeros(B, 4, H, H)}, r"sample must have shape \(B, 4, F, h, w\)"),
        (
            {"audio_features": torch.zeros(B, F + 1, *AUDIO_SHAPE)},
            r"audio_features must have shape .*\(2, 3, 5, 2, 32\)",
        ),
        ({"audio_features": torch.zeros(B, F, 2, 32)}, r"audio_features must have shape \(B, F, 2m\+1, L, D\)"),
        ({"speed": torch.zeros(B, F + 2)}, r"speed must have shape \(B, F\) = \(2, 3\)"),
        ({"face_mask": torch.zeros(B, 1, 32, 32)}, r"face_mask must have shape \(B, 1, H, W\) = \(2, 1, 64, 64\)"),
    ],
)
@torch.no_grad()
def test_shape_errors_name_the_argument_and_expected_shape(models, change, pattern):
    _, backbone = models
    x = inputs()
    args = {"sample": x["sample"], "audio_features": x["audio_features"], **change}
    with pytest.raises(EMOInputError, match=pattern):
        backbone(args.pop("sample"), 10, args.pop("audio_features"), **args)
    assert issubclass(EMOInputError, ValueError)


# ------------------------------------------------------------------------------------------------- pure pieces


def test_speed_bucket_encoding_and_windows():
    speed = torch.tensor([[0.0, 0.5, 2.0]])
    centers, radii = torch.tensor([0.0, 1.0]), torch.tensor([0.5, 1.0])
    encoding = speed_bucket_encoding(speed, centers, radii)
    assert encoding.shape == (1, 3, 2)
    assert torch.allclose(encoding[0, 1], torch.tanh(torch.tensor([(0.5 - 0.0) / 0.5 * 3, (0.5 - 1.0) / 1.0 * 3])))
    assert encoding[0, 0, 0] == 0  # at a centre the encoding is 0
    windows = window_frames(torch.arange(4.0)[None], 1)
    assert windows.tolist() == [[[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]]
    encoder = SpeedEncoder(centers=(0.0, 1.0), radii=(0.5, 1.0), window_size=3, hidden_dim=8, embed_dim=4)
    assert encoder(speed).shape == (1, 3, 4)
    with pytest.raises(EMOInputError, match="radius must be > 0"):
        SpeedEncoder(centers=(0.0,), radii=(0.0,))

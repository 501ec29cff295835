"""torch.compile(fullgraph=True) on the backbone and the ReferenceNet: no graph break, eager's output, no recompile."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from emo_pipeline import ReferenceFeatures
from emo_pipeline.testing import randomize_zero_initialized_layers, tiny_emo_models

B, F, H = 2, 3, 8


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    reference_net, backbone = tiny_emo_models()
    randomize_zero_initialized_layers(backbone)
    return reference_net.eval(), backbone.eval()


def clip_inputs(reference_net, backbone, seed):
    """One clip's backbone arguments with every conditioning path in use (reference K/V as the pipeline caches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        reference = reference_net(torch.randn(1, 4, H, H, generator=g))
        motion = reference_net(torch.randn(1, 2, 4, H, H, generator=g))
        features = backbone.prepare_reference(ReferenceFeatures(spatial=reference.spatial, temporal=motion.temporal))
    args = (
        torch.randn(B, 4, F, H, H, generator=g),
        torch.tensor(100 + seed),
        torch.randn(B, F, 5, 2, 32, generator=g),
    )
    kwargs = {
        "reference_features": features,
        "face_mask": torch.rand(1, 1, 8 * H, 8 * H, generator=g),
        "speed": torch.rand(1, F, generator=g),
        "return_dict": False,
    }
    return args, kwargs


@torch.no_grad()
def test_backbone_and_reference_net_have_no_graph_breaks(models):
    reference_net, backbone = models
    args, kwargs = clip_inputs(reference_net, backbone, 0)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(backbone)(*args, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    explained = torch._dynamo.explain(reference_net)(torch.randn(1, 2, 4, H, H))
    assert explained.graph_break_count == 0, explained.break_reasons


def video(pipe, seed=0):
    """Three clips (the second and third with motion frames from the one before), as latents."""
    from tests.pipeline_settings import IMAGE, settings, speech

    return pipe(IMAGE, speech(0.4), **settings(seed), output_type="latent").frames


@pytest.fixture(scope="module")
def eager_video():
    from emo_pipeline.testing import tiny_emo_pipeline

    return video(tiny_emo_pipeline())


@torch.no_grad()
def test_plain_torch_compile_of_both_networks_runs_whole_videos_like_eager(eager_video):
    """diffusers' documented pattern, default settings (inductor, automatic dynamic shapes): the ReferenceNet sees the
    portrait's shape, then the motion frames' (it used to fail there: `InductorError: ValueRangeError: Invalid
    ranges`); fp32 latents within 1e-4 of eager; a second video recompiles nothing."""
    from emo_pipeline.testing import tiny_emo_pipeline

    torch._dynamo.reset()
    pipe = tiny_emo_pipeline()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    pipe.reference_net = torch.compile(pipe.reference_net, fullgraph=True)
    assert (video(pipe) - eager_video).abs().max() < 1e-4
    with torch._dynamo.config.patch(error_on_recompile=True):
        video(pipe, seed=1)


@torch.no_grad()
def test_pipe_compile_is_regional_by_default_and_matches_eager(eager_video):
    """`pipe.compile()`: `compile_repeated_blocks(fullgraph=True)` on both UNets (transformer blocks compiled, the
    models themselves not), fp32 latents within 1e-4 of eager; `regional=False` compiles whole models.

    Dynamo's "eager" backend keeps this fast: it traces the same per-block graphs (one per block kind and layer, more
    than dynamo's default limit of 8, which used to fail under fullgraph). Inductor's regional compile of the
    SD1.5-shaped networks, its cold start and its difference from eager: benchmarks/results/compile_sd15_128.json."""
    from emo_pipeline.testing import tiny_emo_pipeline

    torch._dynamo.reset()
    pipe = tiny_emo_pipeline()
    pipe.compile(components=("unet", "reference_net"), backend="eager")
    for model in (pipe.unet, pipe.reference_net):
        assert model._compiled_call_impl is None
        blocks = [m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
        assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert (video(pipe) - eager_video).abs().max() < 1e-4
    whole = tiny_emo_pipeline()
    whole.compile(components=("unet",), regional=False, backend="eager")
    assert whole.unet._compiled_call_impl is not None


@torch.no_grad()
def test_pipeline_compiles_the_vae_decoder_to_the_same_frames():
    """`pipe.compile(components=("vae",))`: the decoder compiled whole (fullgraph) and decoding the same frames.

    Dynamo's "eager" backend keeps this test fast (inductor's C++ build of the decoder takes minutes on 2 cores); it
    traces the same graph. Inductor's speed and frame difference are in benchmarks/results/decode_sd15_128.json."""
    from emo_pipeline import EMOInputError
    from emo_pipeline.testing import tiny_emo_pipeline

    pipe = tiny_emo_pipeline()
    latents = torch.randn(1, 4, 2, H, H, generator=torch.Generator().manual_seed(0))
    expected = pipe.decode_latents(latents, decode_chunk_size=2)
    torch._dynamo.reset()
    pipe.compile(components=("vae",), backend="eager")
    assert pipe.vae.decoder._compiled_call_impl is not None and pipe.unet._compiled_call_impl is None
    assert (pipe.decode_latents(latents, decode_chunk_size=2) - expected).abs().max() < 1e-4
    with pytest.raises(EMOInputError, match="unknown components"):
        pipe.compile(components=("text_encoder",))

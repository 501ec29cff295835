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


@torch.no_grad()
def test_compiled_models_match_eager_and_a_new_clip_does_not_recompile(models):
    """Inductor (the default backend) on CPU: fp32 output within 1e-4 of eager."""
    reference_net, backbone = models
    torch._dynamo.reset()
    compiled_backbone = torch.compile(backbone, fullgraph=True, dynamic=False)
    compiled_reference = torch.compile(reference_net, fullgraph=True, dynamic=False)
    latents = torch.randn(1, 2, 4, H, H)
    eager_features, compiled_features = reference_net(latents), compiled_reference(latents)
    for name, value in eager_features.temporal.items():
        assert (compiled_features.temporal[name] - value).abs().max() < 1e-4, name
    for seed in (0, 1):  # the second clip: new sample, timestep, audio, reference and motion features
        args, kwargs = clip_inputs(reference_net, backbone, seed)
        expected = backbone(*args, **kwargs)[0]
        with torch._dynamo.config.patch(error_on_recompile=seed == 1):
            got = compiled_backbone(*args, **kwargs)[0]
        assert (got - expected).abs().max() < 1e-4


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

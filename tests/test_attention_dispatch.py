"""diffusers' attention backends (`set_attention_backend`, `attention_backend(...)`) reach every attention layer.

A spy replaces the backend's kernel in diffusers' registry and records which layer called it (the layer whose
`to_q` ran last): every attention module of both networks must go through it, in every layer kind (reference
self-attention, audio cross-attention, temporal attention with motion frames, speed attention, Hallo's audio modules,
the ReferenceNet), with the default backend's output within 1e-5. The backends that run on a CPU are tested here;
flash-attn, sage and xformers are GPU-only (README, "Attention backends").
"""

import collections
import contextlib
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from emo_pipeline import ReferenceFeatures
from emo_pipeline.models.backbone import EMOUNet3DConditionModel
from emo_pipeline.testing import TINY_EMO_CONFIG, randomize_zero_initialized_layers, tiny_emo_models, tiny_unet2d

B, F, H = 2, 3, 8
CPU_BACKENDS = ["native", "_native_math", "_native_flash", "flex"]


def layer_kind(name: str) -> str:
    if ".audio_modules." in name:
        return "audio_module"
    if ".speed_attentions." in name:
        return "speed"
    if "motion_modules" in name:
        return "temporal"
    return "reference_attn1" if name.endswith("attn1") else "audio_attn2"


@pytest.fixture(scope="module")
def models():
    """EMO's tiny networks and a Hallo-layout backbone (audio modules), every zero-initialised layer randomised."""
    torch.manual_seed(0)
    reference_net, backbone = tiny_emo_models()
    randomize_zero_initialized_layers(backbone)
    hallo = EMOUNet3DConditionModel.from_unet2d(
        tiny_unet2d(), audio_attention="audio_modules", audio_module_config={"heads": 2}, **TINY_EMO_CONFIG
    )
    randomize_zero_initialized_layers(hallo)
    for module in hallo.modules():  # audio modules' zero convs
        if isinstance(module, torch.nn.Conv2d) and not module.weight.abs().sum():
            torch.nn.init.normal_(module.weight, std=0.1)
    return reference_net.eval(), backbone.eval(), hallo.eval()


def run_all(reference_net, backbone, hallo):
    """Every network once, each conditioning path in use: ReferenceNet features, the EMO backbone with cached
    reference keys/values, motion frames, face and speed, and the Hallo backbone with its guidance mask."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        reference = reference_net(torch.randn(1, 4, H, H, generator=g))
        motion = reference_net(torch.randn(1, 2, 4, H, H, generator=g))
        features = ReferenceFeatures(spatial=reference.spatial, temporal=motion.temporal)
        sample, audio = torch.randn(B, 4, F, H, H, generator=g), torch.randn(B, F, 5, 2, 32, generator=g)
        common = {
            "face_mask": torch.rand(1, 1, 8 * H, 8 * H, generator=g),
            "speed": torch.rand(1, F, generator=g),
            "return_dict": False,
        }
        emo = backbone(sample, 10, audio, backbone.prepare_reference(features), **common)[0]
        masks = {level: tuple(torch.rand(B * F, (H >> level) ** 2, generator=g) for _ in range(3)) for level in (0, 1)}
        hallo_out = hallo(
            sample,
            10,
            audio,
            hallo.prepare_reference(features),
            context_tokens=torch.randn(B * F, 4, 32, generator=g),
            region_masks=masks,
            reference_rows=torch.tensor([False, True]),  # guidance: the unconditional row does not see the reference
            **common,
        )[0]
    return [*motion.spatial.values(), *motion.temporal.values(), emo, hallo_out]


@contextlib.contextmanager
def spy(models, backend: str):
    """Record `(layer, backend)` for every call of diffusers' attention kernels, and every layer's `to_q` call."""
    registry = _AttentionBackendRegistry._backends
    originals = dict(registry)
    current, dispatched, projected = [None], [], []

    def recording(name, kernel):
        def kernel_spy(*args, **kwargs):
            dispatched.append((current[0], name.value))
            return kernel(*args, **kwargs)

        return kernel_spy

    for name, kernel in originals.items():
        registry[name] = recording(name, kernel)
    handles = []
    for prefix, model in zip(("reference_net", "backbone", "hallo"), models):
        for name, module in model.named_modules():
            if isinstance(module, Attention):

                def mark(_module, _inputs, layer=f"{prefix}.{name}"):
                    current[0] = layer
                    projected.append(layer)

                handles.append(module.to_q.register_forward_pre_hook(mark))
    try:
        yield dispatched, projected
    finally:
        registry.clear()
        registry.update(originals)
        for handle in handles:
            handle.remove()


@pytest.fixture
def restore_default(models):
    yield
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    for model in models:
        model.set_default_attn_processor()


@pytest.fixture(scope="module")
def default_outputs(models):
    return run_all(*models)


def all_layers(models) -> set[str]:
    return {
        f"{prefix}.{name}"
        for prefix, model in zip(("reference_net", "backbone", "hallo"), models)
        for name, module in model.named_modules()
        if isinstance(module, Attention)
    }


@pytest.mark.parametrize(
    ("switch", "backend"),
    [("context_manager", b) for b in CPU_BACKENDS] + [("set_attention_backend", b) for b in ("_native_math", "flex")],
)
def test_the_chosen_backend_runs_in_every_attention_layer(models, default_outputs, restore_default, switch, backend):
    with contextlib.ExitStack() as stack:
        if switch == "context_manager":
            stack.enter_context(attention_backend(backend))
        else:
            for model in models:
                model.set_attention_backend(backend)
        dispatched, projected = stack.enter_context(spy(models, backend))
        outputs = run_all(*models)
    layers = all_layers(models)
    assert {layer for layer, _ in dispatched} == layers
    kinds = {layer_kind(name.split(".", 1)[1]) for name in layers if name.startswith("hallo.")}
    assert kinds == {"reference_attn1", "audio_attn2", "temporal", "speed", "audio_module"}
    # Hallo's reference attention under guidance attends its two row ranges separately (the unconditional row to its
    # own keys only), so it needs no mask: every layer, that one included, runs the chosen kernel, none falls back
    split = {layer for layer in layers if layer.startswith("hallo.") and layer_kind(layer[6:]) == "reference_attn1"}
    calls = collections.Counter(layer for layer, _ in dispatched)
    assert all(calls[layer] == (2 if layer in split else 1) * projected.count(layer) for layer in layers), calls
    assert {ran for _, ran in dispatched} == {backend}
    for got, expected in zip(outputs, default_outputs):
        assert (got - expected).abs().max() < 1e-5


def test_split_reference_rows_equal_the_masked_generic_path(models, default_outputs, restore_default):
    """The row ranges of `EMOAttnProcessor` give what any processor computes with the additive reference mask."""
    *_, hallo = models
    hallo.set_attn_processor(AttnProcessor2_0())  # a processor of diffusers: the hook passes tokens and the mask
    outputs = run_all(*models)
    assert (outputs[-1] - default_outputs[-1]).abs().max() < 1e-5


def test_reference_row_runs() -> None:
    from emo_pipeline.models.attention import reference_row_runs

    assert reference_row_runs(torch.tensor([False, True]), 3) == ((0, 3, False), (3, 6, True))
    assert reference_row_runs((True, True, False), 2) == ((0, 4, True), (4, 6, False))
    assert reference_row_runs(None, 2) is None


def test_a_maskless_backend_warns_once_and_falls_back_for_a_mask(restore_default, caplog):
    """A masked call (a reference mask under torch.compile) on a kernel without masks runs on "native", once said."""
    from emo_pipeline.models import attention

    attention._warned_fallbacks.clear()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 5)
    mask[0, ..., 3:] = float("-inf")
    with caplog.at_level(logging.WARNING), attention_backend("_native_flash"):
        first = attention.dispatch_attention(q, k, v, None, mask, None, "layer")
        attention.dispatch_attention(q, k, v, None, mask, None, "layer")
    warnings = [r.getMessage() for r in caplog.records if "takes no attention mask" in r.getMessage()]
    assert len(warnings) == 1 and "'_native_flash'" in warnings[0] and "'native'" in warnings[0]
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask
    ).transpose(1, 2)
    torch.testing.assert_close(first, expected)


def test_set_attention_backend_warns_about_layers_it_cannot_reach(models, restore_default, caplog):
    """A processor set through the processor API (here diffusers' plain SDPA) keeps its own kernel: say so."""
    _, backbone, _ = models
    backbone.set_attn_processor(AttnProcessor2_0())
    with caplog.at_level(logging.WARNING):
        backbone.set_attention_backend("_native_math")
    assert any(
        "AttnProcessor2_0" in r.getMessage() and "keep their own kernel" in r.getMessage() for r in caplog.records
    )
    backbone.set_default_attn_processor()
    assert all(hasattr(p, "_attention_backend") for p in backbone.attn_processors.values())

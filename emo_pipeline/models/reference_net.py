"""ReferenceNet of EMO (arXiv 2402.17485, section 3.2, "Backbone Network" / "Reference-Attention").

A 2D SD1.5 UNet (same architecture and initial weights as the backbone's spatial layers) that encodes the reference
image and the motion frames. It returns no noise prediction, only the features the backbone consumes:
(a) the input of every attn1 (after norm1), for reference attention, and (b) the hidden states at every position
where the backbone has a temporal layer, for the motion frames. Its text cross-attention (attn2) attends to a
stored null context: SD's empty-prompt embedding when conversion had a text encoder, zeros otherwise, so its
features stay in SD's distribution.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.attention import EMOAttentionSwitches, ReferenceFeatures, install_emo_processors
from emo_pipeline.models.utils import extend_init_signature, to_like

__all__ = ["ModelMixin", "ReferenceNet", "temporal_capture_points"]

# SD1.x's CLIP text encoder always returns 77 tokens for a (padded) prompt.
CLIP_CONTEXT_LENGTH = 77


def temporal_capture_points(unet: torch.nn.Module) -> dict[str, str]:
    """`{backbone temporal layer name: 2D UNet module whose output is that layer's input}` for an SD-style UNet.

    In diffusers' motion blocks a temporal layer follows each (resnet, attention) pair of the down/up blocks
    (the resnet alone in blocks without attention) and each attention of the mid block.
    """
    points: dict[str, str] = {}

    def add(kind: str, block: torch.nn.Module) -> None:
        attentions = getattr(block, "attentions", None)
        source = "attentions" if attentions is not None else "resnets"
        for j in range(len(getattr(block, source))):
            points[f"{kind}.motion_modules.{j}"] = f"{kind}.{source}.{j}"

    for i, block in enumerate(unet.down_blocks):
        add(f"down_blocks.{i}", block)
    for j in range(len(getattr(unet.mid_block, "attentions", []))):  # mid: one temporal layer per attention
        points[f"mid_block.motion_modules.{j}"] = f"mid_block.attentions.{j}"
    for i, block in enumerate(unet.up_blocks):
        add(f"up_blocks.{i}", block)
    return points


class _CaptureStore:
    """Where the capture hooks write during one `ReferenceNet.forward` call (None outside a call)."""

    __slots__ = ("spatial", "temporal")

    def __init__(self) -> None:
        self.spatial: dict[str, torch.Tensor] | None = None
        self.temporal: dict[str, torch.Tensor] | None = None


class _CaptureSpatial:
    """Forward pre-hook of an attn1 module: record its input tokens (after norm1), whatever processor runs."""

    def __init__(self, name: str, store: _CaptureStore):
        self.name, self.store = name, store

    def __call__(self, module, args: tuple, kwargs: dict) -> None:
        if self.store.spatial is not None:  # None during gradient-checkpointing recomputation: already captured
            self.store.spatial[self.name] = args[0] if args else kwargs["hidden_states"]


class _CaptureTemporal:
    """Forward hook of the 2D module whose output feeds a backbone temporal layer."""

    def __init__(self, name: str, store: _CaptureStore):
        self.name, self.store = name, store

    def __call__(self, module, inputs: tuple, output) -> None:
        if self.store.temporal is not None:
            self.store.temporal[self.name] = output[0] if isinstance(output, tuple) else output


class ReferenceNet(EMOAttentionSwitches, UNet2DConditionModel):
    """SD1.5 UNet2DConditionModel that returns `ReferenceFeatures` instead of a noise prediction."""

    def __init__(self, *args, null_context_length: int = CLIP_CONTEXT_LENGTH, cross_attention: bool = True, **kwargs):
        """`cross_attention=False`: the transformer blocks have no attn2 (EchoMimic's reference pass skips it:
        its write-mode block runs attn1 then the feed-forward, mutual_self_attention.py:142-151, 204-221)."""
        super().__init__(*args, **kwargs)
        if not cross_attention:
            for module in self.modules():
                if isinstance(module, BasicTransformerBlock):
                    module.attn2 = module.norm2 = None
        self.register_buffer(
            "null_context", torch.zeros(1, null_context_length, self.config.cross_attention_dim), persistent=True
        )
        # No output head: the last capture point is the last up block's output, so nothing after it is needed.
        # Identity modules let diffusers' forward run to its end (no exception for control flow, which
        # torch.compile cannot trace) and keep every parameter used (DDP and the trained-parameter checks need it).
        self.conv_norm_out = None
        self.conv_act = self.conv_out = torch.nn.Identity()
        self._capture = _CaptureStore()
        self._spatial_names = []
        for name, module in self.named_modules():
            if name.endswith(".attn1") and isinstance(module, Attention):
                module.register_forward_pre_hook(_CaptureSpatial(name, self._capture), with_kwargs=True)
                self._spatial_names.append(name)
        self._temporal_points = temporal_capture_points(self)  # in forward order
        modules = dict(self.named_modules())
        for target, source in self._temporal_points.items():
            modules[source].register_forward_hook(_CaptureTemporal(target, self._capture))
        install_emo_processors(self)  # every attention through diffusers' dispatcher (`set_attention_backend`)

    __init__.__signature__ = extend_init_signature(
        UNet2DConditionModel.__init__, null_context_length=77, cross_attention=True
    )
    __init__ = register_to_config(__init__)

    @classmethod
    def from_unet2d(cls, unet: UNet2DConditionModel) -> ReferenceNet:
        """A ReferenceNet with the config and weights of an SD UNet2DConditionModel."""
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        model = cls.from_config(config)
        missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
        dropped = ("conv_norm_out.", "conv_out.")
        unexpected = [k for k in unexpected if not k.startswith(dropped)]
        if unexpected or set(missing) != {"null_context"}:
            raise ValueError(f"ReferenceNet.from_unet2d: missing {missing}, unexpected {unexpected}")
        return to_like(model, unet)

    def set_null_context(self, embedding: torch.Tensor) -> None:
        """Store the attn2 context, e.g. SD's text-encoder output for the empty prompt `(1, 77, 768)`."""
        expected = tuple(self.null_context.shape)
        if tuple(embedding.shape) != expected:
            raise EMOInputError(f"null context must have shape {expected}, got {tuple(embedding.shape)}")
        with torch.no_grad():
            self.null_context.copy_(embedding.to(self.null_context))

    @property
    def temporal_layer_names(self) -> list[str]:
        """Names of the backbone temporal layers this ReferenceNet captures features for."""
        return list(self._temporal_points)

    @property
    def spatial_layer_names(self) -> list[str]:
        """Names of the attn1 modules whose inputs are captured."""
        return list(self._spatial_names)

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor | float | int = 0, context: torch.Tensor | None = None
    ) -> ReferenceFeatures:
        """Encode reference latents.

        `latents (B, 4, h, w)` (a reference image) or `(B, n, 4, h, w)` (n motion frames).
        `context`: attn2 context `(B*n, T, cross_attention_dim)`, one per image in `latents.flatten(0, 1)` order
        (e.g. Hallo's identity tokens); default: the stored null context.
        Returns `ReferenceFeatures` with `spatial[name] (B, n*h*w, C)` (n = 1 for 4-D input) and
        `temporal[name] (B, n, C, h_l, w_l)`.
        """
        # One static graph per input shape under torch.compile, whatever `dynamic` says: the pipeline calls with the
        # portrait's shape, then the motion frames'; an automatic-dynamic recompile of this UNet fails in inductor
        # (`ValueRangeError: Invalid ranges` in the downsamplers' shape arithmetic) and buys nothing here.
        torch._dynamo.mark_static(latents)
        if latents.ndim == 4:
            latents = latents[:, None]
        if latents.ndim != 5 or latents.shape[2] != self.config.in_channels:
            raise EMOInputError(
                f"ReferenceNet latents must have shape (B, {self.config.in_channels}, h, w) or "
                f"(B, n, {self.config.in_channels}, h, w), got {tuple(latents.shape)}"
            )
        batch, frames = latents.shape[:2]
        if frames == 0:
            return ReferenceFeatures()
        flat = latents.flatten(0, 1)
        if context is None:
            context = self.null_context.to(flat.dtype).expand(flat.shape[0], -1, -1)
        elif (
            context.ndim != 3
            or context.shape[0] != flat.shape[0]
            or context.shape[2] != self.config.cross_attention_dim
        ):
            raise EMOInputError(
                f"ReferenceNet context must have shape ({flat.shape[0]}, T, {self.config.cross_attention_dim}) "
                f"(one per image), got {tuple(context.shape)}"
            )
        store = self._capture
        store.spatial, store.temporal = {}, {}
        try:
            super().forward(flat, timestep, encoder_hidden_states=context, return_dict=False)
            spatial, temporal = store.spatial, store.temporal
        finally:
            store.spatial = store.temporal = None
        if not torch.compiler.is_compiling() and (
            len(temporal) != len(self._temporal_points) or len(spatial) != len(self._spatial_names)
        ):
            raise RuntimeError(
                "ReferenceNet: not every capture point ran (a module replaced or a hook removed?); "
                f"captured {len(spatial)} attn1 inputs and {len(temporal)} temporal features"
            )
        spatial = {name: t.reshape(batch, frames * t.shape[1], t.shape[2]) for name, t in spatial.items()}
        temporal = {name: t.reshape(batch, frames, *t.shape[1:]) for name, t in temporal.items()}
        return ReferenceFeatures(spatial=spatial, temporal=temporal)

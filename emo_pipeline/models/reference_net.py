"""ReferenceNet of EMO (arXiv 2402.17485, section 3.2, "Backbone Network" / "Reference-Attention").

A 2D SD1.5 UNet (same architecture and initial weights as the backbone's spatial layers) that encodes the reference
image and the motion frames. It returns no noise prediction, only the features the backbone consumes:
(a) the input of every attn1 (after norm1), for reference attention, and (b) the hidden states at every position
where the backbone has a temporal layer, for the motion frames. Its text cross-attention (attn2) attends to a
stored null context: SD's empty-prompt embedding when conversion had a text encoder, zeros otherwise, so its
features stay in SD's distribution.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.attention import ReferenceCaptureAttnProcessor, ReferenceFeatures
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


class _StopForward(Exception):
    """Raised after the last capture: the rest of the UNet (its output head) is not needed."""


_CAPTURE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("emo_reference_capture", default=None)


def _capture_spatial(name: str, hidden_states: torch.Tensor) -> None:
    store = _CAPTURE.get()
    if store is not None:  # None during gradient-checkpointing recomputation: the forward already captured it
        store["spatial"][name] = hidden_states


class ReferenceNet(UNet2DConditionModel):
    """SD1.5 UNet2DConditionModel that returns `ReferenceFeatures` instead of a noise prediction."""

    def __init__(self, *args, null_context_length: int = CLIP_CONTEXT_LENGTH, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer(
            "null_context", torch.zeros(1, null_context_length, self.config.cross_attention_dim), persistent=True
        )
        # The output head is never run (see _StopForward); dropping it keeps every parameter used, which DDP and
        # "gradients reach every trained parameter" checks need.
        self.conv_norm_out = self.conv_act = self.conv_out = None
        self.set_attn_processor(
            {
                name: ReferenceCaptureAttnProcessor(name.removesuffix(".processor"), _capture_spatial)
                if name.endswith("attn1.processor")
                else processor
                for name, processor in self.attn_processors.items()
            }
        )
        self._temporal_points = temporal_capture_points(self)  # in forward order
        self._spatial_names = [
            n.removesuffix(".processor") for n in self.attn_processors if n.endswith("attn1.processor")
        ]
        modules = dict(self.named_modules())
        last = list(self._temporal_points)[-1]  # in forward order: the last up block's last layer
        for target, source in self._temporal_points.items():
            modules[source].register_forward_hook(self._temporal_hook(target, stop=target == last))

    __init__.__signature__ = extend_init_signature(UNet2DConditionModel.__init__, null_context_length=77)
    __init__ = register_to_config(__init__)

    @staticmethod
    def _temporal_hook(target: str, stop: bool):
        def hook(module, inputs, output):
            store = _CAPTURE.get()
            if store is None:
                return None
            store["temporal"][target] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise _StopForward
            return None

        return hook

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

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[dict]:
        store: dict = {"spatial": {}, "temporal": {}}
        token = _CAPTURE.set(store)
        try:
            yield store
        finally:
            _CAPTURE.reset(token)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor | float | int = 0) -> ReferenceFeatures:
        """Encode reference latents.

        `latents (B, 4, h, w)` (a reference image) or `(B, n, 4, h, w)` (n motion frames).
        Returns `ReferenceFeatures` with `spatial[name] (B, n*h*w, C)` (n = 1 for 4-D input) and
        `temporal[name] (B, n, C, h_l, w_l)`.
        """
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
        flat = latents.flatten(0, 1).to(self.dtype)
        context = self.null_context.to(flat.dtype).expand(flat.shape[0], -1, -1)
        with self._capturing() as store:
            try:
                super().forward(flat, timestep, encoder_hidden_states=context, return_dict=False)
            except _StopForward:
                pass
        if len(store["temporal"]) != len(self._temporal_points) or len(store["spatial"]) != len(self._spatial_names):
            raise RuntimeError(
                "ReferenceNet: not every capture point ran (an attention processor was replaced?); "
                f"captured {len(store['spatial'])} attn1 inputs and {len(store['temporal'])} temporal features"
            )
        spatial = {name: t.reshape(batch, frames * t.shape[1], t.shape[2]) for name, t in store["spatial"].items()}
        temporal = {name: t.reshape(batch, frames, *t.shape[1:]) for name, t in store["temporal"].items()}
        return ReferenceFeatures(spatial=spatial, temporal=temporal)

"""Hallo / Hallo2 checkpoints (fudan-generative-vision/hallo, `net.pth`) in EMO's model classes.

Hallo's networks are EMO's with other options (DESIGN section 6, `docs/hallo_architecture.md`): the backbone is
`EMOUNet3DConditionModel(audio_attention="audio_modules", temporal_norm="per_frame",
disabled_temporal_layers=[down_blocks.3 / up_blocks.0's])`, the ReferenceNet is `ReferenceNet` fed identity tokens as
its attn2 context, the face locator is `FaceLocator(in_channels=3, same_width_convs=True)`, the audio projection is
`AudioProjection(activation="relu")`, and the identity tokens come from `IdentityProjection`. This module maps the
checkpoint's keys onto those classes and states Hallo's per-step recipe (the classifier-free-guidance batch, the
reference bank) in terms of the backbone's forward arguments. No network code of Hallo is copied.

As a pipeline (what `emo-convert --hallo pretrained_models --output DIR` writes)::

    pipe = load_hallo_pipeline("pretrained_models")   # emo_pipeline.hallo_conversion; or EMOPipeline.from_pretrained
    pipe.write_video("out.mp4", "portrait.jpg", "speech.wav", mode="fast")     # or mode="parity"

Both modes run through the pipeline's one sampling loop (`emo_pipeline.sampling`; the family module
`emo_pipeline.families.hallo`); `emo_pipeline.hallo_inputs` computes Hallo's conditioning from
a portrait and a track (landmarks -> masks, insightface embedding, wav2vec2 features).

The networks alone (a released `net.pth` with SD1.5's `unet/config.json`)::

    models = load_hallo_models("pretrained_models/hallo/net.pth", unet_config="sd15/unet/config.json")
    id_tokens = models.identity_tokens(face_emb)                          # (2, 4, 768): [uncond, cond]
    reference = models.encode_reference(ref_latents, id_tokens)           # once per clip
    eps = models.denoise(latents, t, reference, id_tokens, audio_tokens, face_features, masks)   # (2, 4, f, h, w)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from emo_pipeline.audio import FeatureWindows
from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.animatediff import original_motion_key
from emo_pipeline.models.attention import ReferenceFeatures
from emo_pipeline.models.backbone import EMOUNet3DConditionModel
from emo_pipeline.models.face_locator import controlnet_face_locator_key
from emo_pipeline.models.identity import IdentityProjection
from emo_pipeline.models.reference_net import ReferenceNet
from emo_pipeline.models.utils import ZERO_SNR_V_PREDICTION_SCHEDULER, quiet_diffusers

__all__ = [
    "HALLO_MODES",
    "HALLO_PREFIXES",
    "HalloConditioning",
    "HalloModels",
    "build_hallo_models",
    "check_hallo_state_dict",
    "convert_hallo_state_dict",
    "hallo_scheduler",
    "infer_hallo_sizes",
    "load_hallo_models",
    "load_hallo_state_dict",
    "load_hallo_weights",
]

HALLO_PREFIXES = ("reference_unet.", "denoising_unet.", "face_locator.", "imageproj.", "audioproj.")

# Backbone parameters Hallo's checkpoint does not have and does not need: EMO's speed branch (inactive without a
# speed input).
_BACKBONE_NOT_IN_HALLO = ("speed_encoder.", ".speed_norms.", ".speed_attentions.")


def load_hallo_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Hallo's `net.pth` read with `torch.load(weights_only=True)`; an error names what else the file looks like."""
    path = Path(path)
    if not path.is_file():
        raise EMOInputError(f"Hallo checkpoint {path} does not exist (expected pretrained_models/hallo/net.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise EMOInputError(
            f"cannot read Hallo checkpoint {path} (a torch.save of Net.state_dict()): {error}"
        ) from error
    check_hallo_state_dict(state, str(path))
    return state


def check_hallo_state_dict(state: object, name: str = "checkpoint") -> None:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EMOInputError(f"{name} is not a state dict of tensors; Hallo's net.pth is a plain Net.state_dict()")
    missing = [p for p in HALLO_PREFIXES if not any(k.startswith(p) for k in state)]
    if not missing:
        return
    keys = list(state)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        kind = "an original Stable Diffusion checkpoint"
    elif any("motion_modules" in k for k in keys) and not any(k.startswith("denoising_unet.") for k in keys):
        kind = "an AnimateDiff motion-module checkpoint"
    elif any(k.startswith(("audio_proj.", "speed_encoder.")) for k in keys):
        kind = "an EMO backbone (load it with EMOUNet3DConditionModel.from_pretrained)"
    elif any(k.startswith("conv_in.") for k in keys):
        kind = "a diffusers UNet"
    else:
        kind = "another project's checkpoint"
    raise EMOInputError(
        f"{name} does not look like Hallo's net.pth (it looks like {kind}): it lacks the prefixes {missing} "
        f"(a Hallo net.pth has {list(HALLO_PREFIXES)})"
    )


_AUDIO_PROJ_KEYS = {"proj1": "mlp.0", "proj2": "mlp.2", "proj3": "mlp.4", "norm": "norm"}


def convert_hallo_state_dict(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Hallo's `Net.state_dict()` -> `{"reference_net": ..., "backbone": ..., "identity_proj": ...}` in our key names.

    The face locator and the audio projection go into the backbone (`face_locator.*`, `audio_proj.*`). Hallo's
    stored sinusoid tables (`pos_encoder.pe`) are loaded as the temporal layers' `pos_embed.pe`: Hallo runs with the
    stored values (fp16-rounded in a fp16 checkpoint), not with freshly computed ones.
    Raises `EMOInputError` for a key it cannot place.
    """
    check_hallo_state_dict(state)
    out: dict[str, dict[str, torch.Tensor]] = {"reference_net": {}, "backbone": {}, "identity_proj": {}}
    unplaced = []
    for key, value in state.items():
        if key.startswith("reference_unet."):
            out["reference_net"][key.removeprefix("reference_unet.")] = value
        elif key.startswith("denoising_unet."):
            inner = key.removeprefix("denoising_unet.")
            if ".motion_modules." in inner:
                if ".pos_encoder.pe" in inner:
                    # Hallo keeps one table per attention block, diffusers one per transformer block (both attention
                    # blocks use it); Hallo's strict load overwrites the computed table, so the stored one (fp16 in a
                    # fp16 checkpoint) is what it runs with.
                    block, _, rest = inner.partition(".attention_blocks.")
                    if not rest.startswith("0."):
                        first = key.replace(".attention_blocks." + rest.split(".")[0] + ".", ".attention_blocks.0.")
                        if first in state and not torch.equal(state[first], value):
                            unplaced.append(key)  # different tables per attention block: diffusers has one
                        continue
                    out["backbone"][original_motion_key(block) + ".pos_embed.pe"] = value
                    continue
                inner = original_motion_key(inner)
            out["backbone"][inner] = value
        elif key.startswith("face_locator."):
            out["backbone"]["face_locator." + controlnet_face_locator_key(key.removeprefix("face_locator."))] = value
        elif key.startswith("audioproj."):
            module, rest = key.removeprefix("audioproj.").split(".", 1)
            if module not in _AUDIO_PROJ_KEYS:
                unplaced.append(key)
                continue
            out["backbone"][f"audio_proj.{_AUDIO_PROJ_KEYS[module]}.{rest}"] = value
        elif key.startswith("imageproj."):
            out["identity_proj"][key.removeprefix("imageproj.")] = value
        else:
            unplaced.append(key)
    if unplaced:
        raise EMOInputError(f"Hallo checkpoint has {len(unplaced)} keys no model takes, e.g. {unplaced[:5]}")
    return out


def _disabled_temporal_layers(config: dict) -> list[str]:
    """Hallo runs no motion module in blocks without attention (the last down block and the first up block)."""
    names = []
    layers = config["layers_per_block"]
    for i, kind in enumerate(config["down_block_types"]):
        if "CrossAttn" not in kind:
            names += [f"down_blocks.{i}.motion_modules.{j}" for j in range(layers)]
    for i, kind in enumerate(config["up_block_types"]):
        if "CrossAttn" not in kind:
            names += [f"up_blocks.{i}.motion_modules.{j}" for j in range(layers + 1)]
    return names


@dataclass
class HalloModels:
    """Hallo's five networks as EMO model instances (face locator and audio projection inside the backbone)."""

    reference_net: ReferenceNet
    backbone: EMOUNet3DConditionModel
    identity_proj: IdentityProjection
    bank_dtype: torch.dtype | None = torch.float16  # Hallo stores the reference bank as fp16 (parity option)

    def to(self, *args, **kwargs) -> HalloModels:
        for model in (self.reference_net, self.backbone, self.identity_proj):
            model.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def identity_tokens(self, face_emb: torch.Tensor) -> torch.Tensor:
        """`(1, 512)` face embedding -> `(2, T, C)` tokens `[projection of zeros (uncond), of face_emb (cond)]`."""
        return self.identity_proj(torch.cat([torch.zeros_like(face_emb), face_emb]))

    @torch.no_grad()
    def audio_tokens(self, audio_windows: torch.Tensor) -> torch.Tensor:
        """`(1, f, 5, layers, dim)` windowed wav2vec2 states of one clip -> `(f, 32, C)` tokens (cond branch)."""
        return self.backbone.audio_proj(audio_windows)

    @torch.no_grad()
    def face_features(self, face_region: torch.Tensor) -> torch.Tensor:
        """`(1, 3, H, W)` face box in [0, 1] -> `(1, C, h, w)` (added to conv_in of every frame; cond branch)."""
        return self.backbone.face_locator(face_region)

    @torch.no_grad()
    def encode_reference(self, ref_latents: torch.Tensor, id_tokens: torch.Tensor) -> ReferenceFeatures:
        """Hallo's ReferenceNet write pass for the guidance batch `[uncond, cond]`.

        `ref_latents (1 + n, 4, h, w)`: the source image then the n motion frames (VAE mean x 0.18215).
        `id_tokens (2, T, C)` from `identity_tokens`. Hallo runs the batch `[src, mf_1..mf_n] x 2` at timestep 0 with
        attn2 context `id_tokens[r % 2]` for row r (docs/hallo_architecture.md section 3). Returns the backbone's
        reference tokens (`spatial`, the source image's attn1 inputs, `(2, h_l*w_l, C)`) and motion-frame features
        (`temporal`, the motion frames' attn1 inputs of the block's spatial transformer, `(2, n, C, h_l, w_l)`),
        rounded to `bank_dtype` as Hallo's bank is. The two copies are `tiled` over the frames as Hallo's read mode
        hands them out: mutual_self_attention.py:235-246 calls `.repeat(1, f, 1, 1)` on the 3-D bank `(2, L, C)`,
        which tiles the copies over the `2f` rows (row i gets copy i % 2) instead of repeating each per frame, so
        the cond branch's even frames see the copy the ReferenceNet ran with the uncond identity tokens.
        """
        frames = ref_latents.shape[0]
        latents = ref_latents[None].repeat(2, 1, 1, 1, 1)  # (2, 1 + n, 4, h, w)
        rows = torch.arange(2 * frames, device=id_tokens.device) % 2
        features = self.reference_net(latents, 0, context=id_tokens[rows].to(ref_latents.dtype))
        spatial, temporal = {}, {}
        for name, tokens in features.spatial.items():
            tokens = self._round(tokens.reshape(2, frames, -1, tokens.shape[-1]))  # (2, 1 + n, L, C)
            spatial[name] = tokens[:, 0]
            temporal.update(self._motion_features(name, tokens[:, 1:]))
        return ReferenceFeatures(spatial=spatial, temporal=temporal, tiled=True)

    def _bank_context(self, id_tokens: torch.Tensor, num_motion_frames: int, images: range) -> torch.Tensor:
        """attn2 context of images `images` (0 = source, 1..n = motion frames) of both copies of Hallo's bank batch:
        row r = copy * (1 + n) + image gets `id_tokens[r % 2]` (the tiling of `encode_reference`)."""
        rows = [copy * (1 + num_motion_frames) + image for copy in range(2) for image in images]
        return id_tokens[torch.tensor(rows, device=id_tokens.device) % 2]

    @torch.no_grad()
    def encode_source(
        self, source_latents: torch.Tensor, id_tokens: torch.Tensor, num_motion_frames: int
    ) -> ReferenceFeatures:
        """The source image's part of `encode_reference` alone, unrounded and tiled (fast mode: once per video).

        The ReferenceNet treats every image of its batch independently, so running the source image apart from the
        motion frames (with the attn2 context `encode_reference` gives its rows) computes the same tokens.
        Returns `spatial (2, h_l*w_l, C)` with `tiled=True` (as `encode_reference`).
        """
        latents = source_latents[None].repeat(2, 1, 1, 1, 1)  # (2, 1, 4, h, w)
        context = self._bank_context(id_tokens, num_motion_frames, range(1))
        features = self.reference_net(latents, 0, context=context.to(source_latents.dtype))
        return ReferenceFeatures(spatial=features.spatial, tiled=True)

    @torch.no_grad()
    def encode_motion(self, motion_latents: torch.Tensor, id_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The motion frames' part of `encode_reference` alone, unrounded: `temporal {name: (2, n, C, h_l, w_l)}`."""
        num_motion = motion_latents.shape[0]
        if num_motion == 0:
            return {}
        latents = motion_latents[None].repeat(2, 1, 1, 1, 1)  # (2, n, 4, h, w)
        context = self._bank_context(id_tokens, num_motion, range(1, 1 + num_motion))
        features = self.reference_net(latents, 0, context=context.to(motion_latents.dtype))
        temporal = {}
        for name, tokens in features.spatial.items():
            temporal.update(self._motion_features(name, tokens.reshape(2, num_motion, -1, tokens.shape[-1])))
        return temporal

    def _motion_features(self, name: str, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """ReferenceNet attn1 inputs `(2, n, L, C)` of motion frames -> `{temporal layer: (2, n, C, side, side)}`:
        Hallo feeds the first transformer's norm1 tokens of each attention block to that block's motion module."""
        num_motion = tokens.shape[1]
        block, _, rest = name.partition(".attentions.")
        index = rest.split(".")[0]
        temporal_name = f"{block}.motion_modules.{index}"
        if num_motion == 0 or rest != f"{index}.transformer_blocks.0.attn1":
            return {}
        if temporal_name not in self.backbone.temporal_layers:
            return {}
        side = int(round(tokens.shape[2] ** 0.5))
        if side * side != tokens.shape[2]:
            raise EMOInputError(f"Hallo needs square latents; layer {name} has {tokens.shape[2]} tokens")
        return {temporal_name: tokens.reshape(2, num_motion, side, side, -1).permute(0, 1, 4, 2, 3)}

    def _round(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens if self.bank_dtype is None else tokens.to(self.bank_dtype).to(tokens.dtype)

    def guidance_inputs(
        self,
        id_tokens: torch.Tensor,
        audio_tokens: torch.Tensor,
        face_features: torch.Tensor,
        region_masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        motion_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> dict:
        """The backbone's conditioning of the guidance batch `[uncond, cond]` for one clip (the same at every step):
        the uncond branch gets zero audio tokens and face features, no reference tokens (`reference_rows`), the
        same identity tokens' uncond row, motion frames and masks (Hallo's recipe).

        `id_tokens (2, T, C)`; `audio_tokens (f, T, C)` and `face_features (1, C, h, w)` of the cond branch;
        `region_masks {level: (full, face, lip)}`, each `(1, h_l*w_l)`.
        """
        frames = audio_tokens.shape[0]
        return {
            "audio_tokens": torch.cat([torch.zeros_like(audio_tokens), audio_tokens]),
            "face_features": torch.cat([torch.zeros_like(face_features), face_features]),
            "context_tokens": id_tokens.repeat_interleave(frames, dim=0),
            "region_masks": region_masks,
            "region_scales": tuple(motion_scale),
            "reference_rows": torch.tensor([False, True], device=audio_tokens.device),
        }

    @torch.no_grad()
    def step(self, latents: torch.Tensor, timestep: torch.Tensor | int, reference: ReferenceFeatures, inputs: dict):
        """Both guidance branches of one step: `(2, 4, f, h, w)`, row 0 uncond, row 1 cond (v-prediction).

        `latents (1, 4, f, h, w)`; `reference` from `encode_reference` (or `encode_source` + `encode_motion`, maybe
        with keys/values from the backbone's `prepare_reference`); `inputs` from `guidance_inputs`.
        """
        sample = torch.cat([latents, latents])
        return self.backbone(sample, timestep, reference_features=reference, return_dict=False, **inputs)[0]

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | int,
        reference: ReferenceFeatures,
        id_tokens: torch.Tensor,
        audio_tokens: torch.Tensor,
        face_features: torch.Tensor,
        region_masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        motion_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> torch.Tensor:
        """`step` with the clip's conditioning given directly (see `guidance_inputs`)."""
        inputs = self.guidance_inputs(id_tokens, audio_tokens, face_features, region_masks, motion_scale)
        return self.step(latents, timestep, reference, inputs)


HALLO_VAE_SCALE = 0.18215  # Hallo hard-codes SD's factor (face_animate.py), not vae.config.scaling_factor


def hallo_scheduler(**overrides) -> DDIMScheduler:
    """Hallo's sampler (configs/inference/default.yaml + inference.py:185-192): DDIM, v-prediction, zero-SNR."""
    return DDIMScheduler(**{**ZERO_SNR_V_PREDICTION_SCHEDULER, **overrides})


HALLO_MODES = ("fast", "parity")


@dataclass
class HalloConditioning:
    """Hallo's preprocessed inputs for one video (what `emo_pipeline.hallo_inputs` computes from a portrait and a
    track; pass one to the pipeline as `hallo_conditioning=` to skip that front end).

    source_image: `(1, 3, H, W)` in [-1, 1], the square portrait. face_embedding: `(1, 512)` raw insightface
    embedding. face_region: `(1, 3, H, W)` in [0, 1], the face locator input. region_masks: `{level: (full, face,
    lip)}`, each `(1, r*r)` in [0, 1], r = H / 8 / 2**level. audio_features: `(T, layers, dim)` per-frame wav2vec2
    states (not windowed), T at least the video's frames (Hallo pads to whole clips); or an iterator of consecutive
    chunks of them (`hallo_inputs.iter_hallo_audio_features`: one per Hallo2 segment, computed when the clip loop
    reaches them, so long audio is never held whole) with `audio_frames` = T; such a conditioning serves one
    generation. audio_length: frames of the video (default T).
    """

    source_image: torch.Tensor
    face_embedding: torch.Tensor
    face_region: torch.Tensor
    region_masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    audio_features: torch.Tensor | Iterator[torch.Tensor]
    audio_length: int | None = None
    audio_frames: int | None = None
    _windows: FeatureWindows | None = field(default=None, init=False, repr=False)

    @property
    def num_audio_frames(self) -> int:
        """T: frames of audio features (Hallo: padded to whole clips)."""
        if torch.is_tensor(self.audio_features):
            return self.audio_features.shape[0]
        return self.audio_frames

    @property
    def num_frames(self) -> int:
        return self.audio_length if self.audio_length is not None else self.num_audio_frames

    def check(self, window: int | None = None) -> None:
        """Raise `EMOInputError` naming the first field whose shape does not fit the others."""
        image = self.source_image
        if image.ndim != 4 or image.shape[:2] != (1, 3) or image.shape[2] != image.shape[3]:
            raise EMOInputError(f"hallo_conditioning.source_image must be (1, 3, S, S), got {tuple(image.shape)}")
        if tuple(self.face_region.shape) != tuple(image.shape):
            raise EMOInputError(
                f"hallo_conditioning.face_region must have the source image's shape {tuple(image.shape)}, got "
                f"{tuple(self.face_region.shape)}"
            )
        if self.face_embedding.ndim != 2 or self.face_embedding.shape[0] != 1:
            raise EMOInputError(
                f"hallo_conditioning.face_embedding must be (1, 512), got {tuple(self.face_embedding.shape)}"
            )
        if not torch.is_tensor(self.audio_features):
            if not isinstance(self.audio_frames, int) or self.audio_frames < 1:
                raise EMOInputError(
                    "hallo_conditioning.audio_features is an iterator of chunks: give their total frame count T as "
                    f"audio_frames, got {self.audio_frames!r}"
                )
        elif self.audio_features.ndim != 3:
            raise EMOInputError(
                "hallo_conditioning.audio_features must be (T, layers, dim) per-frame wav2vec2 states, got "
                f"{tuple(self.audio_features.shape)}"
            )
        if not 0 < self.num_frames <= self.num_audio_frames:
            raise EMOInputError(
                f"hallo_conditioning.audio_length ({self.audio_length}) must be in [1, T = {self.num_audio_frames}]"
            )
        missing = [level for level in range(4) if level not in self.region_masks]
        if missing:
            raise EMOInputError(f"hallo_conditioning.region_masks lacks levels {missing} (needs 0..3)")

    def audio_windows(self, start: int, stop: int, window: int) -> torch.Tensor:
        """`(stop - start, window, layers, dim)`: frame i gets frames i-m..i+m, clamped to the whole track (Hallo's
        `process_audio_emb` over the padded sequence)."""
        m = window // 2
        if not torch.is_tensor(self.audio_features):  # chunks: consumed once, front to back
            if self._windows is None:
                self._windows = FeatureWindows(iter(self.audio_features), self.audio_frames, m)
            elif start == 0:
                raise EMOInputError(
                    "this hallo_conditioning's audio chunks were consumed by an earlier generation; build a new one "
                    "(or pass the features as one tensor)"
                )
            return self._windows.window(start, stop)
        last = self.audio_features.shape[0] - 1
        index = (torch.arange(start, stop)[:, None] + torch.arange(-m, m + 1)).clamp(0, last)
        return self.audio_features[index.to(self.audio_features.device)]


def build_hallo_models(
    unet_config: dict | str | os.PathLike,
    audio_projection_config: dict | None = None,
    identity_config: dict | None = None,
    face_locator_channels: tuple[int, ...] = (16, 32, 64, 128),
) -> HalloModels:
    """Randomly initialised Hallo networks in EMO's classes, from SD's `unet/config.json` (dict or path).

    `audio_projection_config`: `AudioProjection` fields (default Hallo's: window 5, 12 wav2vec2 layers x 768, 32
    tokens, hidden 512, ReLU); `identity_config`: `IdentityProjection` fields (default 512 -> 4 x 768).
    """
    if not isinstance(unet_config, dict):
        unet_config = json.loads(Path(unet_config).read_text())
    unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    cross_dim = unet_config.get("cross_attention_dim", 768)
    audio = {"activation": "relu", "output_dim": cross_dim, **(audio_projection_config or {})}
    identity = {"output_dim": cross_dim, **(identity_config or {})}
    with quiet_diffusers():
        unet = UNet2DConditionModel.from_config(unet_config)
        reference_net = ReferenceNet.from_config(unet.config)
        backbone = EMOUNet3DConditionModel.from_unet2d(
            unet,
            load_weights=False,
            audio_projection_config=audio,
            face_locator_config={
                "in_channels": 3,
                "channels": list(face_locator_channels),
                "out_channels": unet_config["block_out_channels"][0],
                "same_width_convs": True,
            },
            audio_attention="audio_modules",
            audio_module_config={
                "heads": unet_config.get("attention_head_dim", 8),
                "cross_attention_dim": audio["output_dim"],
            },
            temporal_norm="per_frame",
            disabled_temporal_layers=_disabled_temporal_layers(unet_config),
        )
    return HalloModels(reference_net, backbone.eval(), IdentityProjection(**identity).eval())


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, may_miss: tuple[str, ...]) -> None:
    own = model.state_dict()
    shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in shapes}, strict=False)
    missing = [k for k in missing if not any(part in k for part in may_miss) and k not in shapes]
    if missing or unexpected or shapes:
        raise EMOInputError(
            f"Hallo checkpoint does not fit the {name}: {len(missing)} missing keys (e.g. {missing[:5]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:5]}), {len(shapes)} with other shapes "
            f"(e.g. {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shapes[:3]]}); check unet_config and "
            "the audio/identity projection sizes"
        )


def load_hallo_weights(models: HalloModels, state: dict[str, torch.Tensor]) -> HalloModels:
    """Load a Hallo `Net.state_dict()` into `models`; every key must land and every needed weight be present."""
    converted = convert_hallo_state_dict(state)
    dtype = next(models.backbone.parameters()).dtype
    converted = {part: {k: v.to(dtype) for k, v in sd.items()} for part, sd in converted.items()}
    _load(models.reference_net, converted["reference_net"], "ReferenceNet", ("null_context",))
    _load(models.backbone, converted["backbone"], "backbone", _BACKBONE_NOT_IN_HALLO)
    _load(models.identity_proj, converted["identity_proj"], "identity projection", ())
    return models


def infer_hallo_sizes(state: dict[str, torch.Tensor], audio_dim: int = 768, window_size: int = 5) -> dict:
    """`build_hallo_models` size arguments read from the checkpoint's shapes.

    The audio projection's input is `window_size * num_layers * audio_dim` wide; the weights cannot split it, so the
    wav2vec2 width `audio_dim` (768 for wav2vec2-base, Hallo's) and the window (Hallo's fixed 5) are given.
    """
    check_hallo_state_dict(state)
    try:
        proj1, proj3 = state["audioproj.proj1.weight"], state["audioproj.proj3.weight"]
        audio_out = state["audioproj.norm.weight"].shape[0]
        identity_proj, identity_out = state["imageproj.proj.weight"], state["imageproj.norm.weight"].shape[0]
        blocks = sorted(
            int(k.split(".")[2]) for k in state if k.startswith("face_locator.blocks.") and k.endswith(".weight")
        )
        channels = [state["face_locator.conv_in.weight"].shape[0]]
        channels += [state[f"face_locator.blocks.{i}.weight"].shape[0] for i in blocks if i % 2 == 1]
    except KeyError as error:
        raise EMOInputError(f"Hallo checkpoint lacks {error.args[0]!r}; is it a complete net.pth?") from error
    flat = proj1.shape[1]
    if flat % (window_size * audio_dim):
        raise EMOInputError(
            f"audioproj.proj1 takes {flat} features, not a multiple of window {window_size} x audio_dim {audio_dim}; "
            "pass the wav2vec2 hidden size the checkpoint was trained with as audio_dim"
        )
    return {
        "audio_projection_config": {
            "window_size": window_size,
            "num_layers": flat // (window_size * audio_dim),
            "audio_dim": audio_dim,
            "hidden_dim": proj1.shape[0],
            "num_tokens": proj3.shape[0] // audio_out,
            "output_dim": audio_out,
        },
        "identity_config": {
            "embed_dim": identity_proj.shape[1],
            "num_tokens": identity_proj.shape[0] // identity_out,
            "output_dim": identity_out,
        },
        "face_locator_channels": tuple(channels),
    }


def load_hallo_models(
    path: str | os.PathLike, unet_config: dict | str | os.PathLike, audio_dim: int = 768, window_size: int = 5
) -> HalloModels:
    """Hallo's networks with the weights of its `net.pth` at `path` (sizes from the weights, `infer_hallo_sizes`).

    `unet_config`: SD1.5's `unet/config.json` (dict or path), which Hallo builds both UNets from.
    Raises `EMOInputError` when the file is not a Hallo checkpoint or a key does not fit.
    """
    state = load_hallo_state_dict(path)
    sizes = infer_hallo_sizes(state, audio_dim=audio_dim, window_size=window_size)
    return load_hallo_weights(build_hallo_models(unet_config, **sizes), state)

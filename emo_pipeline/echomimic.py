"""EchoMimic (antgroup/echomimic, Apache-2.0) weights in our classes (docs/echomimic_architecture.md).

EchoMimic's networks are ours with other options: the backbone's attn2 attends to whisper-tiny tokens (width 384,
no audio projection) and its output is scaled by 3.0; the ReferenceNet runs without attn2; a face locator with
channels (16, 32, 96, 256) on a 1-channel face mask (pose variants: 3-channel landmark renders). The whole video is
denoised jointly in context windows (`emo_pipeline.families.echomimic`, driven by `emo_pipeline.sampling`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, SchedulerMixin, UNet2DConditionModel  # noqa: F401

# (diffusers' loader looks the base classes of a saved component up in its module: SchedulerMixin for
# EchoMimicAccScheduler)
from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.animatediff import original_motion_key
from emo_pipeline.models.attention import ReferenceFeatures
from emo_pipeline.models.backbone import EMOUNet3DConditionModel
from emo_pipeline.models.face_locator import controlnet_face_locator_key
from emo_pipeline.models.reference_net import ReferenceNet
from emo_pipeline.models.utils import ZERO_SNR_V_PREDICTION_SCHEDULER, quiet_diffusers

__all__ = [
    "ECHOMIMIC_VARIANTS",
    "EchoMimicAccScheduler",
    "EchoMimicModels",
    "build_echomimic_models",
    "convert_echomimic_state_dicts",
    "echomimic_scheduler",
]

ECHOMIMIC_REPO = "https://github.com/antgroup/echomimic"
ECHOMIMIC_VAE_SCALE = 0.18215  # hard-coded in EchoMimic's pipelines
ECHOMIMIC_MODES = ("fast", "parity")
FACE_LOCATOR_CHANNELS = (16, 32, 96, 256)  # infer_audio2vid.py:150
AUDIO_ATTENTION_SCALE = 3.0  # mutual_self_attention.py:104 audio_feature_ratio
WHISPER_WINDOW = 10  # whisper steps per frame (audio2feature.py get_sliced_feature)
WHISPER_DIM = 384
# release file names per variant (configs/prompts/animation*.yaml) and the scripts' defaults
ECHOMIMIC_VARIANTS = {
    "audio": {
        "denoising_unet": "denoising_unet.pth",
        "reference_unet": "reference_unet.pth",
        "motion_module": "motion_module.pth",
        "face_locator": "face_locator.pth",
        "face_channels": 1,
        "num_inference_steps": 30,
        "guidance_scale": 2.5,
        "acc": False,
    },
    "acc": {
        "denoising_unet": "denoising_unet_acc.pth",
        "reference_unet": "reference_unet.pth",
        "motion_module": "motion_module_acc.pth",
        "face_locator": "face_locator.pth",
        "face_channels": 1,
        "num_inference_steps": 6,
        "guidance_scale": 1.0,
        "acc": True,
    },
    "pose": {
        "denoising_unet": "denoising_unet_pose.pth",
        "reference_unet": "reference_unet_pose.pth",
        "motion_module": "motion_module_pose.pth",
        "face_locator": "face_locator_pose.pth",
        "face_channels": 3,
        "num_inference_steps": 30,
        "guidance_scale": 2.5,
        "acc": False,
    },
    "pose_acc": {
        "denoising_unet": "denoising_unet_pose_acc.pth",
        "reference_unet": "reference_unet_pose.pth",
        "motion_module": "motion_module_pose_acc.pth",
        "face_locator": "face_locator_pose.pth",
        "face_channels": 3,
        "num_inference_steps": 6,
        "guidance_scale": 1.0,
        "acc": True,
    },
}
SCHEDULER_CONFIG = ZERO_SNR_V_PREDICTION_SCHEDULER  # configs/inference/inference_v2.yaml noise_scheduler_kwargs


def echomimic_scheduler(acc: bool = False, **overrides) -> DDIMScheduler:
    """EchoMimic's DDIM (v-prediction, zero terminal SNR, trailing); `acc=True`: with its acc step rule."""
    cls = EchoMimicAccScheduler if acc else DDIMScheduler
    return cls(**{**SCHEDULER_CONFIG, **overrides})


class EchoMimicAccScheduler(DDIMScheduler):
    """DDIM with EchoMimic's acc step rule (pipeline_echo_mimic_acc.py:517-519, src/utils/step_func.py): the
    velocity prediction is turned into x0, then into the velocity that points from the sample to x0 at t = -1
    (alpha = 1), and DDIM steps with that. In exact arithmetic the two velocities are equal; EchoMimic's acc weights
    were distilled with it, and parity keeps its roundings. A diffusers scheduler, so `set_scheduler` stays the one
    switch (`EchoMimicAccScheduler.from_config(DDIMScheduler config)` and back)."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, **kwargs):
        alphas = self.alphas_cumprod.to(sample.device)
        t = int(timestep)
        alpha_t = alphas[max(t, 0)] if t >= 0 else torch.ones((), device=sample.device)
        a_t, b_t = (alpha_t**0.5).to(sample.dtype), ((1 - alpha_t) ** 0.5).to(sample.dtype)
        x0 = a_t * sample - b_t * model_output
        one = torch.ones((), dtype=alphas.dtype, device=sample.device)
        a_s, b_s = (one**0.5).to(sample.dtype), ((1 - one) ** 0.5).to(sample.dtype)
        velocity = (x0 - (a_s * a_t + b_s * b_t) * sample) / (b_s * a_t - a_s * b_t)
        return super().step(velocity, timestep, sample, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------- networks


@dataclass
class EchoMimicModels:
    """EchoMimic's networks as EMO model instances (the face locator inside the backbone)."""

    reference_net: ReferenceNet
    backbone: EMOUNet3DConditionModel
    bank_dtype: torch.dtype | None = torch.float16  # EchoMimic casts the reference bank to fp16 (parity)

    def to(self, *args, **kwargs) -> EchoMimicModels:
        self.reference_net.to(*args, **kwargs)
        self.backbone.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def encode_reference(self, ref_latents: torch.Tensor) -> ReferenceFeatures:
        """`(1, 4, h, w)` reference latents -> the attn1 inputs of every layer `(1, h_l*w_l, C)`, rounded to
        `bank_dtype` as EchoMimic's bank is (`update(dtype=torch.float16)`), at timestep 0."""
        features = self.reference_net(ref_latents, 0)
        spatial = {
            name: tokens if self.bank_dtype is None else tokens.to(self.bank_dtype).to(tokens.dtype)
            for name, tokens in features.spatial.items()
        }
        return ReferenceFeatures(spatial=spatial)

    @torch.no_grad()
    def face_features(self, face_mask: torch.Tensor) -> torch.Tensor:
        """`(1, 1, H, W)` face mask in [0, 1] -> `(1, C, h, w)` added after conv_in to every frame; pose variants:
        `(1, f, 3, H, W)` landmark renders -> `(1, f, C, h, w)`, one per frame."""
        locator = self.backbone.face_locator
        if face_mask.ndim == 5:
            return locator(face_mask.flatten(0, 1).to(self.backbone.dtype)).unflatten(0, face_mask.shape[:2])
        return locator(face_mask.to(self.backbone.dtype))

    def guidance_inputs(self, audio_tokens: torch.Tensor, face_features: torch.Tensor, guided: bool) -> dict:
        """Backbone conditioning of one window: `audio_tokens (f, T, 384)` and `face_features (1, C, h, w)` of the
        cond branch. With guidance the batch is `[uncond, cond]`: the uncond branch gets zero audio tokens (attn2
        still adds its output bias, times 3), zero face features and self-attention without reference tokens."""
        if not guided:
            return {"audio_tokens": audio_tokens, "face_features": face_features}
        return {
            "audio_tokens": torch.cat([torch.zeros_like(audio_tokens), audio_tokens]),
            "face_features": torch.cat([torch.zeros_like(face_features), face_features]),
            "reference_rows": torch.tensor([False, True], device=audio_tokens.device),
        }

    @torch.no_grad()
    def predict(self, window: torch.Tensor, timestep, reference: ReferenceFeatures, inputs: dict) -> torch.Tensor:
        """`(1, 4, f, h, w)` -> `(rows, 4, f, h, w)` velocity predictions (rows = 2 with guidance, uncond first):
        one backbone call, for tests and tools (the pipeline's loop calls the backbone itself)."""
        rows = inputs["audio_tokens"].shape[0] // window.shape[2]
        sample = window.expand(rows, *window.shape[1:])
        return self.backbone(sample, timestep, reference_features=reference, return_dict=False, **inputs)[0]


def build_echomimic_models(
    unet_config: dict | str | os.PathLike, whisper_layers: int = 5, face_channels: int = 1
) -> EchoMimicModels:
    """Randomly initialised EchoMimic networks from SD's `unet/config.json` (sd-image-variations' in the release).

    `whisper_layers`: feature vectors per whisper step (whisper-tiny: 4 blocks + the encoder input = 5).
    """
    if not isinstance(unet_config, dict):
        unet_config = json.loads(Path(unet_config).read_text())
    unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    tokens = WHISPER_WINDOW * whisper_layers
    with quiet_diffusers():
        reference_net = ReferenceNet.from_config({**unet_config, "cross_attention": False})
        unet = UNet2DConditionModel.from_config({**unet_config, "cross_attention_dim": WHISPER_DIM})
        backbone = EMOUNet3DConditionModel.from_unet2d(
            unet,
            load_weights=False,
            audio_projection_config={
                "passthrough": True,
                "window_size": WHISPER_WINDOW,
                "num_layers": whisper_layers,
                "audio_dim": WHISPER_DIM,
                "num_tokens": tokens,
                "output_dim": WHISPER_DIM,
            },
            face_locator_config={
                "in_channels": face_channels,
                "channels": list(FACE_LOCATOR_CHANNELS),
                "out_channels": unet_config["block_out_channels"][0],
                "same_width_convs": True,
            },
            temporal_norm="per_frame",
            audio_attention_scale=AUDIO_ATTENTION_SCALE,
        )
    return EchoMimicModels(reference_net.eval(), backbone.eval())


# -------------------------------------------------------------------------------------------------- conversion

# EchoMimic's reference pass never runs these: attn2 (and its norm) of every transformer block, the output head
_REFERENCE_UNUSED = re.compile(r"(\.transformer_blocks\.\d+\.(attn2|norm2)\.|^conv_norm_out\.|^conv_out\.)")
_BACKBONE_NOT_IN_ECHOMIMIC = ("speed_encoder.", ".speed_norms.", ".speed_attentions.")


def identify_checkpoint(state: dict, name: str, expected: str) -> None:
    """An `EMOInputError` naming what `state` looks like when it is not EchoMimic's `expected` file."""
    keys = list(state)
    if any(k.startswith(("denoising_unet.", "reference_unet.", "audioproj.", "imageproj.")) for k in keys):
        kind = "Hallo's net.pth (convert it with emo-convert --hallo)"
    elif "model_state_dict" in state or "dims" in state:
        kind = "an openai-whisper checkpoint"
    elif any(k.startswith(("audio_proj.", "speed_encoder.")) for k in keys):
        kind = "an EMO backbone"
    elif any(k.startswith(("encoder.down_blocks", "decoder.up_blocks")) for k in keys):
        kind = "a VAE"
    elif any("motion_modules" in k for k in keys) and not any(k.startswith("conv_in.") for k in keys):
        kind = "a motion-module checkpoint"
    elif any(k.startswith("conv_in.") for k in keys):
        kind = "a UNet"
    else:
        kind = "another project's checkpoint"
    raise EMOInputError(f"{name} is not EchoMimic's {expected}: it looks like {kind}")


def convert_echomimic_state_dicts(
    reference: dict[str, torch.Tensor],
    denoiser: dict[str, torch.Tensor],
    face_locator: dict[str, torch.Tensor],
) -> dict[str, dict[str, torch.Tensor]]:
    """EchoMimic's three state dicts -> `{"reference_net", "backbone", "unused"}` in our key names.

    `denoiser`: the denoising UNet's state as EchoMimic builds it (base 2D weights, then the motion module, then
    `denoising_unet.pth` non-strictly: `merge_denoiser_state`). Unused keys are returned under "unused" (the
    ReferenceNet's attn2/norm2 and output head, which EchoMimic never runs; the second copy of each motion
    module's sinusoid table), so every key is accounted for.
    """
    out: dict[str, dict[str, torch.Tensor]] = {"reference_net": {}, "backbone": {}, "unused": {}}
    for key, value in reference.items():
        part = "unused" if _REFERENCE_UNUSED.search(key) else "reference_net"
        out[part][key] = value
    for key, value in denoiser.items():
        if ".motion_modules." in key:
            if ".pos_encoder.pe" in key:
                block, _, rest = key.partition(".attention_blocks.")
                if not rest.startswith("0."):
                    first = f"{block}.attention_blocks.0.{rest.split('.', 1)[1]}"
                    if first in denoiser and not torch.equal(denoiser[first], value):
                        raise EMOInputError(f"{key} differs from {first}: diffusers keeps one table per block")
                    out["unused"][key] = value
                    continue
                out["backbone"][original_motion_key(block) + ".pos_embed.pe"] = value
                continue
            key = original_motion_key(key)
        out["backbone"][key] = value
    for key, value in face_locator.items():
        out["backbone"]["face_locator." + controlnet_face_locator_key(key)] = value
    return out


def merge_denoiser_state(
    base: dict[str, torch.Tensor], motion: dict[str, torch.Tensor], denoiser: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """EchoMimic's load order (unet_3d_echo.py `from_pretrained_2d` + infer_audio2vid.py:136-139): the SD base
    weights, then the motion module, then `denoising_unet.pth` over them. Base weights of another shape (attn2's
    keys/values: 768 in SD, 384 in EchoMimic) are skipped as `from_pretrained_2d` skips them."""
    merged = dict(base)
    merged.update(motion)
    shapes = {k: v.shape for k, v in denoiser.items()}
    merged = {k: v for k, v in merged.items() if k not in shapes or shapes[k] == v.shape}
    merged.update(denoiser)
    return merged


def load_echomimic_weights(models: EchoMimicModels, converted: dict[str, dict[str, torch.Tensor]]) -> EchoMimicModels:
    """Load converted weights; every weight of our models must be given and every given key must land."""
    for name, model, may_miss in (
        ("reference_net", models.reference_net, ("null_context",)),
        ("backbone", models.backbone, _BACKBONE_NOT_IN_ECHOMIMIC),
    ):
        state = converted[name]
        own = model.state_dict()
        dtype = next(model.parameters()).dtype
        shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        missing, unexpected = model.load_state_dict(
            {k: v.to(dtype) for k, v in state.items() if k not in shapes}, strict=False
        )
        missing = [k for k in missing if not any(part in k for part in may_miss)]
        if missing or unexpected or shapes:
            raise EMOInputError(
                f"EchoMimic weights do not fit our {name}: {len(missing)} missing keys (e.g. {missing[:4]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:4]}), {len(shapes)} of another shape (e.g. "
                f"{[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shapes[:3]]})"
            )
    return models


@torch.no_grad()
def reference_latents(vae, crop_rgb: np.ndarray) -> torch.Tensor:
    """`(H, W, 3)` uint8 RGB crop -> `(1, 4, h, w)`: [-1, 1] pixels, VAE mean x 0.18215 (diffusers' image
    processor, as EchoMimic's `ref_image_processor.preprocess` on an image already at the output size)."""
    pixels = torch.from_numpy(np.ascontiguousarray(crop_rgb)).float().permute(2, 0, 1)[None] / 255.0
    pixels = (pixels * 2 - 1).to(vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist.mean * ECHOMIMIC_VAE_SCALE

"""EchoMimic's release folder -> an `EMOPipeline` (`emo-convert --echomimic`), above the pipeline as
`emo_pipeline.conversion` is: the networks and their key maps are `emo_pipeline.echomimic`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from emo_pipeline.echomimic import (
    ECHOMIMIC_REPO,
    ECHOMIMIC_VAE_SCALE,
    ECHOMIMIC_VARIANTS,
    EchoMimicModels,
    build_echomimic_models,
    convert_echomimic_state_dicts,
    echomimic_scheduler,
    identify_checkpoint,
    load_echomimic_weights,
    merge_denoiser_state,
)
from emo_pipeline.errors import EMOInputError

__all__ = ["ECHOMIMIC_LAYOUT", "build_echomimic_pipeline", "load_echomimic_pipeline", "load_release_file"]

# ------------------------------------------------------------------------------------------ pipeline conversion

# The release's `pretrained_weights/` folder (EchoMimic's README / configs/prompts/animation*.yaml), relative paths.
ECHOMIMIC_LAYOUT = {
    "unet_config": "sd-image-variations-diffusers/unet/config.json",
    "base_unet": "sd-image-variations-diffusers/unet",
    "vae": "sd-vae-ft-mse",
    "whisper": "audio_processor/whisper_tiny.pt",
}


def _required(root: Path, relative: str, what: str) -> Path:
    path = root / relative
    if not path.exists():
        raise EMOInputError(f"{path} is missing ({what}; EchoMimic's pretrained_weights/{relative})")
    return path


def load_release_file(path: Path, expected: str) -> dict[str, torch.Tensor]:
    """A `.pth` state dict of the release, `torch.load(weights_only=True)`; a missing, truncated or foreign file is
    an `EMOInputError` naming it."""
    if not path.is_file():
        raise EMOInputError(f"{path} is missing (EchoMimic's {expected})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated archive, not a torch file, pickled code
        raise EMOInputError(f"{path} cannot be read as a weights file ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EMOInputError(f"{path} is not a state dict of tensors (EchoMimic's {expected})")
    return state


def _base_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        path = folder / name
        if path.is_file():
            try:
                if name.endswith(".safetensors"):
                    return load_file(str(path))
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise EMOInputError(f"{path} cannot be read ({type(error).__name__}: {error})") from error
    raise EMOInputError(f"{folder} has no diffusion_pytorch_model.safetensors/.bin (the SD base UNet weights)")


def _check_denoiser(state: dict, name: str) -> None:
    if not any(k.startswith("conv_in.") for k in state) or not any("motion_modules" in k for k in state):
        identify_checkpoint(state, name, "denoising UNet (conv_in.* and motion_modules.* keys)")


def load_echomimic_pipeline(
    pretrained_weights: str | os.PathLike, variant: str = "audio", torch_dtype: torch.dtype | None = None
):
    """The `EMOPipeline` of EchoMimic's release folder `pretrained_weights/` for `variant` (audio, acc, pose,
    pose_acc; files: `ECHOMIMIC_VARIANTS`). EchoMimic's load order: the denoiser from the SD base weights, then the
    motion module, then `denoising_unet*.pth` non-strictly; the ReferenceNet strictly; every key accounted for.
    whisper-tiny's openai checkpoint becomes a transformers `WhisperEncoder`."""
    from diffusers import AutoencoderKL
    from transformers import WhisperFeatureExtractor

    from emo_pipeline.echomimic_inputs import load_whisper_encoder

    if variant not in ECHOMIMIC_VARIANTS:
        raise EMOInputError(f"--variant must be one of {sorted(ECHOMIMIC_VARIANTS)}, got {variant!r}")
    files = ECHOMIMIC_VARIANTS[variant]
    root = Path(pretrained_weights).expanduser()
    if not root.is_dir():
        raise EMOInputError(f"--echomimic {root}: not a folder (EchoMimic's pretrained_weights/)")
    unet_config = json.loads(_required(root, ECHOMIMIC_LAYOUT["unet_config"], "the UNet config").read_text())
    vae_dir = _required(root, ECHOMIMIC_LAYOUT["vae"], "the VAE")
    whisper = load_whisper_encoder(_required(root, ECHOMIMIC_LAYOUT["whisper"], "whisper-tiny"))
    reference = load_release_file(root / files["reference_unet"], "reference UNet")
    if not any(k.startswith("conv_in.") for k in reference) or any("motion_modules" in k for k in reference):
        identify_checkpoint(reference, str(root / files["reference_unet"]), "reference UNet")
    motion = load_release_file(root / files["motion_module"], "motion module")
    if not motion or not all("motion_modules" in k for k in motion):
        identify_checkpoint(motion, str(root / files["motion_module"]), "motion module (motion_modules.* keys only)")
    denoiser = load_release_file(root / files["denoising_unet"], "denoising UNet")
    _check_denoiser(denoiser, str(root / files["denoising_unet"]))
    face_locator = load_release_file(root / files["face_locator"], "face locator")
    if "conv_in.weight" not in face_locator or "conv_out.weight" not in face_locator or len(face_locator) > 64:
        identify_checkpoint(face_locator, str(root / files["face_locator"]), "face locator")
    base = _base_state(root / ECHOMIMIC_LAYOUT["base_unet"])
    merged = merge_denoiser_state(base, motion, denoiser)
    converted = convert_echomimic_state_dicts(reference, merged, face_locator)
    layers = whisper.config.encoder_layers + 1
    models = build_echomimic_models(unet_config, whisper_layers=layers, face_channels=files["face_channels"])
    load_echomimic_weights(models, converted)
    try:
        vae = AutoencoderKL.from_pretrained(vae_dir)
    except (OSError, ValueError) as error:
        raise EMOInputError(f"cannot load the VAE of {vae_dir}: {error}") from error
    metadata = {
        "family": "echomimic",
        "variant": variant,
        "license": "apache-2.0",
        "source": ECHOMIMIC_REPO,
        "converted_from": {
            "denoising_unet": files["denoising_unet"],
            "reference_unet": files["reference_unet"],
            "motion_module": files["motion_module"],
            "face_locator": files["face_locator"],
            "base_unet": ECHOMIMIC_LAYOUT["base_unet"],
            "vae": ECHOMIMIC_LAYOUT["vae"],
            "audio_encoder": ECHOMIMIC_LAYOUT["whisper"],
            "unused_keys": sorted({k.rsplit(".", 2)[0] for k in converted["unused"]})[:8],
        },
        "base_model": "lambdalabs/sd-image-variations-diffusers",
        "audio_encoder": "openai/whisper-tiny (encoder)",
        "converted_with": f"emo-convert --echomimic pretrained_weights --variant {variant}",
    }
    pipe = build_echomimic_pipeline(
        models, vae, whisper, WhisperFeatureExtractor(), echomimic_scheduler(acc=files["acc"]), metadata
    )
    if torch_dtype is not None:
        pipe.to(dtype=torch_dtype)
    return pipe


def build_echomimic_pipeline(models: EchoMimicModels, vae, audio_encoder, feature_extractor, scheduler, metadata=None):
    """An `EMOPipeline` running EchoMimic's networks: `models`, the SD VAE (sd-vae-ft-mse), whisper-tiny's encoder
    (`WhisperEncoder`) and its feature extractor (unused by the front end, kept for a complete folder), and
    EchoMimic's scheduler. Its `emo_metadata` carries EchoMimic's generation defaults for the variant."""
    from emo_pipeline.pipeline_emo import EMOPipeline  # noqa: PLC0415  (kept lazy: heavy import)

    if abs(vae.config.scaling_factor - ECHOMIMIC_VAE_SCALE) > 1e-9:
        raise EMOInputError(
            f"the VAE's scaling_factor is {vae.config.scaling_factor}, EchoMimic's weights use {ECHOMIMIC_VAE_SCALE}"
        )
    pipe = EMOPipeline(
        vae=vae,
        reference_net=models.reference_net,
        unet=models.backbone,
        audio_encoder=audio_encoder,
        feature_extractor=feature_extractor,
        scheduler=scheduler,
    )
    metadata = dict(metadata or {})
    variant = ECHOMIMIC_VARIANTS[metadata.setdefault("variant", "audio")]
    metadata["family"] = "echomimic"
    metadata["generation_defaults"] = {
        "height": 512,
        "width": 512,
        "fps": 24,
        "num_frames_per_clip": 12,
        "num_inference_steps": variant["num_inference_steps"],
        "guidance_scale": variant["guidance_scale"],
        **metadata.get("generation_defaults", {}),
    }
    pipe.emo_metadata = metadata
    return pipe

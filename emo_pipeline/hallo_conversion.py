"""Hallo / Hallo2 release folders -> `EMOPipeline` (`emo-convert --hallo`), the conversion entry of the Hallo family.

The networks and their key map are `emo_pipeline.hallo`; the family's front end, settings and schedule are
`emo_pipeline.families.hallo`. This module sits above the pipeline (it builds one), as `emo_pipeline.conversion` does
for native EMO weights::

    pipe = load_hallo_pipeline("pretrained_models")                       # Hallo's release layout (HALLO_LAYOUT)
    pipe.save_pretrained("hallo-emo")                                     # portable: no path of this machine
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from emo_pipeline.errors import EMOInputError
from emo_pipeline.hallo import (
    HALLO_VAE_SCALE,
    HalloConditioning,
    HalloModels,
    build_hallo_models,
    hallo_scheduler,
    infer_hallo_sizes,
    load_hallo_state_dict,
    load_hallo_weights,
)
from emo_pipeline.pipeline_emo import EMOPipeline

__all__ = [
    "HALLO2_REPO",
    "HALLO_GENERATION_DEFAULTS",
    "HALLO_LAYOUT",
    "HALLO_REPO",
    "build_hallo_pipeline",
    "check_motion_module",
    "hallo_generate",
    "load_hallo_pipeline",
]

HALLO_REPO = "https://github.com/fudan-generative-vision/hallo"
HALLO2_REPO = "https://github.com/fudan-generative-vision/hallo2"
# Hallo's inference defaults (configs/inference/default.yaml): the converted pipeline's own generation defaults.
HALLO_GENERATION_DEFAULTS = {
    "height": 512,
    "width": 512,
    "fps": 25,
    "num_frames_per_clip": 16,
    "num_motion_frames": 2,
    "num_inference_steps": 40,
    "guidance_scale": 3.5,
}
# The release's `pretrained_models/` folder (Hallo's README), relative paths.
HALLO_LAYOUT = {
    "net": "hallo/net.pth",
    "unet_config": "stable-diffusion-v1-5/unet/config.json",
    "vae": "sd-vae-ft-mse",
    "wav2vec": "wav2vec/wav2vec2-base-960h",
    "motion_module": "motion_module/mm_sd_v15_v2.ckpt",
    "face_analysis": "face_analysis",
    "audio_separator": "audio_separator/Kim_Vocal_2.onnx",
}


def build_hallo_pipeline(
    models: HalloModels,
    vae: AutoencoderKL,
    audio_encoder=None,
    feature_extractor=None,
    scheduler: DDIMScheduler | None = None,
    metadata: dict | None = None,
):
    """An `EMOPipeline` running Hallo's networks: `models` (e.g. `load_hallo_models`), the SD VAE Hallo uses
    (sd-vae-ft-mse), wav2vec2 (`Wav2Vec2Model` + its feature extractor; may be None when every call passes
    `hallo_conditioning=`) and Hallo's scheduler (default `hallo_scheduler()`).

    Its `emo_metadata` carries Hallo's generation defaults (`HALLO_GENERATION_DEFAULTS`) and `metadata`.
    """
    if abs(vae.config.scaling_factor - HALLO_VAE_SCALE) > 1e-9:
        raise EMOInputError(
            f"the VAE's scaling_factor is {vae.config.scaling_factor}, but Hallo's weights were trained on SD's "
            f"{HALLO_VAE_SCALE} (sd-vae-ft-mse): pass that VAE"
        )
    pipe = EMOPipeline(
        vae=vae,
        reference_net=models.reference_net,
        unet=models.backbone,
        audio_encoder=audio_encoder,
        feature_extractor=feature_extractor,
        scheduler=scheduler or hallo_scheduler(),
        identity_proj=models.identity_proj,
    )
    metadata = dict(metadata or {})
    metadata["family"] = metadata.get("family", "hallo")
    metadata["generation_defaults"] = {**HALLO_GENERATION_DEFAULTS, **metadata.get("generation_defaults", {})}
    pipe.emo_metadata = metadata
    return pipe


def _required(root: Path, relative: str, what: str) -> Path:
    path = root / relative
    if not path.exists():
        raise EMOInputError(
            f"{path} is missing ({what}); expected Hallo's pretrained_models layout: "
            + ", ".join(f"{v}" for k, v in HALLO_LAYOUT.items() if k not in ("motion_module", "audio_separator"))
        )
    return path


def check_motion_module(motion_module: str | os.PathLike, state: dict[str, torch.Tensor]) -> int:
    """Every tensor of AnimateDiff's `mm_sd_v15_v2.ckpt` must be overwritten by `net.pth` (Hallo loads the motion
    module first, then net.pth strictly, which holds them under `denoising_unet.`), so the file adds nothing.

    Returns the number of tensors checked; raises `EMOInputError` listing those net.pth lacks (Hallo would run them
    from the motion-module file, which this conversion does not read).
    """
    path = Path(motion_module)
    try:
        module = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise EMOInputError(
            f"cannot read the motion module {path} (AnimateDiff's mm_sd_v15_v2.ckpt): {error}"
        ) from error
    module = module.get("state_dict", module) if isinstance(module, dict) else module
    if not isinstance(module, dict) or not module:
        raise EMOInputError(f"{path} is not an AnimateDiff motion-module state dict")
    uncovered = [key for key in module if f"denoising_unet.{key}" not in state]
    if uncovered:
        raise EMOInputError(
            f"{len(uncovered)} tensors of the motion module {path} are not in net.pth (e.g. {uncovered[:3]}): "
            "this is not the motion module the checkpoint was trained with, or net.pth is incomplete"
        )
    return len(module)


def _relative_to(path: Path, root: Path) -> str:
    """`path` relative to `root` when inside it, else its file name (never an absolute path of this machine)."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def load_hallo_pipeline(
    pretrained_models: str | os.PathLike,
    net: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """The `EMOPipeline` of Hallo's (or Hallo2's) release folder `pretrained_models/` (layout: `HALLO_LAYOUT`).

    `net`: the checkpoint to load (default `hallo/net.pth`; Hallo2: `hallo2/net.pth`), relative to the folder or a
    path. Every key of net.pth is placed (`load_hallo_weights`), and the motion module, when present, is checked to
    be fully overwritten by net.pth (`check_motion_module`). Nothing machine-specific is stored: the insightface
    models and the vocal separator are given when generating (`face_analysis_dir=`, `vocal_separation=`).
    Raises `EMOInputError` naming a missing or unreadable file.
    """
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    root = Path(pretrained_models).expanduser()
    if not root.is_dir():
        raise EMOInputError(f"--hallo {root}: not a folder (Hallo's pretrained_models/)")
    if net is None:
        net_path = _required(root, HALLO_LAYOUT["net"], "Hallo's networks")
    else:
        net_path = Path(net).expanduser()
        net_path = root / net_path if not net_path.is_absolute() and (root / net_path).exists() else net_path
        if not net_path.is_file():
            raise EMOInputError(f"net.pth {net_path} does not exist (e.g. hallo2/net.pth for Hallo2)")
    unet_config = _required(root, HALLO_LAYOUT["unet_config"], "SD1.5's UNet config")
    vae_dir = _required(root, HALLO_LAYOUT["vae"], "the VAE")
    wav2vec_dir = _required(root, HALLO_LAYOUT["wav2vec"], "wav2vec2-base-960h")

    state = load_hallo_state_dict(net_path)
    motion_module = root / HALLO_LAYOUT["motion_module"]
    checked = check_motion_module(motion_module, state) if motion_module.exists() else 0
    wav2vec_config = Wav2Vec2Config.from_pretrained(wav2vec_dir)
    sizes = infer_hallo_sizes(state, audio_dim=wav2vec_config.hidden_size)
    models = load_hallo_weights(build_hallo_models(unet_config, **sizes), state)
    del state
    try:
        vae = AutoencoderKL.from_pretrained(vae_dir)
        audio_encoder = Wav2Vec2Model.from_pretrained(wav2vec_dir)
        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(wav2vec_dir)
    except (OSError, ValueError) as error:
        raise EMOInputError(f"cannot load a model of {root}: {error}") from error
    vae.register_to_config(_name_or_path=HALLO_LAYOUT["vae"])  # not this machine's path (saved in vae/config.json)
    variant = "hallo2" if "hallo2" in net_path.parts else "hallo"
    # Portable: nothing of this machine is stored (no absolute path; the insightface models and the vocal separator
    # are given at call time, `face_analysis_dir=` / `vocal_separation=`). Paths are relative to pretrained_models/.
    relative = _relative_to(net_path, root)
    metadata = {
        "family": variant,
        "license": "other",  # MIT code; the weights' terms are upstream's (see the model card)
        "source": HALLO2_REPO if variant == "hallo2" else HALLO_REPO,
        "converted_from": {
            "net": relative,
            "motion_module": (
                f"{HALLO_LAYOUT['motion_module']} ({checked} tensors, all overwritten by net.pth)" if checked else None
            ),
            "vae": HALLO_LAYOUT["vae"],
            "audio_encoder": HALLO_LAYOUT["wav2vec"],
        },
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "audio_encoder": "facebook/wav2vec2-base-960h",
        "converted_with": "emo-convert --hallo pretrained_models" + (f" --net {relative}" if net is not None else ""),
        "generation_defaults": {},
    }
    pipe = build_hallo_pipeline(models, vae, audio_encoder.eval(), feature_extractor, metadata=metadata)
    return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe


@torch.no_grad()
def hallo_generate(
    models: HalloModels,
    vae: AutoencoderKL,
    scheduler: DDIMScheduler,
    conditioning: HalloConditioning,
    *,
    mode: str = "parity",
    num_frames: int = 16,
    num_motion_frames: int = 2,
    num_inference_steps: int = 40,
    guidance_scale: float = 3.5,
    motion_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    generator: torch.Generator | None = None,
    motion_frame_mask_rate: float | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """The whole video of Hallo's networks through the pipeline's one sampling loop (`build_hallo_pipeline` around
    `models`, `vae`, `scheduler`; default mode "parity"): `(1, 3, audio_length, H, W)` frames in [0, 1] (float32).

    generator: CPU generator shared by the clips (Hallo: `torch.manual_seed(42)`): each clip draws its initial noise
    from it. motion_frame_mask_rate: Hallo2's motion-frame pixel mask (parity mode; 0.25 released).
    """
    pipe = build_hallo_pipeline(models, vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        None,
        None,
        hallo_conditioning=conditioning,
        mode=mode,
        height=conditioning.source_image.shape[-1],
        width=conditioning.source_image.shape[-1],
        num_frames_per_clip=num_frames,
        num_motion_frames=num_motion_frames,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        motion_scale=motion_scale,
        generator=generator,
        motion_frame_mask_rate=motion_frame_mask_rate,
        eta=eta,
        output_type="pt",
        watermark=False,
    ).frames
    return frames.permute(1, 0, 2, 3)[None]

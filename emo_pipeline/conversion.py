"""Build an untrained EMOPipeline (arXiv 2402.17485, section 3.2) from Stable Diffusion 1.5, wav2vec2 and AnimateDiff.

This is the starting point of EMO training: the SD1.5 UNet initialises both the ReferenceNet and the backbone's
spatial layers, the SD VAE is used as is, wav2vec2 is the audio encoder, and an AnimateDiff motion module (optional)
initialises the temporal layers. The SD text encoder is used once, to compute the ReferenceNet's null context (the
empty-prompt embedding its attn2 attends to), and is then dropped.

Sources:
* `sd15`: a diffusers SD folder or hub id (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), or a
  single-file checkpoint (`.safetensors`/`.ckpt`, original LDM layout) read by diffusers'
  `StableDiffusionPipeline.from_single_file`. A single file carries weights but no configs: pass `sd15_config`, a
  local diffusers SD folder (only its configs and tokenizer are read), to convert offline; without it diffusers
  downloads the matching configs from the Hub (once; they are cached).
* `wav2vec2`: a folder or hub id of a wav2vec2 model with its feature extractor (`preprocessor_config.json`).
* `motion_adapter`: a diffusers `MotionAdapter` folder / hub id or an original AnimateDiff checkpoint
  (`mm_sd_v15_v2.ckpt`), see `emo_pipeline.models.animatediff`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

import emo_pipeline
from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.animatediff import load_motion_adapter
from emo_pipeline.models.backbone import EMOUNet3DConditionModel
from emo_pipeline.models.reference_net import ReferenceNet
from emo_pipeline.pipeline_emo import SCHEDULERS, EMOPipeline

__all__ = ["SINGLE_FILE_SUFFIXES", "build_emo_pipeline", "null_text_context"]

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# `owner/name` (or a bare legacy name): what a Hub repo id looks like; anything else that does not exist locally
# is a missing path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# MotionAdapter fields that change how the adapter's weights are used (not only their shapes): an `emo_config`
# value for one of them that differs from the adapter's own would silently misuse the weights.
_ADAPTER_FIELDS = (
    "motion_num_attention_heads",
    "motion_norm_num_groups",
    "motion_layers_per_block",
    "motion_transformer_layers_per_block",
    "use_motion_mid_block",
)


def build_emo_pipeline(
    sd15: str | os.PathLike,
    wav2vec2: str | os.PathLike,
    motion_adapter: str | os.PathLike | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    sd15_config: str | os.PathLike | None = None,
    emo_config: dict | None = None,
    scheduler: str = "ddim",
    motion_adapter_config: dict | None = None,
) -> EMOPipeline:
    """An untrained `EMOPipeline` initialised from SD1.5 + wav2vec2 (+ an AnimateDiff motion module).

    Args:
        sd15: diffusers SD1.5 folder or hub id, or a single-file checkpoint (`.safetensors`/`.ckpt`).
        wav2vec2: wav2vec2 folder or hub id (model + feature extractor), e.g. `facebook/wav2vec2-base-960h`.
        motion_adapter: AnimateDiff weights (MotionAdapter folder / hub id, or an original checkpoint file); None
            leaves the temporal layers randomly initialised with zero output projections.
        torch_dtype: dtype of the loaded weights (default: as stored, fp32 for SD1.5).
        sd15_config: for a single-file `sd15`: a local diffusers SD folder whose configs and tokenizer are used
            (needed offline). Ignored for a folder or hub id.
        emo_config: extra `EMOUNet3DConditionModel` fields (`audio_projection_config`, `face_locator_config`,
            `speed_encoder_config`, `UNetMotionModel` fields). The audio projection's `num_layers`/`audio_dim`
            always come from the wav2vec2 config.
        scheduler: one of `emo_pipeline.pipeline_emo.SCHEDULERS` ("ddim", the paper's, "dpm++", "euler", "unipc",
            "lcm"), built from SD's scheduler config (its noise schedule).
        motion_adapter_config: MotionAdapter fields an original AnimateDiff checkpoint cannot tell
            (`motion_num_attention_heads`, default 8 as AnimateDiff; `motion_norm_num_groups`, default the SD
            UNet's `norm_num_groups`).

    Returns the pipeline with `emo_metadata` (base model, audio encoder, motion adapter, converter version), which
    `save_pretrained` writes to `emo_metadata.json` and into the model card. Raises `EMOInputError` naming the
    input when a path is missing or a source is not the expected kind of model.
    """
    if scheduler not in SCHEDULERS:
        raise EMOInputError(f"scheduler: unknown name {scheduler!r}; choose one of {sorted(SCHEDULERS)}")

    sd15_source = _locate(sd15, "sd15")
    wav2vec2_source = _locate(wav2vec2, "wav2vec2")
    adapter_source = _locate(motion_adapter, "motion_adapter") if motion_adapter is not None else None

    unet, vae, text_encoder, tokenizer, scheduler_config = _load_sd15(sd15_source, sd15_config, torch_dtype)
    audio_encoder, feature_extractor = _load_wav2vec2(wav2vec2_source, torch_dtype)

    config = _emo_config(emo_config, audio_encoder.config)
    adapter = None
    if adapter_source is not None:
        adapter = _load_adapter(adapter_source, unet, torch_dtype, motion_adapter_config or {})
        _check_adapter_config(adapter, config, adapter_source)
    try:
        backbone = EMOUNet3DConditionModel.from_unet2d(unet, motion_adapter=adapter, **config)
    except (ValueError, RuntimeError) as error:
        if adapter is None or isinstance(error, EMOInputError):
            raise
        raise EMOInputError(
            f"motion_adapter {adapter_source!r} does not fit the SD UNet of {sd15_source!r} "
            f"(an SD1.5 AnimateDiff motion module is needed): {error}"
        ) from error
    reference_net = ReferenceNet.from_unet2d(unet)
    if text_encoder is not None and tokenizer is not None:
        reference_net.set_null_context(null_text_context(text_encoder, tokenizer))
    else:
        logger.warning(
            "%s has no text encoder/tokenizer: the ReferenceNet's null context stays zeros (SD's empty-prompt "
            "embedding is better; pass an SD source with text_encoder/ and tokenizer/)",
            sd15_source,
        )
    del text_encoder, tokenizer, unet  # only needed for initialisation

    pipe = EMOPipeline(
        vae=vae,
        reference_net=reference_net.eval(),
        unet=backbone.eval(),
        audio_encoder=audio_encoder.eval(),
        feature_extractor=feature_extractor,
        scheduler=_build_scheduler(scheduler, scheduler_config),
    )
    pipe.emo_metadata = {
        "base_model": sd15_source,
        "audio_encoder": wav2vec2_source,
        "motion_adapter": adapter_source,
        "converted_with": f"emo-pipeline {emo_pipeline.__version__}",
    }
    return pipe


@torch.no_grad()
def null_text_context(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> torch.Tensor:
    """SD's empty-prompt text embedding `(1, model_max_length, hidden)`, `(1, 77, 768)` for SD1.5, in fp32."""
    ids = tokenizer(
        "", padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    text_encoder = text_encoder.float().eval()  # fp32: fp16 matmuls are not available on every CPU
    return text_encoder(ids.to(text_encoder.device))[0].cpu()


# ------------------------------------------------------------------------------------------------------ sources


def _locate(source: str | os.PathLike, name: str) -> str:
    """An existing local path (made absolute, so it can never be mistaken for a hub id later) or a hub id."""
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    text = str(source)
    looks_local = isinstance(source, os.PathLike) or text.startswith((".", "/", "~", "\\")) or ":" in text
    if looks_local or path.suffix in SINGLE_FILE_SUFFIXES or not _REPO_ID.match(text):
        raise EMOInputError(f"{name}: {text} does not exist (expected a local path or a Hub id 'owner/name')")
    return text


def _describe(source: str) -> str:
    return repr(source) if Path(source).exists() else f"{source!r} (no such local path; tried as a Hub id)"


def _load_sd15(source: str, sd15_config: str | os.PathLike | None, torch_dtype: torch.dtype | None):
    """(unet, vae, text_encoder | None, tokenizer | None, scheduler config) from a folder, hub id or single file."""
    path = Path(source)
    if path.is_file():
        return _load_sd15_single_file(path, sd15_config, torch_dtype)
    if path.is_dir() and not (path / "unet" / "config.json").is_file():
        raise EMOInputError(
            f"sd15: {source} is not a diffusers Stable Diffusion folder (no unet/config.json); expected the layout "
            "of stable-diffusion-v1-5/stable-diffusion-v1-5 (unet/, vae/, text_encoder/, tokenizer/, scheduler/) "
            "or a single-file .safetensors/.ckpt checkpoint"
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype)
        scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler")
    except OSError as error:  # missing files, a hub id that is not there or not cached offline
        raise EMOInputError(f"sd15: cannot load Stable Diffusion from {_describe(source)}: {error}") from error
    text_encoder = tokenizer = None
    has_text = not path.is_dir() or ((path / "text_encoder").is_dir() and (path / "tokenizer").is_dir())
    if has_text:
        try:
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")  # fp32, dropped soon
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        except OSError:  # a hub repo without them: fall back to the zero context (warned by the caller)
            text_encoder = tokenizer = None
    return unet, vae, text_encoder, tokenizer, scheduler_config


def _load_sd15_single_file(path: Path, sd15_config: str | os.PathLike | None, torch_dtype: torch.dtype | None):
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise EMOInputError(
            f"sd15: {path} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}); pass a diffusers "
            "folder, a hub id or a single-file SD1.5 checkpoint"
        )
    kwargs: dict[str, Any] = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if sd15_config is not None:
        config = Path(sd15_config).expanduser()
        if not (config / "unet" / "config.json").is_file():
            raise EMOInputError(
                f"sd15_config: {sd15_config} is not a local diffusers Stable Diffusion folder (no unet/config.json)"
            )
        kwargs["config"] = str(config.resolve())
        has_text = (config / "text_encoder" / "config.json").is_file() and (config / "tokenizer").is_dir()
    else:
        has_text = True
    if not has_text or not _single_file_has_clip(path):
        kwargs.update(text_encoder=None, tokenizer=None)
    try:
        sd = StableDiffusionPipeline.from_single_file(str(path), torch_dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        hint = "" if sd15_config is not None else " (to convert offline pass sd15_config, a local diffusers SD folder)"
        raise EMOInputError(f"sd15: cannot load the single-file checkpoint {path}{hint}: {error}") from error
    return sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, dict(sd.scheduler.config)


def _single_file_has_clip(path: Path) -> bool:
    """Whether an SD single file holds the CLIP text encoder (SD1.x LDM keys `cond_stage_model.transformer.`)."""
    prefix = "cond_stage_model.transformer."
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:  # reads the header only
                return any(key.startswith(prefix) for key in handle.keys())  # noqa: SIM118 - not a dict
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise EMOInputError(f"sd15: cannot read the checkpoint {path}: {error}") from error
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return any(str(key).startswith(prefix) for key in state)


def _load_wav2vec2(source: str, torch_dtype: torch.dtype | None) -> tuple[Wav2Vec2Model, Wav2Vec2FeatureExtractor]:
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file():
        raise EMOInputError(f"wav2vec2: {source} is not a transformers model folder (no config.json)")
    if path.is_file():
        raise EMOInputError(f"wav2vec2: {source} is a file; pass a wav2vec2 model folder or hub id")
    try:
        model_type = Wav2Vec2Config.get_config_dict(source)[0].get("model_type")
    except (OSError, ValueError) as error:
        raise EMOInputError(f"wav2vec2: cannot read the model config of {_describe(source)}: {error}") from error
    if model_type != "wav2vec2":
        raise EMOInputError(
            f"wav2vec2: {source} holds a {model_type!r} model, expected a wav2vec2 model "
            "(e.g. facebook/wav2vec2-base-960h)"
        )
    if path.is_dir() and not (path / "preprocessor_config.json").is_file():
        raise EMOInputError(
            f"wav2vec2: {source} has no feature extractor (preprocessor_config.json); save one with "
            "Wav2Vec2FeatureExtractor.save_pretrained into the folder"
        )
    try:
        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(source)
        model = Wav2Vec2Model.from_pretrained(source, **({"dtype": torch_dtype} if torch_dtype else {}))
    except (OSError, ValueError) as error:
        raise EMOInputError(f"wav2vec2: cannot load a wav2vec2 model from {_describe(source)}: {error}") from error
    return model, feature_extractor


def _load_adapter(source: str, unet: UNet2DConditionModel, torch_dtype: torch.dtype | None, overrides: dict):
    if Path(source).is_file():
        # AnimateDiff's motion modules use the SD UNet's GroupNorm size (32 for SD1.5).
        overrides = {"motion_norm_num_groups": unet.config.norm_num_groups, **overrides}
    elif Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise EMOInputError(
            f"motion_adapter: {source} is not a diffusers MotionAdapter folder (no config.json); pass a "
            "MotionAdapter folder / hub id or an original AnimateDiff checkpoint file (mm_sd_v15_v2.ckpt)"
        )
    try:
        adapter = load_motion_adapter(source, torch_dtype=torch_dtype, **overrides)
    except EMOInputError as error:
        raise EMOInputError(f"motion_adapter: {error}") from error
    except (OSError, ValueError, RuntimeError) as error:
        raise EMOInputError(
            f"motion_adapter: cannot load an AnimateDiff motion adapter from {_describe(source)}: {error}"
        ) from error
    return adapter.eval()


def _check_adapter_config(adapter, config: dict, source: str) -> None:
    conflicts = {
        key: (config[key], adapter.config[key])
        for key in _ADAPTER_FIELDS
        if key in config and key in adapter.config and config[key] != adapter.config[key]
    }
    if conflicts:
        described = ", ".join(f"{key}={mine!r} (adapter: {theirs!r})" for key, (mine, theirs) in conflicts.items())
        raise EMOInputError(f"emo_config contradicts the motion_adapter {source!r}: {described}")


def _emo_config(emo_config: dict | None, audio_config: Wav2Vec2Config) -> dict:
    """`emo_config` with the audio projection sized for the audio encoder (all its transformer layers)."""
    config = dict(emo_config or {})
    audio = dict(config.get("audio_projection_config") or {})
    derived = {"num_layers": audio_config.num_hidden_layers, "audio_dim": audio_config.hidden_size}
    for key, value in derived.items():
        if key in audio and audio[key] != value:
            raise EMOInputError(
                f"emo_config: audio_projection_config {key}={audio[key]} contradicts the wav2vec2 model ({value}); "
                "leave it out, it is taken from the audio encoder"
            )
    config["audio_projection_config"] = {**audio, **derived}
    return config


def _build_scheduler(name: str, source_config: dict):
    config = {k: v for k, v in source_config.items() if not k.startswith("_")}
    # SD's own schedulers never clip the predicted x0 (latents are not in [-1, 1]); DDIM's default would.
    config.setdefault("clip_sample", False)
    return SCHEDULERS[name].from_config(config)

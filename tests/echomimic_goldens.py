"""The EchoMimic goldens (tests/goldens/echomimic, made by tests/goldens/make_echomimic_goldens.py): their weights
regenerated from the recorded seed, in EchoMimic's own file formats, and our models built from them."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "goldens" / "echomimic"
sys.path.insert(0, str(GOLDEN.parent))
from echomimic_weights import checksum, random_state_dict  # noqa: E402


@functools.cache
def metadata() -> dict:
    return json.loads((GOLDEN / "metadata.json").read_text())


@functools.cache
def outputs() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "outputs.safetensors"))


@functools.cache
def pose_golden() -> dict:
    """tests/goldens/make_echomimic_pose_golden.py's output: driving frames, EchoMimic's landmarks and renders."""
    import numpy as np

    with np.load(GOLDEN / "pose_golden.npz") as golden:
        return {name: golden[name] for name in golden.files}


@functools.cache
def release_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    """`{"reference_unet", "denoising_unet", "face_locator", "vae", "whisper"}` as EchoMimic's files hold them
    (whisper: openai's `{"dims", "model_state_dict"}`)."""
    meta = metadata()
    state = random_state_dict(meta["weight_spec"], meta["weight_seed"])
    state.update(load_file(str(GOLDEN / "buffers.safetensors")))
    for prefix, expected in meta["checksums"].items():
        assert abs(checksum(state, prefix) - expected) < 1e-6 * expected, f"regenerated {prefix} weights differ"
    parts = {}
    for name in ("reference_unet", "denoising_unet", "face_locator", "vae"):
        parts[name] = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
    encoder = {k.removeprefix("whisper."): v for k, v in state.items() if k.startswith("whisper.")}
    parts["whisper"] = {"dims": meta["whisper_dims"], "model_state_dict": encoder}
    return parts


def golden_models():
    """Our EchoMimic models and VAE with the golden's weights (fp32, eval)."""
    from diffusers import AutoencoderKL

    from emo_pipeline.echomimic import build_echomimic_models, convert_echomimic_state_dicts, load_echomimic_weights

    parts = release_state_dicts()
    layers = metadata()["whisper_dims"]["n_audio_layer"] + 1
    models = build_echomimic_models(json.loads((GOLDEN / "unet_config.json").read_text()), whisper_layers=layers)
    converted = convert_echomimic_state_dicts(parts["reference_unet"], parts["denoising_unet"], parts["face_locator"])
    load_echomimic_weights(models, converted)
    vae = AutoencoderKL.from_config(json.loads((GOLDEN / "vae_config.json").read_text()))
    vae.load_state_dict(parts["vae"])
    return models, vae.eval()


def golden_pipeline(acc: bool = False):
    """An `EMOPipeline` of the golden's networks (as `emo-convert --echomimic` builds it)."""
    from transformers import WhisperFeatureExtractor

    from emo_pipeline.echomimic import echomimic_scheduler
    from emo_pipeline.echomimic_conversion import build_echomimic_pipeline
    from emo_pipeline.echomimic_inputs import convert_whisper_checkpoint

    models, vae = golden_models()
    whisper = convert_whisper_checkpoint(release_state_dicts()["whisper"])
    metadata = {"variant": "acc" if acc else "audio"}
    return build_echomimic_pipeline(
        models, vae, whisper, WhisperFeatureExtractor(), echomimic_scheduler(acc=acc), metadata
    )


def golden_call(pipe, run: str, **kwargs):
    """The golden run's inputs as pipeline arguments: the portrait (RGB) with its face box, the track, the seed."""
    meta, out = metadata(), outputs()
    settings = meta["runs"][run]
    args = {
        "height": meta["size"],
        "width": meta["size"],
        "fps": meta["fps"],
        "face_box": tuple(meta["face_box"]),
        "num_inference_steps": settings["steps"],
        "guidance_scale": settings["cfg"],
        "generator": torch.manual_seed(meta["seed"]),
        "watermark": False,
        "output_type": "pt",
        "decode_chunk_size": 1,
        **kwargs,
    }
    return pipe(out["portrait_bgr"].numpy()[:, :, ::-1].copy(), out["audio"].numpy(), **args)


def write_release(root: Path) -> Path:
    """EchoMimic's pretrained_weights/ in `root` at the goldens' size, with every variant's files (the pose
    variants' face locator: the golden's 1-channel one spread over 3 channels)."""
    import shutil

    from safetensors.torch import save_file

    from emo_pipeline.echomimic import ECHOMIMIC_VARIANTS

    parts = release_state_dicts()
    denoiser = parts["denoising_unet"]
    motion = {k: v for k, v in denoiser.items() if "motion_modules" in k}
    for variant in ECHOMIMIC_VARIANTS.values():
        torch.save(parts["reference_unet"], root / variant["reference_unet"])
        # motion module file = the trained values perturbed: denoising_unet.pth must win (EchoMimic's load order)
        torch.save({k: v + 1.0 for k, v in motion.items()}, root / variant["motion_module"])
        torch.save(denoiser, root / variant["denoising_unet"])
        locator = dict(parts["face_locator"])
        if variant["face_channels"] == 3:
            locator["conv_in.weight"] = locator["conv_in.weight"].repeat(1, 3, 1, 1) / 3
        torch.save(locator, root / variant["face_locator"])
    base = root / "sd-image-variations-diffusers" / "unet"
    base.mkdir(parents=True)
    shutil.copy(GOLDEN / "unet_config.json", base / "config.json")
    save_file(
        {k: v.contiguous() for k, v in parts["reference_unet"].items()},
        str(base / "diffusion_pytorch_model.safetensors"),
    )
    _, vae = golden_models()
    vae.save_pretrained(root / "sd-vae-ft-mse")
    (root / "audio_processor").mkdir()
    whisper = parts["whisper"]
    decoder = {"decoder.token_embedding.weight": torch.zeros(8, 384)}
    checkpoint = {"dims": whisper["dims"], "model_state_dict": {**whisper["model_state_dict"], **decoder}}
    torch.save(checkpoint, root / "audio_processor" / "whisper_tiny.pt")
    return root

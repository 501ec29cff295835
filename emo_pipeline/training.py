"""Training EMO's three stages (arXiv 2402.17485, section 3.3) with accelerate, and LoRA fine-tuning.

* Stage 1 (images): ReferenceNet + backbone spatial layers + face locator learn to reproduce a target frame of a
  clip from another frame of the same clip (no temporal, audio or speed input).
* Stage 2 (video): temporal layers (optionally from AnimateDiff) and audio layers learn on `n` motion frames +
  `f` frames with the clip's audio.
* Stage 3: temporal + speed layers, with the head speed.

Which parameter groups train is config (`trainable`), not code. Conditioning dropout replaces the reference, the
motion frames or the audio of some samples with zeros: the "absent" input guidance and clip 1 use at inference.

Checkpoints survive faults: written to a temporary folder, renamed when complete (with every file's size recorded),
`latest` updated last, old ones pruned only after a successful save; resuming skips incomplete or truncated
checkpoints and restores weights, optimizer, LR schedule, EMA, step, data order and RNG, so an interrupted run
ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from emo_pipeline.config import TrainConfig
from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.attention import ReferenceFeatures
from emo_pipeline.models.backbone import EMOUNet3DConditionModel, parameter_group
from emo_pipeline.models.reference_net import ReferenceNet
from emo_pipeline.models.speed import SpeedEncoder

__all__ = [
    "EMOTrainingModule",
    "TrainResult",
    "export_pipeline",
    "find_resumable_checkpoint",
    "save_checkpoint",
    "select_trainable_parameters",
    "train",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"


# ------------------------------------------------------------------------------------------------ parameter groups


def select_trainable_parameters(
    reference_net: ReferenceNet, unet: EMOUNet3DConditionModel, groups: list[str]
) -> dict[str, list[nn.Parameter]]:
    """Set `requires_grad` so that exactly `groups` train; returns the trainable parameters by group.

    Groups: "reference_net" (all of it), the backbone's "spatial", "audio", "temporal", "speed", "face_locator"
    (see `parameter_group`), and "lora" (LoRA adapter weights, after `unet.add_adapter`).
    """
    selected: dict[str, list[nn.Parameter]] = {}
    for parameter in reference_net.parameters():
        parameter.requires_grad_("reference_net" in groups)
        if "reference_net" in groups:
            selected.setdefault("reference_net", []).append(parameter)
    for name, parameter in unet.named_parameters():
        group = "lora" if ".lora_" in name else parameter_group(name)
        parameter.requires_grad_(group in groups)
        if group in groups:
            selected.setdefault(group, []).append(parameter)
    missing = [g for g in groups if g not in selected]
    if missing:
        raise EMOInputError(f"trainable groups {missing} have no parameters in this model")
    return selected


# --------------------------------------------------------------------------------------------------- the module


class EMOTrainingModule(nn.Module):
    """ReferenceNet + backbone with the denoising loss; one module so accelerate/DDP wrap a single thing."""

    def __init__(self, reference_net: ReferenceNet, unet: EMOUNet3DConditionModel, noise_scheduler, config):
        super().__init__()
        self.reference_net = reference_net
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.config = config

    def forward(
        self,
        latents: torch.Tensor,
        reference_latents: torch.Tensor,
        motion_latents: torch.Tensor | None,
        audio_features: torch.Tensor,
        face_mask: torch.Tensor,
        speed: torch.Tensor | None,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Loss of one batch. `latents (B, 4, F, h, w)` clean targets; `reference_latents (B, 4, h, w)`;
        `motion_latents (B, n, 4, h, w)` or None; `audio_features (B, F, 2m+1, L, D)`; `face_mask (B, 1, H, W)`;
        `speed (B, F)` or None; `noise` like `latents`; `timesteps (B,)`."""
        train_reference = any(p.requires_grad for p in self.reference_net.parameters())
        with torch.set_grad_enabled(train_reference and torch.is_grad_enabled()):
            reference = self.reference_net(reference_latents)
            motion = self.reference_net(motion_latents) if motion_latents is not None else None
        features = ReferenceFeatures(spatial=reference.spatial, temporal=motion.temporal if motion else {})

        scheduler = self.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(
            noisy, timesteps, audio_features, reference_features=features, face_mask=face_mask, speed=speed
        ).sample
        target = (
            noise
            if scheduler.config.prediction_type == "epsilon"
            else scheduler.get_velocity(latents, noise, timesteps)
        )
        error = F.mse_loss(prediction.float(), target.float(), reduction="none")  # (B, 4, F, h, w)
        if self.config.face_loss_weight:
            mask = F.adaptive_max_pool2d(face_mask.float(), latents.shape[-2:])[:, :, None]  # (B, 1, 1, h, w)
            error = error * (1 + self.config.face_loss_weight * mask)
        per_sample = error.mean(dim=(1, 2, 3, 4))
        if self.config.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(scheduler, timesteps)
            clipped = torch.clamp(snr, max=self.config.snr_gamma)
            weights = clipped / snr if scheduler.config.prediction_type == "epsilon" else clipped / (snr + 1)
            per_sample = per_sample * weights
        return per_sample.mean()


# -------------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_is_complete(folder: Path) -> bool:
    state_file = folder / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
        return all(
            (folder / name).is_file() and (folder / name).stat().st_size == size
            for name, size in state["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_resumable_checkpoint(output_dir: str | Path, requested: str = "latest") -> Path | None:
    """The checkpoint to resume from: `requested` ("latest" or a folder) if complete; for "latest", the newest
    complete checkpoint (incomplete or truncated ones are skipped with a log line). None when there is none."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if requested != "latest":
        folder = Path(requested)
        if not _checkpoint_is_complete(folder):
            raise EMOInputError(f"resume_from_checkpoint: {folder} is not a complete checkpoint")
        return folder
    candidates = sorted(
        (p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
    )
    for folder in reversed(candidates):
        if _checkpoint_is_complete(folder):
            return folder
        logger.warning("skipping incomplete or truncated checkpoint %s", folder)
    return None


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, ema=None, limit: int | None = None) -> Path:
    """Save the full training state for `step` (see the module docstring for the fault-safety rules)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step}"
    temporary = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    if accelerator.is_main_process:
        if ema is not None:
            from safetensors.torch import save_file

            save_file(
                {f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)},
                temporary / EMA_FILE,
            )
        files = {p.relative_to(temporary).as_posix(): p.stat().st_size for p in temporary.rglob("*") if p.is_file()}
        state = {"global_step": step, "files": files}
        if ema is not None:
            state["ema"] = {"optimization_step": int(ema.optimization_step), "decay": float(ema.decay)}
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        _write_atomically(root / LATEST_FILE, final.name + "\n")
        if limit is not None:  # prune only now that the new checkpoint is complete
            complete = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name[5:]))
            for old in complete[:-limit] if limit > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _load_ema(folder: Path, ema) -> None:
    from safetensors.torch import load_file

    state = json.loads((folder / STATE_FILE).read_text())
    tensors = load_file(folder / EMA_FILE)
    for i, parameter in enumerate(ema.shadow_params):
        parameter.data.copy_(tensors[f"shadow.{i}"])
    ema.optimization_step = state["ema"]["optimization_step"]


# ----------------------------------------------------------------------------------------------------- export


def export_pipeline(pipeline, output_dir: str | Path, training_metadata: dict, push_to_hub: str | None = None) -> Path:
    """Write a complete `EMOPipeline` folder with a model card carrying `training_metadata` (appended to the
    stages the pipeline already went through); optionally push it to the Hub."""
    metadata = dict(pipeline.emo_metadata or {})
    history = dict(metadata.get("training") or {})
    history["stages"] = [*history.get("stages", []), training_metadata]
    metadata["training"] = history
    pipeline.emo_metadata = metadata
    pipeline.save_pretrained(output_dir)
    if push_to_hub:
        pipeline.push_to_hub(push_to_hub)
    return Path(output_dir)


# ------------------------------------------------------------------------------------------------------ train


@dataclass
class TrainResult:
    global_step: int
    num_processes: int = 1
    is_main_process: bool = True
    losses: list[float] = field(default_factory=list)  # per optimisation step, this process
    export_dir: Path | None = None
    lora_dir: Path | None = None
    resumed_from: Path | None = None


def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """`(N, 3, H, W)` in [-1, 1] -> `(N, 4, h, w)` scaled latents (a sample of the VAE posterior)."""
    return vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor


def _batch_inputs(batch: dict, vae, unet: EMOUNet3DConditionModel, config: TrainConfig, weight_dtype):
    """Dataset batch -> model inputs (frozen VAE encoding and conditioning dropout, with the global torch RNG)."""
    device = vae.device
    reference = batch["reference"].to(device)
    size = reference.shape[0]
    with torch.no_grad():
        reference_latents = _encode(vae, reference)
        if config.stage == 1:
            latents = _encode(vae, batch["target"].to(device))[:, :, None]  # one frame
            motion_latents = None
            window, layers, dim = unet.audio_proj.expected_feature_shape
            audio = torch.zeros(size, 1, window, layers, dim, device=device)
        else:
            frames = batch["frames"].to(device)
            f = frames.shape[1]
            latents = _encode(vae, frames.flatten(0, 1)).unflatten(0, (size, f)).permute(0, 2, 1, 3, 4)
            motion = batch["motion_frames"].to(device)
            motion_latents = (
                _encode(vae, motion.flatten(0, 1)).unflatten(0, (size, motion.shape[1])) if motion.shape[1] else None
            )
            audio = batch["audio_features"].to(device)

    def drop(probability: float) -> torch.Tensor:
        return (torch.rand(size, device=device) < probability).float()

    keep_reference = 1 - drop(config.dropout.reference)
    reference_latents = reference_latents * keep_reference[:, None, None, None]
    if motion_latents is not None:
        motion_latents = motion_latents * (1 - drop(config.dropout.motion))[:, None, None, None, None]
    audio = audio * (1 - drop(config.dropout.audio))[:, None, None, None, None]
    speed = batch["speed"].to(device, weight_dtype) if config.stage == 3 else None
    return {
        "latents": latents.to(weight_dtype),
        "reference_latents": reference_latents.to(weight_dtype),
        "motion_latents": None if motion_latents is None else motion_latents.to(weight_dtype),
        "audio_features": audio.to(weight_dtype),
        "face_mask": batch["face_mask"].to(device, weight_dtype),
        "speed": speed,
    }


def _optimizer(config: TrainConfig, parameters: list[nn.Parameter], scale: float) -> torch.optim.Optimizer:
    kwargs = {
        "lr": config.optim.learning_rate * scale,
        "betas": (config.optim.adam_beta1, config.optim.adam_beta2),
        "weight_decay": config.optim.weight_decay,
        "eps": config.optim.adam_epsilon,
    }
    if config.optim.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as error:
            raise EMOInputError("optim.use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        return bitsandbytes.optim.AdamW8bit(parameters, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)


def _prepare_models(pipe, config: TrainConfig):
    reference_net, unet = pipe.reference_net, pipe.unet
    if config.speed_encoder_config:
        fields = {**dict(unet.speed_encoder.config), **dict(config.speed_encoder_config)}
        fields = {k: v for k, v in fields.items() if not k.startswith("_")}
        unet.speed_encoder = SpeedEncoder(**fields).to(unet.device)
        unet.register_to_config(
            speed_encoder_config={k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        )
    if config.motion_adapter:
        from emo_pipeline.models.animatediff import load_motion_adapter

        unet.load_motion_adapter(load_motion_adapter(config.motion_adapter))
    if config.lora.rank > 0:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=config.lora.rank,
                lora_alpha=config.lora.alpha or config.lora.rank,
                lora_dropout=config.lora.dropout,
                target_modules=list(config.lora.target_modules),
                init_lora_weights="gaussian",
            )
        )  # peft freezes every non-LoRA weight here; select_trainable_parameters re-enables the configured groups
    groups = select_trainable_parameters(reference_net, unet, list(config.trainable))
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        reference_net.enable_gradient_checkpointing()
    if config.enable_xformers:
        unet.enable_xformers_memory_efficient_attention()
        reference_net.enable_xformers_memory_efficient_attention()
    return reference_net, unet, groups


def train(config: TrainConfig) -> TrainResult:
    """Run one training stage as configured (launch with `accelerate launch training/train.py`)."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        ProjectConfiguration,
        set_seed,
    )
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from emo_pipeline.data import TalkingHeadDataset
    from emo_pipeline.pipeline_emo import EMOPipeline

    output_dir = Path(config.output_dir)
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not has_device,  # without it accelerate ignores a torchrun world on CPU (no MULTI_CPU)
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)],
    )
    set_seed(config.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    try:
        pipe = EMOPipeline.from_pretrained(config.pretrained)
    except (OSError, ValueError) as error:  # no such folder / Hub repo, or not an EMOPipeline
        raise EMOInputError(
            f"pretrained: cannot load an EMOPipeline from {config.pretrained!r} (an emo-convert output or a previous "
            f"stage's export folder, or a Hub id): {error}"
        ) from error
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae.requires_grad_(False)
    pipe.audio_encoder.requires_grad_(False)
    reference_net, unet, groups = _prepare_models(pipe, config)
    noise_scheduler = DDPMScheduler.from_config(
        pipe.scheduler.config, prediction_type=config.prediction_type, rescale_betas_zero_snr=config.zero_terminal_snr
    )

    dataset = TalkingHeadDataset(
        config.data.root,
        stage=config.stage,
        num_frames=config.data.num_frames,
        num_motion_frames=config.data.num_motion_frames,
        audio_window=unet.audio_proj.config.window_size // 2,
        size=config.data.size,
        seed=config.seed,
        samples_per_clip=config.data.samples_per_clip,
    )
    if len(dataset) < config.train_batch_size * accelerator.num_processes:
        raise EMOInputError(
            f"data.root {config.data.root}: {len(dataset)} usable samples, fewer than train_batch_size "
            f"({config.train_batch_size}) x {accelerator.num_processes} processes ({dataset.num_skipped} clips too "
            "short for this stage were skipped); lower train_batch_size or raise data.samples_per_clip"
        )
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=config.train_batch_size, shuffle=True, num_workers=config.data.num_workers, drop_last=True
    )
    parameters = [p for group in groups.values() for p in group]
    scale = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    optimizer = _optimizer(config, parameters, scale if config.optim.scale_lr else 1.0)
    lr_scheduler = get_scheduler(
        config.optim.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.optim.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    model = EMOTrainingModule(reference_net, unet, noise_scheduler, config)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    vae.to(accelerator.device, dtype=weight_dtype)
    ema = EMAModel(parameters, decay=config.ema_decay) if config.use_ema else None
    if ema is not None:
        ema.to(accelerator.device)

    global_step, resumed_from = 0, None
    if config.resume_from_checkpoint:
        resumed_from = find_resumable_checkpoint(output_dir, config.resume_from_checkpoint)
        if resumed_from is None:
            logger.warning(
                "resume_from_checkpoint=%s: no complete checkpoint, starting from scratch",
                config.resume_from_checkpoint,
            )
        else:
            accelerator.load_state(str(resumed_from))
            global_step = json.loads((resumed_from / STATE_FILE).read_text())["global_step"]
            if ema is not None:
                _load_ema(resumed_from, ema)
            accelerator.print(f"resumed from {resumed_from} at step {global_step}")

    if accelerator.is_main_process and accelerator.trackers == [] and config.report_to != "none":
        accelerator.init_trackers("emo-train", config=_flat_config(config))

    batches_per_epoch = len(dataloader)
    batches_done = global_step * config.gradient_accumulation_steps
    first_epoch, skip = divmod(batches_done, batches_per_epoch)
    losses: list[float] = []
    accumulated = 0.0
    progress = _progress(accelerator, config.max_train_steps, global_step)
    for epoch in range(
        first_epoch, math.ceil(config.max_train_steps * config.gradient_accumulation_steps / batches_per_epoch) + 1
    ):
        if global_step >= config.max_train_steps:
            break
        dataset.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if epoch == first_epoch and skip else dataloader
        for batch in loader:
            with accelerator.accumulate(model):
                inputs = _batch_inputs(batch, vae, accelerator.unwrap_model(model).unet, config, weight_dtype)
                noise = torch.randn_like(inputs["latents"])
                if config.noise_offset:
                    noise = noise + config.noise_offset * torch.randn(*noise.shape[:3], 1, 1, device=noise.device)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (noise.shape[0],), device=noise.device
                )
                loss = model(**inputs, noise=noise, timesteps=timesteps)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.optim.max_grad_norm:
                    accelerator.clip_grad_norm_(parameters, config.optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                accumulated += loss.detach().item() / config.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            losses.append(accumulated)
            if ema is not None:
                ema.step(parameters)
            if global_step % config.log_every == 0 or global_step == config.max_train_steps:
                accelerator.log({"loss": accumulated, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{accumulated:.4f}")
            accumulated = 0.0
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, ema, config.checkpoints_total_limit)
            if config.validation.steps and global_step % config.validation.steps == 0:
                _validate(accelerator, pipe, model, ema, parameters, config, global_step)
            if global_step >= config.max_train_steps:
                break
    progress.close()

    result = TrainResult(
        global_step, accelerator.num_processes, accelerator.is_main_process, losses, resumed_from=resumed_from
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        pipe.reference_net, pipe.unet = trained.reference_net, trained.unet
        metadata = {
            "stage": config.stage,
            "steps": global_step,
            "trained_groups": sorted(groups),
            "dataset": str(config.data.root),
            "learning_rate": config.optim.learning_rate,
            "batch_size": config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes,
            "ema": bool(ema),
        }
        if ema is not None:
            ema.store(parameters)
            ema.copy_to(parameters)
        if config.lora.rank > 0:
            result.lora_dir = _save_lora(pipe, output_dir / "lora")
            if config.export:  # a standalone model: the adapters merged into the backbone weights
                pipe.unet.fuse_lora()
                pipe.unet.unload_lora()
        if config.export:
            result.export_dir = export_pipeline(pipe, output_dir / "pipeline", metadata, config.push_to_hub)
        if ema is not None:
            ema.restore(parameters)
    accelerator.end_training()
    return result


def _save_lora(pipe, folder: Path) -> Path:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


def _validate(accelerator, pipe, model, ema, parameters, config: TrainConfig, step: int) -> None:
    """Generate the held-out (image, audio) pairs with the current (EMA) weights; save mp4s, log frames."""
    if not accelerator.is_main_process or not config.validation.images:
        return
    import numpy as np

    from emo_pipeline.audio import load_audio

    trained = accelerator.unwrap_model(model)
    pipe.reference_net, pipe.unet = trained.reference_net, trained.unet
    if ema is not None:
        ema.store(parameters)
        ema.copy_to(parameters)
    folder = Path(config.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    was_training = trained.training
    trained.eval()
    try:
        for index, (image, audio) in enumerate(zip(config.validation.images, config.validation.audios)):
            samples = load_audio(audio)[: int(config.validation.max_seconds * 16000)]
            path = pipe.write_video(
                folder / f"sample-{index}.mp4",
                image,
                samples,
                height=config.data.size or 512,
                width=config.data.size or 512,
                num_frames_per_clip=config.data.num_frames,
                num_motion_frames=config.data.num_motion_frames,
                num_inference_steps=config.validation.num_inference_steps,
                guidance_scale=config.validation.guidance_scale,
                generator=torch.Generator().manual_seed(config.seed),
            )
            from emo_pipeline.media import read_video_frames

            frames = read_video_frames(path)
            picks = frames[np.linspace(0, len(frames) - 1, 4).astype(int)]
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images(f"validation/{index}", picks, step, dataformats="NHWC")
    finally:
        trained.train(was_training)
        if ema is not None:
            ema.restore(parameters)


def _flat_config(config: TrainConfig) -> dict:
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", OmegaConf.to_container(OmegaConf.structured(config)) if not isinstance(config, dict) else config)
    return flat


def _progress(accelerator, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="steps", disable=not accelerator.is_local_main_process)


def describe(config: TrainConfig) -> str:
    """The config as YAML (logged at start)."""
    return OmegaConf.to_yaml(OmegaConf.structured(asdict(config)))

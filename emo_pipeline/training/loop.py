"""`train`: one EMO training stage with accelerate, from a config (see the package docstring)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from emo_pipeline.config import TrainConfig
from emo_pipeline.errors import EMOInputError
from emo_pipeline.training.checkpoints import resume, save_checkpoint
from emo_pipeline.training.export import (
    export_pipeline,
    is_sharded,
    save_lora,
    trained_weights,
    validate,
    validation_scores,
)
from emo_pipeline.training.inputs import batch_inputs
from emo_pipeline.training.module import EMOTrainingModule
from emo_pipeline.training.schedule import sampling_scheduler, training_scheduler
from emo_pipeline.training.setup import check_optional_dependencies, make_dataloader, make_optimizer, prepare_models

__all__ = ["TrainResult", "describe", "train"]

logger = logging.getLogger("emo_pipeline.training")


@dataclass
class TrainResult:
    global_step: int
    num_processes: int = 1
    is_main_process: bool = True
    losses: list[float] = field(default_factory=list)  # per optimisation step, this process
    export_dir: Path | None = None
    lora_dir: Path | None = None
    resumed_from: Path | None = None
    mixed_precision: str = "no"  # what accelerate ran: no | fp16 | bf16


@dataclass
class _Run:
    """The parts of a run that its steps use, built once by `_build`."""

    config: TrainConfig
    accelerator: object
    pipe: object  # the EMOPipeline: validation and export write through it
    model: EMOTrainingModule  # as prepared by accelerate (maybe wrapped)
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataset: object
    dataloader: object
    parameters: list[torch.nn.Parameter]  # the trainable ones, as the prepared model holds them
    groups: list[str]
    weight_dtype: torch.dtype
    ema: object | None


def train(config: TrainConfig) -> TrainResult:
    """Run one training stage as configured (launch with `accelerate launch training/train.py`)."""
    from accelerate.utils import set_seed

    check_optional_dependencies(config)
    accelerator = _make_accelerator(config)
    set_seed(config.seed)
    run = _build(config, accelerator)
    global_step, resumed_from = resume(accelerator, config, run.ema)
    if accelerator.is_main_process and accelerator.trackers == [] and config.report_to != "none":
        accelerator.init_trackers("emo-train", config=_flat_config(config))
    global_step, losses = _train_epochs(run, global_step)
    result = TrainResult(
        global_step,
        accelerator.num_processes,
        accelerator.is_main_process,
        losses,
        resumed_from=resumed_from,
        mixed_precision=str(accelerator.mixed_precision),
    )
    accelerator.wait_for_everyone()
    _save_results(run, result)
    accelerator.end_training()
    return result


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    output_dir = Path(config.output_dir)
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return Accelerator(
        cpu=not has_device,  # without it accelerate ignores a torchrun world on CPU (no MULTI_CPU)
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)],
    )


def _load_pretrained(config: TrainConfig):
    from emo_pipeline.pipeline_emo import EMOPipeline

    try:
        pipe = EMOPipeline.from_pretrained(config.pretrained)
    except (OSError, ValueError) as error:  # no such folder / Hub repo, or not an EMOPipeline
        raise EMOInputError(
            f"pretrained: cannot load an EMOPipeline from {config.pretrained!r} (an emo-convert output or a previous "
            f"stage's export folder, or a Hub id): {error}"
        ) from error
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.requires_grad_(False)
    pipe.audio_encoder.requires_grad_(False)
    return pipe


def _build(config: TrainConfig, accelerator) -> _Run:
    """Pipeline, models, data, optimizer, EMA: everything `accelerator.prepare` needs, prepared."""
    from diffusers.training_utils import EMAModel

    if config.use_ema and is_sharded(accelerator):
        raise EMOInputError(
            "use_ema: true is not supported with FSDP or DeepSpeed ZeRO-3: each process holds a shard of the weights "
            "and checkpoints keep the main process's EMA copy only; use DDP or ZeRO-2 "
            "(training/accelerate_multi_gpu.yaml, training/accelerate_deepspeed_zero2.yaml) or use_ema: false"
        )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = _load_pretrained(config)
    noise_scheduler = training_scheduler(pipe.scheduler, config)
    pipe.scheduler = sampling_scheduler(pipe.scheduler, config)  # validation and export sample as training noised
    reference_net, unet, groups = prepare_models(pipe, config)
    dataset, dataloader = make_dataloader(config, unet.audio_proj.config.window_size // 2, accelerator.num_processes)
    trainable = [p for group in groups.values() for p in group]
    optimizer, lr_scheduler = make_optimizer(config, trainable, accelerator.num_processes)
    model = EMOTrainingModule(reference_net, unet, noise_scheduler, config)
    name_of = {id(p): name for name, p in model.named_parameters()}
    trainable_names = [name_of[id(p)] for p in trainable]  # group order: the order of EMA's saved shadow weights
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    pipe.vae.to(accelerator.device, dtype=weight_dtype)
    # After prepare: FSDP replaces parameters by sharded ones (same names); EMA and gradient clipping need those.
    prepared = dict(accelerator.unwrap_model(model).named_parameters())
    parameters = [prepared[name] for name in trainable_names]
    ema = EMAModel(parameters, decay=config.ema_decay) if config.use_ema else None
    if ema is not None:
        ema.to(accelerator.device)
    return _Run(
        config=config,
        accelerator=accelerator,
        pipe=pipe,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dataset=dataset,
        dataloader=dataloader,
        parameters=parameters,
        groups=sorted(groups),
        weight_dtype=weight_dtype,
        ema=ema,
    )


def _train_epochs(run: _Run, global_step: int) -> tuple[int, list[float]]:
    """Optimisation steps from `global_step` to `max_train_steps`; a resumed run skips the batches of its epoch
    that it already trained on. Returns `(global_step, loss per step)`."""
    config, accelerator = run.config, run.accelerator
    accumulation = config.gradient_accumulation_steps
    batches_per_epoch = len(run.dataloader)
    first_epoch, skip = divmod(global_step * accumulation, batches_per_epoch)
    last_epoch = math.ceil(config.max_train_steps * accumulation / batches_per_epoch)
    losses: list[float] = []
    accumulated = 0.0
    progress = _progress(accelerator, config.max_train_steps, global_step)
    for epoch in range(first_epoch, last_epoch + 1):
        if global_step >= config.max_train_steps:
            break
        run.dataset.set_epoch(epoch)
        run.dataloader.set_epoch(epoch)
        loader = run.dataloader
        if epoch == first_epoch and skip:
            loader = accelerator.skip_first_batches(loader, skip)
        for batch in loader:
            accumulated += _forward_backward(run, batch) / accumulation
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            losses.append(accumulated)
            progress.update(1)
            progress.set_postfix(loss=f"{accumulated:.4f}")
            _after_step(run, global_step, accumulated)
            accumulated = 0.0
            if global_step >= config.max_train_steps:
                break
    progress.close()
    return global_step, losses


def _forward_backward(run: _Run, batch: dict) -> float:
    """One batch: inputs, noise, loss, backward; the optimizer steps when accumulation is complete."""
    config, accelerator, model = run.config, run.accelerator, run.model
    with accelerator.accumulate(model):
        trained = accelerator.unwrap_model(model)
        inputs = batch_inputs(batch, run.pipe.vae, trained.unet, config, run.weight_dtype)
        noise = torch.randn_like(inputs["latents"])
        if config.noise_offset:  # per (sample, channel, frame) offset (Guttenberg 2023)
            noise = noise + config.noise_offset * torch.randn(*noise.shape[:3], 1, 1, device=noise.device)
        timesteps = torch.randint(
            0, trained.noise_scheduler.config.num_train_timesteps, (noise.shape[0],), device=noise.device
        )
        loss = model(**inputs, noise=noise, timesteps=timesteps)
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.optim.max_grad_norm:
            accelerator.clip_grad_norm_(run.parameters, config.optim.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach().item()


def _after_step(run: _Run, global_step: int, loss: float) -> None:
    """EMA, logging, checkpoint and validation after optimisation step `global_step`."""
    config, accelerator = run.config, run.accelerator
    if run.ema is not None:
        run.ema.step(run.parameters)
    if global_step % config.log_every == 0 or global_step == config.max_train_steps:
        accelerator.log({"loss": loss, "lr": run.lr_scheduler.get_last_lr()[0]}, step=global_step)
    if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
        save_checkpoint(accelerator, config.output_dir, global_step, run.ema, config.checkpoints_total_limit)
    if config.validation.steps and global_step % config.validation.steps == 0 and config.validation.images:
        with trained_weights(accelerator, run.model, run.ema, run.parameters) as trained:  # every process
            if trained is not None:
                paths = validate(trained, run.pipe, config, global_step, accelerator.trackers)
                scores = validation_scores(paths, config, global_step)  # configured metrics, next to the loss
                if scores:
                    accelerator.log(scores, step=global_step)
        accelerator.wait_for_everyone()


def _save_results(run: _Run, result: TrainResult) -> None:
    """The final (EMA) weights: LoRA adapters and/or the exported pipeline, written by the main process."""
    config, accelerator, pipe = run.config, run.accelerator, run.pipe
    output_dir = Path(config.output_dir)
    metadata = {
        "stage": config.stage,
        "steps": result.global_step,
        "trained_groups": run.groups,
        "dataset": str(config.data.root),
        "learning_rate": config.optim.learning_rate,
        "batch_size": config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes,
        "ema": bool(run.ema),
    }
    with trained_weights(accelerator, run.model, run.ema, run.parameters) as trained:  # every process
        if trained is None:
            return
        pipe.reference_net, pipe.unet = trained.reference_net, trained.unet
        if config.lora.rank > 0:
            result.lora_dir = save_lora(pipe, output_dir / "lora")
            if config.export:  # a standalone model: the adapters merged into the backbone weights
                pipe.unet.fuse_lora()
                pipe.unet.unload_lora()
        if config.export:
            result.export_dir = export_pipeline(pipe, output_dir / "pipeline", metadata, config.push_to_hub)


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

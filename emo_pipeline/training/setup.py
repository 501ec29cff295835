"""The parts of a training run, built from its config: trainable parameters, memory options, data, optimizer."""

from __future__ import annotations

import logging

import torch
from torch import nn

from emo_pipeline.config import TrainConfig
from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.backbone import EMOUNet3DConditionModel, parameter_group
from emo_pipeline.models.reference_net import ReferenceNet
from emo_pipeline.models.speed import SpeedEncoder

__all__ = [
    "check_optional_dependencies",
    "make_dataloader",
    "make_optimizer",
    "prepare_models",
    "select_trainable_parameters",
]

logger = logging.getLogger(__name__)


def check_optional_dependencies(config: TrainConfig) -> None:
    """Fail before any model loads when the config asks for a library that is not installed."""
    if config.enable_xformers:
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():  # an explicit request: not silently replaced by PyTorch's attention
            raise EMOInputError(
                "enable_xformers: true needs xformers (pip install xformers, a build for your torch and CUDA); or "
                "set enable_xformers: false to use PyTorch's scaled_dot_product_attention"
            )
    if config.optim.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise EMOInputError("optim.use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error


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


def _lora_config(config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha or config.lora.rank,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        init_lora_weights="gaussian",
    )


def prepare_models(pipe, config: TrainConfig) -> tuple[ReferenceNet, EMOUNet3DConditionModel, dict]:
    """The pipeline's ReferenceNet and backbone set up for this stage: speed buckets, AnimateDiff weights, LoRA
    adapters, trainable groups, gradient checkpointing, xformers. Returns `(reference_net, unet, groups)`."""
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
        # peft freezes every non-LoRA weight here; select_trainable_parameters re-enables the configured groups
        unet.add_adapter(_lora_config(config))
    groups = select_trainable_parameters(reference_net, unet, list(config.trainable))
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        reference_net.enable_gradient_checkpointing()
    if config.enable_xformers:  # availability was checked by check_optional_dependencies
        unet.enable_xformers_memory_efficient_attention()
        reference_net.enable_xformers_memory_efficient_attention()
    return reference_net, unet, groups


def make_dataloader(config: TrainConfig, audio_window: int, num_processes: int):
    """`(TalkingHeadDataset, DataLoader)` of this stage.

    The loader shuffles with a generator of its own, seeded from `config.seed` (accelerate's seedable sampler
    reseeds it with seed + epoch each epoch). Without one, every new iterator takes a seed from the global torch
    RNG, so a run resumed in the middle of an epoch drew once more than the uninterrupted run and all later noise
    and dropout shifted.
    """
    from emo_pipeline.data import TalkingHeadDataset

    dataset = TalkingHeadDataset(
        config.data.root,
        stage=config.stage,
        num_frames=config.data.num_frames,
        num_motion_frames=config.data.num_motion_frames,
        audio_window=audio_window,
        size=config.data.size,
        seed=config.seed,
        samples_per_clip=config.data.samples_per_clip,
    )
    if len(dataset) < config.train_batch_size * num_processes:
        raise EMOInputError(
            f"data.root {config.data.root}: {len(dataset)} usable samples, fewer than train_batch_size "
            f"({config.train_batch_size}) x {num_processes} processes ({dataset.num_skipped} clips too short for "
            "this stage were skipped); lower train_batch_size or raise data.samples_per_clip"
        )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        shuffle=True,
        num_workers=config.data.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    return dataset, dataloader


def make_optimizer(config: TrainConfig, parameters: list[nn.Parameter], num_processes: int):
    """`(optimizer, lr_scheduler)`: AdamW (or 8-bit AdamW) and diffusers' `get_scheduler`. With `scale_lr` the
    rate is multiplied by the global batch size."""
    from diffusers.optimization import get_scheduler

    global_batch = config.train_batch_size * config.gradient_accumulation_steps * num_processes
    scale = global_batch if config.optim.scale_lr else 1
    kwargs = {
        "lr": config.optim.learning_rate * scale,
        "betas": (config.optim.adam_beta1, config.optim.adam_beta2),
        "weight_decay": config.optim.weight_decay,
        "eps": config.optim.adam_epsilon,
    }
    if config.optim.use_8bit_adam:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(parameters, **kwargs)
    else:
        optimizer = torch.optim.AdamW(parameters, **kwargs)
    lr_scheduler = get_scheduler(
        config.optim.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.optim.lr_warmup_steps * num_processes,
        num_training_steps=config.max_train_steps * num_processes,
    )
    return optimizer, lr_scheduler

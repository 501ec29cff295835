"""Typed training configuration (OmegaConf structured configs) for EMO's three stages and LoRA fine-tuning.

A YAML file (configs/train/stage{1,2,3}.yaml) is merged over these dataclasses, then CLI dotlist overrides
(`optim.learning_rate=1e-5`). A file may `include:` other YAML files (paths relative to it), merged first; that
is how the speed buckets `emo-preprocess` suggests (speed_buckets.yaml) reach the stage-3 config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from emo_pipeline.errors import EMOInputError

__all__ = [
    "DataConfig",
    "DropoutConfig",
    "LoraConfig",
    "OptimConfig",
    "TrainConfig",
    "ValidationConfig",
    "check_noise_schedule",
    "load_config",
]

# Parameter groups a stage can train (names, not code edits). The backbone groups are defined by
# emo_pipeline.models.backbone.parameter_group; "lora" is the LoRA adapter weights.
PARAMETER_GROUPS = ("reference_net", "spatial", "audio", "temporal", "speed", "face_locator", "lora")


@dataclass
class DataConfig:
    root: str = MISSING  # an emo-preprocess output folder (manifest.jsonl + clips/)
    num_frames: int = 12  # f: the paper's clip length
    num_motion_frames: int = 4  # n: the paper's motion frames
    size: int | None = None  # resize frames to this side (None: the dataset's size)
    samples_per_clip: int = 1
    num_workers: int = 0


@dataclass
class DropoutConfig:
    """Per-sample probability of replacing a condition with its "absent" input (zeros), for guidance and for
    clip 1 at inference (whose motion frames are zero maps)."""

    audio: float = 0.05
    reference: float = 0.05
    motion: float = 0.05


@dataclass
class OptimConfig:
    learning_rate: float = 1e-5  # the paper's rate for all stages
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit; halves optimizer memory on CUDA
    lr_scheduler: str = "constant"  # any diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 0
    scale_lr: bool = False  # multiply by batch size * accumulation * processes


@dataclass
class LoraConfig:
    rank: int = 0  # 0 = no LoRA (full fine-tuning of the selected groups)
    alpha: float | None = None  # None = rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class ValidationConfig:
    steps: int = 0  # run validation every N steps (0 = never)
    images: list[str] = field(default_factory=list)
    audios: list[str] = field(default_factory=list)
    num_inference_steps: int = 20
    guidance_scale: float = 3.5
    max_seconds: float = 4.0  # validation audio is cut to this length
    # emo-evaluate metrics (fid, fvd, sync, csim, lmd, psnr, ssim) of the validation videos, logged next to the loss
    # as validation/<key>; off by default. lmd/psnr/ssim/fid/fvd need `references` (one ground-truth video per image).
    metrics: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    metric_weights: str | None = None  # folder of the metric networks' published files (emo-evaluate --weights)


@dataclass
class TrainConfig:
    stage: int = 1  # 1: images, 2: video + audio, 3: speed
    pretrained: str = MISSING  # EMOPipeline folder: emo-convert output or the previous stage's export
    output_dir: str = MISSING
    motion_adapter: str | None = None  # stage 2: initialise temporal layers from AnimateDiff (folder, id or ckpt)
    speed_encoder_config: dict[str, Any] | None = None  # replaces the speed buckets (include speed_buckets.yaml)
    trainable: list[str] = field(default_factory=lambda: ["reference_net", "spatial", "face_locator"])
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    seed: int = 0
    max_train_steps: int = 30000
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    gradient_checkpointing: bool = False
    # Some trainable weights can sit out a step: in stage 1 the ReferenceNet layers that only feed the motion
    # frames, LoRA layers on the speed branch in stage 2. DDP must then look for them (a small cost per step).
    ddp_find_unused_parameters: bool = True
    enable_xformers: bool = False
    # The noise schedule. None keeps the pretrained pipeline's (SD1.5: epsilon, no rescale), so stage 2 continues
    # what stage 1 trained. What training uses is written into the exported pipeline's scheduler (and validation's).
    prediction_type: str | None = None  # epsilon | v_prediction
    # Rescale betas to zero terminal SNR (Lin et al. 2024, arXiv 2305.08891); needs v_prediction. Sampling then
    # uses "trailing" timesteps, so the first step starts from pure noise as training's last timestep does.
    zero_terminal_snr: bool | None = None
    snr_gamma: float | None = None  # min-SNR weighting (Hang et al. 2023); 5.0 is the paper's value
    face_loss_weight: float = 0.0  # extra loss weight inside the face mask: weight = 1 + this * mask
    noise_offset: float = 0.0
    use_ema: bool = False
    ema_decay: float = 0.9999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    log_every: int = 10
    export: bool = True  # write a complete EMOPipeline folder (EMA weights when used) at the end
    push_to_hub: str | None = None  # repo id for the exported pipeline


def _load_with_includes(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    if path in seen:
        raise EMOInputError(f"config include cycle: {' -> '.join(map(str, (*seen, path)))}")
    if not path.is_file():
        raise EMOInputError(f"config file {path} does not exist")
    loaded = OmegaConf.load(path)
    merged = OmegaConf.create()
    for include in loaded.pop("include", None) or []:
        merged = OmegaConf.merge(merged, _load_with_includes((path.parent / include).resolve(), (*seen, path)))
    return OmegaConf.merge(merged, loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Merge `TrainConfig` defaults, the YAML at `path` (with its includes) and dotlist `overrides`."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(
            schema,
            _load_with_includes(Path(path).resolve()) if path is not None else {},
            OmegaConf.from_dotlist(list(overrides or [])),
        )
        config: TrainConfig = OmegaConf.to_object(merged)
    except EMOInputError:
        raise
    except Exception as error:  # omegaconf's validation errors name the key; keep that message
        raise EMOInputError(f"invalid training config {path or ''}: {error}") from error
    if str(config.mixed_precision).lower() in ("false", "no", "none"):  # YAML reads a bare `no` as false
        config.mixed_precision = "no"
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        raise EMOInputError(f"mixed_precision must be no, fp16 or bf16, got {config.mixed_precision!r}")
    unknown = set(config.trainable) - set(PARAMETER_GROUPS)
    if unknown:
        raise EMOInputError(f"trainable: unknown parameter groups {sorted(unknown)}; choose from {PARAMETER_GROUPS}")
    if config.stage not in (1, 2, 3):
        raise EMOInputError(f"stage must be 1, 2 or 3, got {config.stage}")
    check_noise_schedule(config.prediction_type, config.zero_terminal_snr, config.snr_gamma)
    if ("lora" in config.trainable) != (config.lora.rank > 0):
        raise EMOInputError("LoRA: put 'lora' in trainable exactly when lora.rank > 0")
    return config


def check_noise_schedule(prediction_type: str | None, zero_terminal_snr: bool | None, snr_gamma: float | None) -> None:
    """Reject loss settings that cannot train or sample. None (not decided yet: the pretrained pipeline's value)
    passes; `train` checks again once the pretrained scheduler has filled it in."""
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise EMOInputError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if snr_gamma is not None and not snr_gamma > 0:
        raise EMOInputError(f"snr_gamma must be > 0 (Min-SNR's value is 5.0) or null (no weighting), got {snr_gamma}")
    if zero_terminal_snr and prediction_type == "epsilon":
        raise EMOInputError(
            "zero_terminal_snr: true with prediction_type: epsilon cannot work: at the last timestep the noisy latent "
            "is pure noise, so the noise is all an epsilon model can predict, the sampler's first x0 estimate divides "
            "by sqrt(alpha_bar) = 0"
            + (" and snr_gamma's weight min(SNR, gamma) / SNR is 0 / 0" if snr_gamma else "")
            + "; set prediction_type: v_prediction (Lin et al. 2024) or zero_terminal_snr: false"
        )

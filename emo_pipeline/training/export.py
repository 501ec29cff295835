"""What leaves a training run: validation videos, the exported `EMOPipeline`, LoRA weights.

All of them need the full trained weights (EMA's when used). Under DDP every process holds them; under FSDP or
DeepSpeed ZeRO-3 each holds a shard, so every process must take part in gathering them (`trained_weights`) before
the main process, alone, generates or saves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from emo_pipeline.config import TrainConfig
from emo_pipeline.errors import EMOInputError

__all__ = ["export_pipeline", "save_lora", "trained_weights", "validate", "validation_scores"]

logger = logging.getLogger(__name__)


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


def save_lora(pipe, folder: Path) -> Path:
    """The backbone's LoRA adapters as `folder/pytorch_lora_weights.safetensors` (`pipe.load_lora_weights`)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


def is_sharded(accelerator) -> bool:
    """Whether no process holds the full weights (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.deepspeed_config["zero_optimization"]["stage"] == 3
    return False


@contextlib.contextmanager
def trained_weights(accelerator, model, ema=None, parameters=None) -> Iterator[torch.nn.Module | None]:
    """Yield, on the main process, an `EMOTrainingModule` with the full trained weights (EMA's when `ema` is
    given); None on the others. Every process must enter it.

    Unsharded, that is the training module itself, EMA weights swapped in until the block ends. Sharded, the full
    state dict is gathered from all processes into a copy built from the model configs (`accelerator.
    get_state_dict`); the training model is back to its own weights before the block runs.
    """
    if ema is not None:
        ema.store(parameters)
        ema.copy_to(parameters)
    try:
        if not is_sharded(accelerator):
            yield accelerator.unwrap_model(model) if accelerator.is_main_process else None
            return
        state = accelerator.get_state_dict(model)  # a collective: every rank, full dict on the main one
        if ema is not None:
            ema.restore(parameters)
            ema = None
        if accelerator.is_main_process:
            yield _full_copy(accelerator.unwrap_model(model), state).to(accelerator.device)
        else:
            yield None
    finally:
        if ema is not None:
            ema.restore(parameters)


def _full_copy(sharded, state: dict[str, torch.Tensor]):
    """A plain (unsharded) `EMOTrainingModule` like `sharded`, holding `state`."""
    from emo_pipeline.training.module import EMOTrainingModule

    # from_config on an FSDP<Class> builds a plain <Class> (FSDPModule.__new__), so the export names the real class
    reference_net = type(sharded.reference_net).from_config(sharded.reference_net.config)
    unet = type(sharded.unet).from_config(sharded.unet.config)
    if getattr(sharded.unet, "peft_config", None):
        for name, adapter in sharded.unet.peft_config.items():
            unet.add_adapter(adapter, adapter_name=name)
    copy = EMOTrainingModule(reference_net, unet, sharded.noise_scheduler, sharded.config)
    copy.load_state_dict(state, strict=True)
    return copy


def validate(trained, pipe, config: TrainConfig, step: int, trackers=()) -> list[Path]:
    """Generate the held-out (image, audio) pairs with `trained` (an `EMOTrainingModule`); save mp4s under
    `output_dir/validation/step-N/`, log 4 frames of each to tensorboard. Returns the video paths."""
    import numpy as np

    from emo_pipeline.audio import load_audio
    from emo_pipeline.media import read_video_frames

    pipe.reference_net, pipe.unet = trained.reference_net, trained.unet
    folder = Path(config.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    was_training = trained.training
    trained.eval()
    paths = []
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
            paths.append(path)
            frames = read_video_frames(path)
            picks = frames[np.linspace(0, len(frames) - 1, 4).astype(int)]
            for tracker in trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images(f"validation/{index}", picks, step, dataformats="NHWC")
    finally:
        trained.train(was_training)
    return paths


def validation_scores(paths: list[Path], config: TrainConfig, step: int) -> dict[str, float]:
    """The `validation.metrics` of this step's validation videos (emo-evaluate's per-video numbers, averaged; FID/FVD
    over their frames), written to `validation/step-N/metrics.json` with every "skipped" reason; returns
    `{"validation/<key>": value}` for the trackers (empty when no metrics are configured)."""
    import json

    from emo_pipeline.evaluation.runner import Evaluator, VideoItem

    settings = config.validation
    if not settings.metrics:
        return {}
    references = list(settings.references)
    if references and len(references) != len(settings.images):
        raise EMOInputError(
            f"validation.references has {len(references)} videos for {len(settings.images)} validation images: "
            "give one ground-truth video per image (or none)"
        )
    evaluator = Evaluator(tuple(settings.metrics), settings.metric_weights)
    records = []
    for index, path in enumerate(paths):
        item = VideoItem(
            f"sample-{index}",
            str(path),
            reference=references[index] if references else None,
            portrait=settings.images[index],
        )
        records.append(evaluator.video(item)[0])
    aggregate, skipped = evaluator.aggregate(records)
    folder = Path(config.output_dir) / "validation" / f"step-{step}"
    (folder / "metrics.json").write_text(json.dumps({"aggregate": aggregate, "skipped": skipped, "videos": records}))
    return {f"validation/{key}": value for key, value in aggregate.items() if not key.endswith("_videos")}

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
ends where an uninterrupted one does, also when it stopped in the middle of an epoch.

The modules, in the order a run uses them:

* `schedule`: the noise schedule training uses, and the sampling scheduler it writes into the pipeline;
* `setup`: trainable parameter groups, LoRA, memory options, the data loader and the optimizer;
* `inputs`: a dataset batch -> model inputs (frozen VAE encoding, conditioning dropout);
* `module`: `EMOTrainingModule`, ReferenceNet + backbone + the denoising loss;
* `checkpoints`: fault-safe save and resume;
* `export`: gathering the trained weights (also under FSDP), validation videos, the exported pipeline, LoRA;
* `loop`: `train`, which runs a stage from these parts.
"""

from emo_pipeline.training.checkpoints import find_resumable_checkpoint, save_checkpoint
from emo_pipeline.training.export import export_pipeline
from emo_pipeline.training.loop import TrainResult, describe, train
from emo_pipeline.training.module import EMOTrainingModule
from emo_pipeline.training.setup import select_trainable_parameters

__all__ = [
    "EMOTrainingModule",
    "TrainResult",
    "describe",
    "export_pipeline",
    "find_resumable_checkpoint",
    "save_checkpoint",
    "select_trainable_parameters",
    "train",
]

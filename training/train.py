"""Train one EMO stage: `accelerate launch training/train.py --config configs/train/stage1.yaml [key=value ...]`.

Also runs as plain `python training/train.py ...` (one process) and under `torchrun --nproc_per_node N` (accelerate
reads the torch.distributed environment). Multi-GPU, multi-node, DeepSpeed and FSDP come from accelerate's own
config (`accelerate launch --config_file training/accelerate_deepspeed_zero2.yaml ...`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from emo_pipeline.config import load_config
from emo_pipeline.errors import EMOInputError
from emo_pipeline.training import describe, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML training config (configs/train/stage*.yaml)")
    parser.add_argument("--resume_from_checkpoint", help='"latest" or a checkpoint folder (overrides the config)')
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.learning_rate=1e-5 data.root=...")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    overrides = list(args.overrides)
    if args.resume_from_checkpoint:
        overrides.append(f"resume_from_checkpoint={args.resume_from_checkpoint}")
    try:
        config = load_config(args.config, overrides)
        logging.getLogger("emo_pipeline.training").info("config:\n%s", describe(config))
        result = train(config)
    except EMOInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.is_main_process:
        saved = result.export_dir or result.lora_dir
        print(
            f"done: {result.global_step} steps on {result.num_processes} process(es), mixed precision "
            f"{result.mixed_precision}",
            f"saved {saved}" if saved else "",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

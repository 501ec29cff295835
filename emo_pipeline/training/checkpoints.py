"""Fault-safe checkpoints: written to a temporary folder, renamed when complete (every file's size recorded in
`trainer_state.json`), `latest` updated last, old ones pruned only after a successful save. Resuming skips
incomplete or truncated checkpoints."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from emo_pipeline.config import TrainConfig
from emo_pipeline.errors import EMOInputError

__all__ = ["find_resumable_checkpoint", "resume", "save_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"


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


def resume(accelerator, config: TrainConfig, ema=None) -> tuple[int, Path | None]:
    """Restore the state `config.resume_from_checkpoint` names (weights, optimizer, LR schedule, RNG, data order
    through accelerate; EMA here). Returns `(global_step, checkpoint folder)`, `(0, None)` when not resuming."""
    if not config.resume_from_checkpoint:
        return 0, None
    folder = find_resumable_checkpoint(config.output_dir, config.resume_from_checkpoint)
    if folder is None:
        logger.warning(
            "resume_from_checkpoint=%s: no complete checkpoint, starting from scratch", config.resume_from_checkpoint
        )
        return 0, None
    accelerator.load_state(str(folder))
    global_step = json.loads((folder / STATE_FILE).read_text())["global_step"]
    if ema is not None:
        _load_ema(folder, ema)
    accelerator.print(f"resumed from {folder} at step {global_step}")
    return global_step, folder

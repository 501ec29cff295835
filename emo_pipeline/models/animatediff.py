"""Loading AnimateDiff temporal weights (Guo et al. 2023, arXiv 2307.04725) for the EMO backbone.

Two layouts are read: a diffusers `MotionAdapter` (folder or hub id) and the original AnimateDiff checkpoints
(`mm_sd_v15_v2.ckpt`: keys like `down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.
attention_blocks.0.to_q.weight`). A legacy pickle is read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from diffusers import MotionAdapter
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from safetensors.torch import load_file

from emo_pipeline.errors import EMOInputError

__all__ = [
    "infer_motion_adapter_config",
    "load_motion_adapter",
    "load_original_motion_state_dict",
    "original_motion_key",
]

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def load_motion_adapter(
    path_or_id: str | os.PathLike, torch_dtype: torch.dtype | None = None, **config_overrides
) -> MotionAdapter:
    """A diffusers `MotionAdapter` from a MotionAdapter folder / hub id or an original AnimateDiff checkpoint file.

    For an original checkpoint the adapter config is inferred from the weights; what the weights cannot tell
    (`motion_num_attention_heads`, default 8, and `motion_norm_num_groups`, default 32, as in AnimateDiff) can be
    overridden with `config_overrides`.
    """
    path = Path(path_or_id)
    if path.is_file():
        original = load_original_motion_state_dict(path)
        config = {**infer_motion_adapter_config(original), **config_overrides}
        adapter = MotionAdapter(**config)
        state = convert_animatediff_checkpoint_to_diffusers(original)
        missing, unexpected = adapter.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("pos_embed.pe")]  # sinusoid tables are recomputed
        if missing or unexpected:
            raise EMOInputError(
                f"{path}: not an AnimateDiff motion module checkpoint for this config ({config}): "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        return adapter.to(torch_dtype) if torch_dtype is not None else adapter
    if path.suffix in _PICKLE_SUFFIXES + (".safetensors",):
        raise EMOInputError(f"motion adapter checkpoint {path} does not exist")
    try:
        return MotionAdapter.from_pretrained(str(path_or_id), torch_dtype=torch_dtype, **config_overrides)
    except OSError as error:  # no such folder, no such Hub repo, offline: name the input
        raise EMOInputError(
            f"cannot load motion adapter {str(path_or_id)!r} (a MotionAdapter folder, Hub id or AnimateDiff "
            f"checkpoint file): {error}"
        ) from error


def load_original_motion_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict of an original AnimateDiff checkpoint (safetensors, or a pickle read with weights_only=True)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise EMOInputError(f"cannot read motion module checkpoint {path}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any("motion_modules" in k for k in state):
        raise EMOInputError(f"{path} holds no AnimateDiff motion module weights (no 'motion_modules' keys)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def infer_motion_adapter_config(state: dict[str, torch.Tensor]) -> dict:
    """MotionAdapter config fields readable from original-layout weights (channels, layer counts, table length)."""
    down: dict[int, dict[int, int]] = {}  # block -> motion module -> transformer layer count
    pattern = re.compile(
        r"down_blocks\.(\d+)\.motion_modules\.(\d+)\.temporal_transformer\.transformer_blocks\.(\d+)\."
    )
    for key in state:
        if match := pattern.match(key):
            block, module, layer = map(int, match.groups())
            layers = down.setdefault(block, {})
            layers[module] = max(layers.get(module, 0), layer + 1)
    if not down:
        raise EMOInputError("no down_blocks.*.motion_modules.*.temporal_transformer weights in the checkpoint")
    blocks = sorted(down)
    channels = [
        state[f"down_blocks.{b}.motion_modules.0.temporal_transformer.proj_in.weight"].shape[1] for b in blocks
    ]
    config = {
        "block_out_channels": tuple(channels),
        "motion_layers_per_block": len(down[blocks[0]]),
        "motion_transformer_layers_per_block": down[blocks[0]][0],
        "use_motion_mid_block": any(k.startswith("mid_block.motion_modules.") for k in state),
    }
    pe = next((v for k, v in state.items() if k.endswith("pos_encoder.pe")), None)
    if pe is not None:
        config["motion_max_seq_length"] = pe.shape[1]
    return config


def original_motion_key(key: str) -> str:
    """One original AnimateDiff temporal key (as Hallo and EchoMimic store them, relative to a motion module) ->
    diffusers' (the renames of diffusers' own single-file mapping)."""
    return (
        key.replace(".norms.0", ".norm1")
        .replace(".norms.1", ".norm2")
        .replace(".ff_norm", ".norm3")
        .replace(".attention_blocks.0", ".attn1")
        .replace(".attention_blocks.1", ".attn2")
        .replace(".temporal_transformer", "")
    )

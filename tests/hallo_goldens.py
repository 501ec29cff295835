"""The Hallo goldens (tests/goldens/hallo, hallo2) as test inputs, shared by the Hallo test modules."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from emo_pipeline.hallo import HalloConditioning

GOLDENS = Path(__file__).parent / "goldens"


def golden(variant: str = "hallo") -> dict:
    """`meta`, `inputs` and `outputs` of one variant's goldens (README.md in its folder says what each holds)."""
    folder = GOLDENS / variant
    return {
        "meta": json.loads((folder / "metadata.json").read_text()),
        "inputs": load_file(folder / "inputs.safetensors"),
        "outputs": load_file(folder / "outputs.safetensors"),
    }


def golden_conditioning(inputs: dict, audio_length: int) -> HalloConditioning:
    """The goldens' preprocessed inputs as the pipeline's `hallo_conditioning`."""
    return HalloConditioning(
        source_image=inputs["source_image"],
        face_embedding=inputs["face_emb"],
        face_region=inputs["face_region"][None],
        region_masks={
            level: tuple(inputs[f"{kind}_mask_{level}"] for kind in ("full", "face", "lip")) for level in range(4)
        },
        audio_features=inputs["audio_emb"],
        audio_length=audio_length,
    )


def golden_reference(models, bank: dict, clip: int, rounded: bool = True):
    """Hallo's own reference bank of clip `clip` (`reference_bank.safetensors`, float32 as written) as the
    `ReferenceFeatures` our backbone reads: rounded to float16 as Hallo's reader rounds it (`rounded`), so a
    teacher-forced step sees exactly the bank Hallo's step saw, not our recomputation of it (whose float16
    roundings flip on float noise)."""
    from emo_pipeline.models.attention import ReferenceFeatures

    spatial, temporal = {}, {}
    prefix = f"clip{clip}/"
    for key, rows in bank.items():
        if not key.startswith(prefix):
            continue
        name = key.removeprefix(prefix) + ".attn1"
        tokens = rows.reshape(2, -1, *rows.shape[1:])  # (2, 1 + n, L, C): [src, motion frames] x 2 copies
        tokens = tokens.half().float() if rounded else tokens
        spatial[name] = tokens[:, 0]
        temporal.update(models._motion_features(name, tokens[:, 1:]))
    return ReferenceFeatures(spatial=spatial, temporal=temporal, tiled=True)

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


def half_size_conditioning(inputs: dict, audio_length: int) -> HalloConditioning:
    """The goldens' inputs at half their size (64 px), for pipeline tests that compare the pipeline with itself,
    not with Hallo (4x less work than the 128 px goldens): the image 2x2-averaged, the face box subsampled, each
    level's masks taken from the next finer level of the golden (the deepest, 1x1, is the mean of the 2x2 one)."""
    import torch.nn.functional as F

    half = dict(inputs)
    half["source_image"] = F.avg_pool2d(inputs["source_image"], 2)
    half["face_region"] = inputs["face_region"][:, ::2, ::2].contiguous()
    for kind in ("full", "face", "lip"):
        for level in range(3):
            half[f"{kind}_mask_{level}"] = inputs[f"{kind}_mask_{level + 1}"]
        half[f"{kind}_mask_3"] = inputs[f"{kind}_mask_3"].mean(dim=1, keepdim=True)
    return golden_conditioning(half, audio_length)

"""Checkpoint families: one small module each, all sampled by the one loop of `emo_pipeline.sampling`.

`family_of(pipe)` picks the family of a pipeline's weights. The registry names modules, imported on first use, so
the pipeline does not import every family's code (nor a family the pipeline: no import cycle).
To add a family: docs/families.md.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from emo_pipeline.families.base import Family

__all__ = ["FAMILIES", "Family", "all_families", "family_of"]

# name -> "module:class". Checked in order; the last (native EMO) matches every pipeline no other family claims.
FAMILIES: dict[str, str] = {
    "hallo": "emo_pipeline.families.hallo:HalloFamily",
    "emo": "emo_pipeline.families.emo:EMOFamily",
}


@functools.cache
def _load(path: str) -> type[Family]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def all_families() -> list[type[Family]]:
    """Every registered family class, in matching order."""
    return [_load(path) for path in FAMILIES.values()]


def family_of(pipe: Any) -> Family:
    """The family instance serving `pipe` (an `EMOPipeline`)."""
    for family in all_families():
        if family.matches(pipe):
            return family(pipe)
    raise RuntimeError("no family matched (the native EMO family matches every pipeline)")  # pragma: no cover

"""Training data for EMO (arXiv 2402.17485): `emo-preprocess` (raw talking-head videos -> clip dataset) and
`TalkingHeadDataset` (that dataset -> stage 1/2/3 training samples).

Names are imported lazily, so `import emo_pipeline.data` does not import torch, mediapipe or decord.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "TalkingHeadDataset": "emo_pipeline.data.dataset",
    "PreprocessConfig": "emo_pipeline.data.preprocess",
    "PreprocessSummary": "emo_pipeline.data.preprocess",
    "VideoResult": "emo_pipeline.data.preprocess",
    "preprocess_videos": "emo_pipeline.data.preprocess",
    "process_video": "emo_pipeline.data.preprocess",
    "suggest_speed_buckets": "emo_pipeline.data.stats",
}

__all__ = [
    "PreprocessConfig",
    "PreprocessSummary",
    "TalkingHeadDataset",
    "VideoResult",
    "preprocess_videos",
    "process_video",
    "suggest_speed_buckets",
]

if TYPE_CHECKING:  # pragma: no cover
    from emo_pipeline.data.dataset import TalkingHeadDataset
    from emo_pipeline.data.preprocess import (
        PreprocessConfig,
        PreprocessSummary,
        VideoResult,
        preprocess_videos,
        process_video,
    )
    from emo_pipeline.data.stats import suggest_speed_buckets


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'emo_pipeline.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

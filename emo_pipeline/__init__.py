"""emo-pipeline: one portrait + one audio track -> a talking-head video (EMO, arXiv 2402.17485).

Public names are imported lazily so that `import emo_pipeline` stays cheap (no torch/diffusers import until
a name is used) and the command-line tools start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from emo_pipeline._torchvision import install_import_guard  # noqa: E402

install_import_guard()  # see emo_pipeline/_torchvision.py: torchvision imports also where its C++ ops do not load

_LAZY = {
    "EMOInputError": "emo_pipeline.errors",
    "ReferenceNet": "emo_pipeline.models.reference_net",
    "ReferenceFeatures": "emo_pipeline.models.attention",
    "EMOUNet3DConditionModel": "emo_pipeline.models.backbone",
    "AudioProjection": "emo_pipeline.models.audio_projection",
    "FaceLocator": "emo_pipeline.models.face_locator",
    "SpeedEncoder": "emo_pipeline.models.speed",
    "EMOPipeline": "emo_pipeline.pipeline_emo",
    "EMOPipelineOutput": "emo_pipeline.pipeline_emo",
    "build_emo_pipeline": "emo_pipeline.conversion",
    "load_audio": "emo_pipeline.audio",
    "load_image": "emo_pipeline.face",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from emo_pipeline.audio import load_audio
    from emo_pipeline.conversion import build_emo_pipeline
    from emo_pipeline.errors import EMOInputError
    from emo_pipeline.face import load_image
    from emo_pipeline.models.attention import ReferenceFeatures
    from emo_pipeline.models.audio_projection import AudioProjection
    from emo_pipeline.models.backbone import EMOUNet3DConditionModel
    from emo_pipeline.models.face_locator import FaceLocator
    from emo_pipeline.models.reference_net import ReferenceNet
    from emo_pipeline.models.speed import SpeedEncoder
    from emo_pipeline.pipeline_emo import EMOPipeline, EMOPipelineOutput


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'emo_pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

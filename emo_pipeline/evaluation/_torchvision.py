"""Import torchvision for pytorch-fid, also where its compiled operators cannot load.

pytorch-fid builds its Inception-v3 from torchvision's model classes. A torchvision wheel built against another torch
build (PyPI's CUDA torchvision beside a CPU-only torch 2.13) fails to load its C++ extension, and then its import dies
registering fake kernels for `torchvision::nms`/`qnms` ("operator torchvision::nms does not exist"). The models used
here are pure PyTorch: declaring those two operator schemas (no kernel: calling them still fails loudly) lets the rest
of torchvision import. Nothing is declared when torchvision imports normally.
"""

from __future__ import annotations

import sys
from typing import Any

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY: list[Any] = []  # keeps the torch.library.Library alive (dropping it would unregister the schemas)


def import_torchvision() -> Any:
    """`import torchvision`, declaring the missing `torchvision::nms`/`qnms` schemas if its extension did not load."""
    import torch

    for _ in range(len(_SCHEMAS) + 1):
        try:
            import torchvision

            return torchvision
        except RuntimeError as error:
            missing = [name for name in _SCHEMAS if f"operator torchvision::{name} does not exist" in str(error)]
            if not missing:
                raise
            for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[module]
            if not _LIBRARY:
                _LIBRARY.append(torch.library.Library("torchvision", "FRAGMENT"))
            _LIBRARY[0].define(_SCHEMAS[missing[0]])
    raise ImportError("torchvision could not be imported")  # pragma: no cover

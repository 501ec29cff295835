"""Import torchvision also where its compiled operators cannot load.

pytorch-fid (emo-evaluate's FID) builds its Inception-v3 from torchvision's model classes, so the `eval`/`test`
extras install torchvision. A torchvision wheel built against another torch build (PyPI's CUDA torchvision beside a
CPU-only torch 2.13) fails to load its C++ extension, and its import then dies registering fake kernels for
`torchvision::nms` / `qnms` ("operator torchvision::nms does not exist"), which also breaks transformers (it imports
torchvision when installed). The models used here are pure PyTorch: declaring those two operator schemas (no kernel:
calling them still fails loudly) lets the rest of torchvision import. Nothing is declared when torchvision imports
normally.

`install_import_guard()` (called by `import emo_pipeline`, costs nothing until torchvision is imported) routes the
first `import torchvision` of the process through `import_torchvision()`, so worker processes and transformers get
the same fix.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from typing import Any

__all__ = ["import_torchvision", "install_import_guard"]

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY: list[Any] = []  # keeps the torch.library.Library alive (dropping it would unregister the schemas)
_STATE = threading.local()


def import_torchvision() -> Any:
    """`import torchvision`, declaring the missing `torchvision::nms`/`qnms` schemas if its extension did not load."""
    import torch

    _STATE.busy = True
    try:
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
    finally:
        _STATE.busy = False


class _Loaded(importlib.abc.Loader):
    def create_module(self, spec: Any) -> Any:
        return sys.modules["torchvision"]

    def exec_module(self, module: Any) -> None:
        return None


class _Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "torchvision" or getattr(_STATE, "busy", False):
            return None
        if importlib.machinery.PathFinder.find_spec(name, path) is None:
            return None  # not installed: the normal "no module named torchvision"
        module = import_torchvision()
        return importlib.machinery.ModuleSpec(name, _Loaded(), origin=module.__spec__.origin, is_package=True)


def install_import_guard() -> None:
    if not any(isinstance(finder, _Guard) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Guard())

"""dabdetr: DAB-DETR object detection in PyTorch.

Public API (imports are lazy so `import dabdetr` stays light):
    load_model, save_model, export_huggingface, DabDetr, DabDetrConfig, DabDeformableDetr,
    DabDeformableDetrConfig, DetectionOutput,
    batch_images, postprocess, predict, HungarianMatcher, SetCriterion
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DabDetr": "dabdetr.models.dab_detr",
    "DabDetrConfig": "dabdetr.config",
    "DabDeformableDetr": "dabdetr.models.dab_deformable_detr",
    "DabDeformableDetrConfig": "dabdetr.config",
    "DetectionOutput": "dabdetr.models.outputs",
    "batch_images": "dabdetr.data.batching",
    "postprocess": "dabdetr.postprocessing",
    "load_model": "dabdetr.weights.loading",
    "save_model": "dabdetr.weights.loading",
    "export_huggingface": "dabdetr.weights.loading",
    "HungarianMatcher": "dabdetr.models.matcher",
    "SetCriterion": "dabdetr.models.criterion",
    "predict": "dabdetr.inference",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dabdetr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

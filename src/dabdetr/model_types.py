"""The detector families dabdetr builds, by the `model_type` name stored in our files.

"dab-detr" (DabDetr, DabDetrConfig) and "dab-deformable-detr" (DabDeformableDetr,
DabDeformableDetrConfig). A file without a model type is a DAB-DETR one.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from dabdetr.config import DabDeformableDetrConfig, DabDetrConfig

ModelConfig = DabDetrConfig | DabDeformableDetrConfig

DEFAULT_MODEL_TYPE = "dab-detr"
_CONFIGS: dict[str, type] = {"dab-detr": DabDetrConfig,
                             "dab-deformable-detr": DabDeformableDetrConfig}
_MODELS = {"dab-detr": ("dabdetr.models.dab_detr", "DabDetr"),
           "dab-deformable-detr": ("dabdetr.models.dab_deformable_detr", "DabDeformableDetr")}


def model_type_of(config: ModelConfig) -> str:
    """The model type name of a config object."""
    for name, cls in _CONFIGS.items():
        if type(config) is cls:
            return name
    raise TypeError(f"{type(config).__name__} is not a dabdetr model config; expected one of "
                    f"{[c.__name__ for c in _CONFIGS.values()]}")


def config_from_dict(data: dict[str, Any], model_type: str = DEFAULT_MODEL_TYPE) -> ModelConfig:
    """The config of `model_type` from its plain-dict form (as `to_dict` wrote it)."""
    if model_type not in _CONFIGS:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {sorted(_CONFIGS)} "
                         "(a file from a newer dabdetr may need an upgrade)")
    return _CONFIGS[model_type].from_dict(data)


def build_model(config: ModelConfig) -> nn.Module:
    """A randomly initialized model of the config's type."""
    module, name = _MODELS[model_type_of(config)]
    return getattr(importlib.import_module(module), name)(config)

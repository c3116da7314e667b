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
# Whether the family's query selection ranks encoder proposals by class 0 alone, so their loss
# labels every target 0: Deformable DETR's two-stage does (the authors' `bin_targets`); our
# DAB-DETR selection ranks cells by their best class and keeps the labels.
_CLASS_AGNOSTIC_PROPOSALS = {"dab-detr": False, "dab-deformable-detr": True}


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


def class_agnostic_proposals(config: ModelConfig) -> bool:
    """Whether the encoder-proposal loss of this config's family is class-agnostic (see
    `SetCriterion`'s `enc_class_agnostic`)."""
    return _CLASS_AGNOSTIC_PROPOSALS[model_type_of(config)]


def build_model(config: ModelConfig) -> nn.Module:
    """A randomly initialized model of the config's type."""
    module, name = _MODELS[model_type_of(config)]
    return getattr(importlib.import_module(module), name)(config)

"""Our own weight format: a directory with `config.json` (plain JSON) and `model.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from dabdetr.model_types import DEFAULT_MODEL_TYPE, ModelConfig, config_from_dict, model_type_of

FORMAT_NAME = "dabdetr"
FORMAT_VERSION = 1


def is_native_directory(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT_NAME
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def write_native(config: ModelConfig, state: dict[str, Tensor], path: Path,
                 extra: dict[str, Any] | None = None) -> None:
    """Write config.json + model.safetensors. `extra` is stored as plain JSON beside the config
    (e.g. the training recipe); the category map lives in the config (id2label,
    class_to_category)."""
    path.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
           "model_type": model_type_of(config), "config": config.to_dict()}
    if extra:
        doc["extra"] = extra
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(doc, indent=2))


def read_native(path: Path, **overrides: Any) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, state dict) of a directory `write_native` wrote; `model_type` in config.json
    picks the config class (absent: DAB-DETR)."""
    try:
        doc = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path / 'config.json'}: {err}") from None
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer dabdetr (format version "
                         f"{doc['format_version']}); upgrade dabdetr to read it")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{path} has config.json but no model.safetensors")
    model_type = doc.get("model_type", DEFAULT_MODEL_TYPE)
    config = config_from_dict(doc["config"], model_type).replace(**overrides)
    return config, load_file(str(weights))

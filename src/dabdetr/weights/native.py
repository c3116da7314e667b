"""Our own weight format: a directory with `config.json` (plain JSON) and `model.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from dabdetr.errors import BadWeightsError
from dabdetr.io_utils import atomic_write
from dabdetr.model_types import DEFAULT_MODEL_TYPE, ModelConfig, config_from_dict, model_type_of

FORMAT_NAME = "dabdetr"
FORMAT_VERSION = 1


def is_native_directory(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT_NAME
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def load_safetensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors; BadWeightsError naming the file if it is unreadable or
    corrupt (e.g. an interrupted download)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise BadWeightsError(f"cannot read {path} as safetensors ({err}); the file is "
                              "incomplete or corrupt: download or convert it again") from None


def write_native(config: ModelConfig, state: dict[str, Tensor], path: Path,
                 extra: dict[str, Any] | None = None) -> None:
    """Write config.json + model.safetensors, each atomically, with the umask's permissions.
    `extra` is stored as plain JSON beside the config (e.g. the training recipe); the category
    map and the eval resize live in the config; `model_type` names the config class."""
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
           "model_type": model_type_of(config), "config": config.to_dict()}
    if extra:
        doc["extra"] = extra
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    atomic_write(path / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write(path / "config.json", json.dumps(doc, indent=2))


def read_native(path: Path, **overrides: Any) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, state dict) of a directory `write_native` wrote; `model_type` in config.json
    picks the config class (absent: DAB-DETR)."""
    config_file = path / "config.json"
    try:
        doc = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadWeightsError(f"cannot read {config_file}: {err}") from None
    version = doc.get("format_version", 0)
    if not isinstance(version, int) or not isinstance(doc.get("config"), dict):
        raise BadWeightsError(f"{config_file} is damaged: it needs an integer 'format_version' "
                              "and a 'config' object; convert the weights again")
    if version > FORMAT_VERSION:
        raise BadWeightsError(f"{path} was written by a newer dabdetr (format version "
                              f"{version}); upgrade dabdetr to read it")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise BadWeightsError(f"{path} has config.json but no model.safetensors")
    model_type = doc.get("model_type", DEFAULT_MODEL_TYPE)
    try:
        config = config_from_dict(doc["config"], model_type).replace(**overrides)
    except (ValueError, TypeError) as err:
        raise BadWeightsError(f"{config_file}: {err}") from None
    return config, load_safetensors(weights)

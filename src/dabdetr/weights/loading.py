"""`load_model`: one entry point for every weight source.

Sources, tried in this order:
1. a directory with our `config.json` (format "dabdetr") + `model.safetensors`;
2. a directory with a transformers DabDetr `config.json` + safetensors;
3. a `.pth`/`.pt` file: the authors' checkpoint ({'model', 'args'}), a training checkpoint of
   ours ({'model', 'config'}), or a bare state dict in either naming;
4. a `.safetensors` file with a state dict (config inferred, overrides for the rest);
5. a Hugging Face hub id ("IDEA-Research/dab-detr-resnet-50"), downloaded with huggingface_hub.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dabdetr.config import DabDetrConfig
from dabdetr.errors import BadWeightsError
from dabdetr.model_types import ModelConfig, build_model, config_from_dict, model_type_of
from dabdetr.weights import deformable, huggingface, native, official
from dabdetr.weights.strict import LoadReport, load_state_dict_checked

# File endings that mark a source as a local file, never a hub id ("run/best.pt").
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt", ".json")


def read_weights(source: str | Path, **overrides: Any) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, state dict in our naming) from any supported source; nothing is built.

    Raises BadWeightsError (a ValueError) naming the source and the fix when it is missing,
    unreadable, corrupt or not DAB-DETR / DAB-Deformable-DETR weights.
    """
    path = Path(source)
    if path.is_dir():
        if native.is_native_directory(path):
            return native.read_native(path, **overrides)
        if (path / "config.json").is_file():
            return huggingface.read_hf_directory(path, **overrides)
        raise BadWeightsError(f"{path} is a directory without config.json: not a dabdetr or "
                              "Hugging Face model directory")
    if path.is_file():
        if path.suffix == ".safetensors":
            return _from_state_dict(path, native.load_safetensors(path), None, overrides)
        return _from_torch_file(path, overrides)
    if isinstance(source, str) and huggingface.HUB_ID.match(source) and not _looks_local(source):
        return huggingface.read_hf_directory(huggingface.download_from_hub(source), **overrides)
    raise BadWeightsError(_not_found_message(path))


def _looks_local(source: str) -> bool:
    """True for a name that is meant as a local path, not a hub id: a weights file ending,
    or a first folder that exists here."""
    path = Path(source)
    return path.suffix.lower() in WEIGHT_SUFFIXES or Path(path.parts[0]).is_dir()


def _not_found_message(path: Path) -> str:
    message = f"weights {str(path)!r} not found: no such file or directory"
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1)
        if close:
            return f"{message}; did you mean {str(parent / close[0])!r}?"
    return (f"{message}; give an existing file or folder, or a Hugging Face hub id like "
            "'IDEA-Research/dab-detr-resnet-50'")


def _from_torch_file(path: Path, overrides: dict[str, Any]) -> tuple[ModelConfig, dict]:
    checkpoint = official.safe_torch_load(path)
    if not isinstance(checkpoint, dict):
        raise BadWeightsError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    if "config" in checkpoint and "model" in checkpoint:  # our training checkpoint
        model_type = checkpoint.get("model_type", "dab-detr")
        try:
            config = config_from_dict(checkpoint["config"], model_type).replace(**overrides)
        except (ValueError, TypeError) as err:
            raise BadWeightsError(f"{path}: its model config is damaged: {err}") from None
        _check_tensor_dict(path, checkpoint["model"])
        return config, checkpoint["model"]
    if "model" in checkpoint:
        args = checkpoint.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        elif args is not None and not isinstance(args, dict):
            raise BadWeightsError(f"{path}: 'args' is a {type(args).__name__}, expected a "
                                  "Namespace")
        return _from_state_dict(path, checkpoint["model"], args, overrides)
    if checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        return _from_state_dict(path, checkpoint, None, overrides)
    keys = sorted(map(str, checkpoint))[:10]
    raise BadWeightsError(f"{path} is not a DAB-DETR checkpoint: top-level keys {keys}")


def _check_tensor_dict(path: Path, state: Any) -> None:
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise BadWeightsError(f"{path}: 'model' is not a state dict of named tensors")


def _from_state_dict(path: Path, state: dict, args: dict | None,
                     overrides: dict[str, Any]) -> tuple[ModelConfig, dict]:
    _check_tensor_dict(path, state)
    if deformable.is_deformable_state_dict(state):  # DAB-Deformable-DETR, by its keys
        return _deformable_from_state_dict(path, state, args, overrides)
    if args and "deformable" in str(args.get("modelname", "")):
        raise BadWeightsError(f"{path}: args name the {args['modelname']} model but the weights "
                              "have no deformable attention (sampling_offsets) keys")
    iter_update = None
    if official.is_official_state_dict(state):
        try:
            state, iter_update = official.official_to_ours(state)
        except ValueError as err:
            raise BadWeightsError(f"{path}: {err}") from None
    if "input_proj.weight" not in state or "class_embed.weight" not in state:
        raise BadWeightsError(f"{path} does not look like DAB-DETR weights: no "
                              f"input_proj/class_embed keys among {len(state)} (first: "
                              f"{list(state)[:5]})")
    if iter_update is False and "iter_update" not in overrides:
        overrides = {**overrides, "iter_update": False}
    if args and "id2label" not in overrides and args.get("dataset_file") == "coco":
        overrides = {**overrides, "id2label": coco_names_for(state["class_embed.weight"].shape[0])}
    try:
        return official.infer_config(state, args, **overrides), state
    except ValueError as err:
        raise BadWeightsError(f"{path}: {err}") from None
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise BadWeightsError(f"{path} does not look like complete DAB-DETR weights (cannot "
                              f"read {err} from it); give a complete checkpoint") from None


def _deformable_from_state_dict(path: Path, state: dict, args: dict | None,
                                overrides: dict[str, Any]) -> tuple[ModelConfig, dict]:
    state = deformable.official_to_ours(state)
    if "transformer.level_embed" not in state or "class_embed.0.weight" not in state:
        raise BadWeightsError(f"{path} has deformable attention keys but no transformer.level_embed/"
                         "class_embed.0: not DAB-Deformable-DETR weights we understand")
    if args and "id2label" not in overrides and args.get("dataset_file") == "coco":
        overrides = {**overrides, "id2label": coco_names_for(state["class_embed.0.weight"].shape[0])}
    return deformable.infer_config(state, args, **overrides), state


def coco_names_for(num_classes: int) -> dict[int, str]:
    """COCO category names by id, for heads laid out by category id (the authors' 91)."""
    from dabdetr.data.categories import COCO_CATEGORY_NAMES

    return {i: n for i, n in COCO_CATEGORY_NAMES.items() if i < num_classes}


def load_model(source: str | Path, strict: bool = True, device: str = "cpu",
               return_report: bool = False, **overrides: Any) -> nn.Module | tuple[nn.Module, LoadReport]:
    """Build the model a weight source holds (DabDetr or DabDeformableDetr) and load it;
    returns the model in eval mode.

    `overrides` set config fields a file cannot tell (e.g. dilation=True for a DC5
    state dict without args). strict=False loads what fits and re-initializes the rest (e.g.
    a class head of another size when fine-tuning). With return_report=True the result is
    (model, LoadReport): what was loaded, missing, unexpected or mis-shaped.
    Raises BadWeightsError (a ValueError) for a source that cannot be loaded.
    """
    model, report = load_model_with_report(source, strict=strict, **overrides)
    model = model.to(device).eval()
    return (model, report) if return_report else model


def load_model_with_report(source: str | Path, strict: bool = True,
                           **overrides: Any) -> tuple[nn.Module, LoadReport]:
    """(model on the CPU, LoadReport) from any weight source; see `load_model`."""
    config, state = read_weights(source, **overrides)
    model = build_model(config)
    return model, load_state_dict_checked(model, state, strict=strict)


def save_model(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write our format (directory: config.json + model.safetensors)."""
    native.write_native(model.config, model.state_dict(), Path(path), extra)


def export_huggingface(model: nn.Module, path: str | Path) -> None:
    """Write a directory that transformers' DabDetrForObjectDetection loads (DAB-DETR only:
    transformers has no DAB-Deformable-DETR)."""
    if not isinstance(model.config, DabDetrConfig):
        raise ValueError(f"transformers has no {model_type_of(model.config)} model; save it in "
                         "our format with save_model instead")
    huggingface.write_hf_directory(model.config, model.state_dict(), Path(path))

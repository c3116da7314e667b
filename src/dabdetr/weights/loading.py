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
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from dabdetr.config import DabDetrConfig
from dabdetr.model_types import ModelConfig, build_model, config_from_dict, model_type_of
from dabdetr.weights import deformable, huggingface, native, official
from dabdetr.weights.strict import LoadReport, load_state_dict_checked


def read_weights(source: str | Path, **overrides: Any) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, state dict in our naming) from any supported source; nothing is built."""
    path = Path(source)
    if path.is_dir():
        if native.is_native_directory(path):
            return native.read_native(path, **overrides)
        if (path / "config.json").is_file():
            return huggingface.read_hf_directory(path, **overrides)
        raise ValueError(f"{path} is a directory without config.json: not a dabdetr or Hugging "
                         "Face model directory")
    if path.is_file():
        if path.suffix == ".safetensors":
            try:
                state = load_file(str(path))
            except (SafetensorError, OSError) as err:
                raise ValueError(f"cannot read {path} as safetensors: {err}") from None
            return _from_state_dict(path, state, None, overrides)
        return _from_torch_file(path, overrides)
    if isinstance(source, str) and huggingface.HUB_ID.match(source) and not path.exists():
        return huggingface.read_hf_directory(huggingface.download_from_hub(source), **overrides)
    raise ValueError(f"weights source {str(source)!r} is neither an existing file or directory "
                     "nor a Hugging Face hub id like 'IDEA-Research/dab-detr-resnet-50'")


def _from_torch_file(path: Path, overrides: dict[str, Any]) -> tuple[ModelConfig, dict]:
    checkpoint = official.safe_torch_load(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    if "config" in checkpoint and "model" in checkpoint:  # our training checkpoint
        model_type = checkpoint.get("model_type", "dab-detr")
        config = config_from_dict(checkpoint["config"], model_type).replace(**overrides)
        return config, checkpoint["model"]
    if "model" in checkpoint:
        args = checkpoint.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        elif args is not None and not isinstance(args, dict):
            raise ValueError(f"{path}: 'args' is a {type(args).__name__}, expected a Namespace")
        return _from_state_dict(path, checkpoint["model"], args, overrides)
    if all(isinstance(v, Tensor) for v in checkpoint.values()):
        return _from_state_dict(path, checkpoint, None, overrides)
    raise ValueError(f"{path} is not a DAB-DETR checkpoint: top-level keys {sorted(checkpoint)[:10]}")


def _from_state_dict(path: Path, state: dict, args: dict | None,
                     overrides: dict[str, Any]) -> tuple[ModelConfig, dict]:
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: 'model' is not a state dict of tensors")
    if deformable.is_deformable_state_dict(state):  # DAB-Deformable-DETR, by its keys
        return _deformable_from_state_dict(path, state, args, overrides)
    if args and "deformable" in str(args.get("modelname", "")):
        raise ValueError(f"{path}: args name the {args['modelname']} model but the weights have "
                         "no deformable attention (sampling_offsets) keys")
    iter_update = None
    if official.is_official_state_dict(state):
        state, iter_update = official.official_to_ours(state)
    if "input_proj.weight" not in state or "class_embed.weight" not in state:
        raise ValueError(f"{path} does not look like DAB-DETR weights: no input_proj/class_embed "
                         f"keys among {len(state)} (first: {list(state)[:5]})")
    if iter_update is False and "iter_update" not in overrides:
        overrides = {**overrides, "iter_update": False}
    if args and "id2label" not in overrides and args.get("dataset_file") == "coco":
        overrides = {**overrides, "id2label": coco_names_for(state["class_embed.weight"].shape[0])}
    return official.infer_config(state, args, **overrides), state


def _deformable_from_state_dict(path: Path, state: dict, args: dict | None,
                                overrides: dict[str, Any]) -> tuple[ModelConfig, dict]:
    state = deformable.official_to_ours(state)
    if "transformer.level_embed" not in state or "class_embed.0.weight" not in state:
        raise ValueError(f"{path} has deformable attention keys but no transformer.level_embed/"
                         "class_embed.0: not DAB-Deformable-DETR weights we understand")
    if args and "id2label" not in overrides and args.get("dataset_file") == "coco":
        overrides = {**overrides, "id2label": coco_names_for(state["class_embed.0.weight"].shape[0])}
    return deformable.infer_config(state, args, **overrides), state


def coco_names_for(num_classes: int) -> dict[int, str]:
    """COCO category names by id, for heads laid out by category id (the authors' 91)."""
    from dabdetr.data.categories import COCO_CATEGORY_NAMES

    return {i: n for i, n in COCO_CATEGORY_NAMES.items() if i < num_classes}


def load_model(source: str | Path, strict: bool = True, device: str = "cpu",
               **overrides: Any) -> nn.Module:
    """Build the model a weight source holds (DabDetr or DabDeformableDetr) and load it;
    returns the model in eval mode.

    `overrides` set config fields a file cannot tell (e.g. dilation=True for a DC5
    state dict without args). strict=False loads what fits and re-initializes the rest (e.g.
    a class head of another size when fine-tuning); the report is on `model.load_report`.
    """
    model, _ = load_model_with_report(source, strict=strict, **overrides)
    return model.to(device).eval()


def load_model_with_report(source: str | Path, strict: bool = True,
                           **overrides: Any) -> tuple[nn.Module, LoadReport]:
    config, state = read_weights(source, **overrides)
    model = build_model(config)
    report = load_state_dict_checked(model, state, strict=strict)
    model.load_report = report
    return model, report


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

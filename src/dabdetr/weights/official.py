"""The authors' checkpoint files (IDEA-Research/DAB-DETR): safe loading and config inference.

Their files are `torch.save({'model': state_dict, 'args': argparse.Namespace, ...})`. We load
them with `torch.load(weights_only=True)` and an allow-list (argparse.Namespace and path
objects); anything else pickled in the file is refused, never unpickled.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dabdetr.config import BACKBONES, DabDetrConfig
from dabdetr.errors import BadWeightsError

# Objects an official (or torchvision) checkpoint may legitimately hold besides tensors.
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath,
                pathlib.WindowsPath, pathlib.PureWindowsPath]


def safe_torch_load(path: str | Path) -> Any:
    """torch.load with weights_only=True and our allow-list.

    Raises BadWeightsError (a ValueError) naming the file: missing, not a PyTorch file at all,
    damaged, or holding pickled objects outside the allow-list (never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise BadWeightsError(f"checkpoint not found: {path}")
    if not looks_like_torch_file(path):
        raise BadWeightsError(
            f"{path} is not a PyTorch checkpoint (neither a torch zip archive nor a pickle); "
            "give a .pth/.pt file written by torch.save, a .safetensors file or a model folder")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
        found = [g for g in pickled_globals(path) if g not in allowed
                 and not g.startswith(("torch.", "collections.OrderedDict", "builtins.set"))]
        if not found and "Unsupported global" not in str(err):
            raise _damaged(path, err) from None
        what = ", ".join(sorted(set(found))) or "objects of types outside the allow-list"
        raise BadWeightsError(
            f"refused to load {path}: it contains pickled {what}, not on the allow-list of safe "
            "types (tensors, plain containers, argparse.Namespace). Unpickling it could execute "
            "code from the file, so it was not unpickled. Re-save the weights as a plain state "
            "dict or safetensors from a trusted environment."
        ) from None
    except Exception as err:  # weights_only parsing of a damaged file fails in many ways
        raise _damaged(path, err) from None


def _damaged(path: Path, err: BaseException) -> BadWeightsError:
    return BadWeightsError(f"could not read {path} as a PyTorch checkpoint ({type(err).__name__}: "
                           f"{str(err)[:200]}); the file is damaged or incomplete: get it again")


def looks_like_torch_file(path: Path) -> bool:
    """Whether a file can be a torch.save output: a zip archive (the format since torch 1.6)
    or a pickle stream (the legacy format, which starts with the PROTO opcode)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def pickled_globals(path: Path) -> list[str]:
    """Names of the classes/functions a pickle (plain or inside a torch zip) refers to.

    Read with pickletools, which only parses opcodes: nothing is imported or executed.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                data = zf.read(member) if member else b""
        else:
            data = path.read_bytes()
        names: list[str] = []
        strings: list[str] = []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        return names
    except Exception:  # a broken pickle: we only wanted names for the message
        return []


def _layer_count(state_dict: dict[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_backbone(state_dict: dict[str, Tensor], prefix: str = "backbone.body.") -> str:
    """ResNet depth from parameter names and shapes (bottleneck blocks have conv3)."""
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state_dict
    layer3_blocks = _layer_count(state_dict, re.escape(prefix) + r"layer3\.(\d+)\.")
    if bottleneck:
        return "resnet101" if layer3_blocks > 6 else "resnet50"
    return "resnet34" if layer3_blocks > 2 else "resnet18"


def infer_config(state_dict: dict[str, Tensor], args: dict[str, Any] | None = None,
                 **overrides: Any) -> DabDetrConfig:
    """A DabDetrConfig from our-named state dict keys plus (optionally) the official args.

    The state dict decides what it can (sizes, layer counts, heads, optional modules); the
    args decide what it cannot (dilation, heads count, temperatures, activation if not PReLU);
    `overrides` win over both.
    """
    args = args or {}
    sd = state_dict
    dec = "transformer.decoder."
    values: dict[str, Any] = {}
    values["backbone"] = args.get("backbone") or infer_backbone(sd)
    if values["backbone"] not in BACKBONES:
        raise ValueError(f"unsupported backbone {values['backbone']!r} in checkpoint args")
    values["backbone_return_layer"] = next(
        (layer for layer in ("layer4", "layer3", "layer2")
         if any(k.startswith(f"backbone.body.{layer}.") for k in sd)), "layer4"
    )
    values["dilation"] = bool(args.get("dilation", False))
    values["hidden_dim"] = sd["input_proj.weight"].shape[0]
    values["nheads"] = int(args.get("nheads", 8))
    values["enc_layers"] = _layer_count(sd, r"transformer\.encoder\.layers\.(\d+)\.")
    values["dec_layers"] = _layer_count(sd, r"transformer\.decoder\.layers\.(\d+)\.")
    values["dim_feedforward"] = sd["transformer.encoder.layers.0.linear1.weight"].shape[0]
    values["dropout"] = float(args.get("dropout", 0.0))
    if "transformer.encoder.layers.0.activation.weight" in sd:
        values["activation"] = "prelu"
    else:
        values["activation"] = args.get("transformer_activation", "relu")
    values["pre_norm"] = "transformer.encoder.norm.weight" in sd
    if "position_embedding.row_embed.weight" in sd:
        values["position_embedding"] = "learned"
    values["pe_temperature_h"] = float(args.get("pe_temperatureH", 20))
    values["pe_temperature_w"] = float(args.get("pe_temperatureW", 20))
    if "refpoint_embed.weight" in sd:
        values["num_queries"] = sd["refpoint_embed.weight"].shape[0]
        if sd["refpoint_embed.weight"].shape[-1] == 2:  # learned points, not boxes
            values["query_type"] = "anchor2d"
    elif "query_embed.weight" in sd:  # learned positional vectors, no anchors
        values["query_type"] = "detr"
        values["num_queries"] = sd["query_embed.weight"].shape[0]
    elif "query_selection.class_embed.weight" in sd:
        # query selection keeps no per-query weights: the count comes from args or overrides
        values["two_stage"] = True
        values["num_queries"] = int(args.get("num_queries", 300))
    if "transformer.patterns.weight" in sd:
        values["num_patterns"] = sd["transformer.patterns.weight"].shape[0]
    values["random_refpoints_xy"] = bool(args.get("random_refpoints_xy", False))
    values["modulate_hw_attn"] = f"{dec}ref_anchor_head.layers.0.weight" in sd
    values["keep_query_pos"] = f"{dec}layers.1.ca_qpos_proj.weight" in sd
    if f"{dec}query_scale.weight" in sd:
        values["query_scale_type"] = "fix_elewise"
    elif sd.get(f"{dec}query_scale.layers.1.weight", torch.empty(2, 0)).shape[0] == 1:
        values["query_scale_type"] = "cond_scalar"
    values["bbox_embed_diff_each_layer"] = "bbox_embed.0.layers.0.weight" in sd
    values["num_classes"] = sd["class_embed.weight"].shape[0]
    values["aux_loss"] = bool(args.get("aux_loss", True))
    values.update(overrides)
    return DabDetrConfig(**values)


# The authors' key prefixes and ours: their backbone Joiner holds the ResNet (0) and the
# position embedding (1).
_PREFIXES = (("backbone.0.", "backbone."), ("backbone.1.", "position_embedding."))


def official_to_ours(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """Rename the authors' keys to ours. Returns (state dict, iter_update).

    backbone.0.body.* -> backbone.body.*; backbone.1.* (learned position embedding) ->
    position_embedding.*. transformer.decoder.bbox_embed.* is upstream's second reference to
    the shared box head: dropped after checking it equals bbox_embed.* (its presence means
    iterative refinement was on).
    """
    out: dict[str, Tensor] = {}
    decoder_copy: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("transformer.decoder.bbox_embed."):
            decoder_copy[key.removeprefix("transformer.decoder.")] = value
            continue
        key = _renamed(key, _PREFIXES)
        if key.endswith("num_batches_tracked"):
            continue
        out[key] = value
    for key, value in decoder_copy.items():
        if key in out and not torch.equal(out[key], value):
            raise ValueError(
                f"checkpoint's transformer.decoder.{key} differs from {key}; upstream shares one "
                "box head between them, so this file is not a DAB-DETR checkpoint we understand"
            )
    return out, bool(decoder_copy)


def ours_to_official(state_dict: dict[str, Tensor], iter_update: bool = True
                     ) -> dict[str, Tensor]:
    """Our keys renamed to the authors' (the inverse of `official_to_ours`): the state dict
    their `DABDETR` module loads. With iterative refinement their decoder holds a second
    reference to the box head, so its keys appear twice (sharing the tensors)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        out[_renamed(key, [(ours, theirs) for theirs, ours in _PREFIXES])] = value
    if iter_update:
        for key, value in state_dict.items():
            if key.startswith("bbox_embed."):
                out["transformer.decoder." + key] = value
    return out


def _renamed(key: str, prefixes) -> str:
    """`key` with the first matching (old, new) prefix replaced."""
    for old, new in prefixes:
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def is_official_state_dict(state_dict: dict[str, Any]) -> bool:
    return any(k.startswith("backbone.0.body.") for k in state_dict) and any(
        k.startswith("transformer.decoder.") for k in state_dict
    )

"""The authors' DAB-DETR (IDEA-Research/DAB-DETR) as a third benchmark peer, same weights.

Nothing of theirs ships with dabdetr: `--authors-repo PATH` points the benchmarks at a checkout
the user made (git clone https://github.com/IDEA-Research/DAB-DETR), whose modules are imported
from there. Two things keep their code from importing or building on a machine without their
CUDA extension or internet access, and both are worked around here without touching the
checkout:
- `models/__init__.py` also imports the deformable variant, whose ops import the compiled
  `MultiScaleDeformableAttention` extension at import time. DAB-DETR itself never calls it, so
  an empty module stands in for it when it is not installed.
- their ResNet is built with `pretrained=is_main_process()`, which downloads ImageNet weights;
  the benchmark loads its own weights over them anyway, so the backbone is built without.

Their inverse_sigmoid clamps at 1e-3, where the benchmarks' models use transformers' 1e-5; the
two only differ where a box coordinate saturates, which the printed output differences show.

The weights come from one of our models: `dabdetr.weights.official.ours_to_official` renames
our keys to theirs and their model loads the result strictly.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import torch
from torch import Tensor

from dabdetr import DabDetr, DabDetrConfig
from dabdetr.weights.official import ours_to_official

# The optimizer groups of the authors' main.py: parameters named "*backbone*" get lr_backbone.
BACKBONE_KEY = "backbone"


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--authors-repo", type=checkout, default=None, metavar="PATH",
        help="a checkout of IDEA-Research/DAB-DETR: also time the authors' code, same weights")


def checkout(text: str) -> Path:
    """`text` as the resolved path of a DAB-DETR checkout (argparse type)."""
    repo = Path(text).expanduser().resolve()
    if not (repo / "models" / "DAB_DETR" / "DABDETR.py").is_file():
        raise argparse.ArgumentTypeError(
            f"{repo} has no models/DAB_DETR/DABDETR.py; expected a checkout of "
            "https://github.com/IDEA-Research/DAB-DETR")
    return repo


def _import(repo: Path) -> types.ModuleType:
    """The authors' `models.DAB_DETR.DABDETR` module, imported from `repo`."""
    repo = checkout(str(repo))
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    if importlib.util.find_spec("MultiScaleDeformableAttention") is None:
        sys.modules["MultiScaleDeformableAttention"] = types.ModuleType(
            "MultiScaleDeformableAttention")
    with warnings.catch_warnings():  # timm's deprecation note, from their Swin import
        warnings.simplefilter("ignore", FutureWarning)
        backbone = importlib.import_module("models.DAB_DETR.backbone")
    backbone.is_main_process = lambda: False  # pretrained=False: no ImageNet download
    return importlib.import_module("models.DAB_DETR.DABDETR")


def authors_args(config: DabDetrConfig, device: str) -> argparse.Namespace:
    """The options of the authors' main.py that describe `config` (their defaults elsewhere)."""
    unsupported = {
        "backbone_norm": "frozen", "backbone_return_layer": "layer4",
        "backbone_trainable_layers": 3, "position_embedding": "sine", "num_classes": 91,
        "modulate_hw_attn": True, "keep_query_pos": False, "query_scale_type": "cond_elewise",
        "bbox_embed_diff_each_layer": False, "iter_update": True, "dn_groups": 0,
        "two_stage": False, "pad_invariant": False, "query_pe_temperature": 10000.0,
    }
    for name, value in unsupported.items():
        if getattr(config, name) != value:
            raise SystemExit(f"the authors' DAB-DETR has no option for {name}="
                             f"{getattr(config, name)!r} (theirs: {value!r})")
    return argparse.Namespace(
        backbone=config.backbone, dilation=config.dilation, lr_backbone=1e-5,
        batch_norm_type="FrozenBatchNorm2d", masks=False, frozen_weights=None,
        position_embedding="sine", hidden_dim=config.hidden_dim, nheads=config.nheads,
        enc_layers=config.enc_layers, dec_layers=config.dec_layers,
        dim_feedforward=config.dim_feedforward, dropout=config.dropout,
        pre_norm=config.pre_norm, transformer_activation=config.activation,
        pe_temperatureH=config.pe_temperature_h, pe_temperatureW=config.pe_temperature_w,
        num_queries=config.num_queries, num_patterns=config.num_patterns,
        random_refpoints_xy=config.random_refpoints_xy, aux_loss=config.aux_loss,
        dataset_file="coco", device=device, num_select=300, focal_alpha=0.25,
        set_cost_class=2.0, set_cost_bbox=5.0, set_cost_giou=2.0,
        cls_loss_coef=1.0, bbox_loss_coef=5.0, giou_loss_coef=2.0,
        mask_loss_coef=1.0, dice_loss_coef=1.0,
    )


def build(repo: Path, model: DabDetr, device: str):
    """(the authors' model with `model`'s weights, their SetCriterion), in eval mode."""
    dabdetr_module = _import(repo)
    args = authors_args(model.config, device)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torchvision's note on the deprecated `pretrained`
        warnings.simplefilter("ignore", UserWarning)
        theirs, criterion, _ = dabdetr_module.build_DABDETR(args)
    state = ours_to_official(model.state_dict(), model.config.iter_update)
    # their FrozenBatchNorm2d deletes num_batches_tracked when loading; nothing else may differ
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the authors' model did not take our weights: missing {missing}, "
                           f"unexpected {unexpected}")
    return theirs.to(device).eval(), criterion.to(device)


def nested(images: Tensor, mask: Tensor):
    """The authors' NestedTensor input (mask True on padding, as ours)."""
    misc = importlib.import_module("util.misc")
    return misc.NestedTensor(images, mask)

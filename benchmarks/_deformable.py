"""The sides of the DAB-Deformable-DETR benchmarks: our model, our model with the authors'
attention core in place of ours, and transformers' DeformableDetrForObjectDetection.

- ours: `DabDeformableDetr` from a preset, with random but well-scaled weights
  (`_common.well_scaled`; the same seed gives the same weights in every process).
- the authors' core: the same model with the authors' pure-PyTorch `ms_deform_attn_core_pytorch`
  (their CUDA kernel's reference) swapped in for dabdetr's `ms_deform_attn`. It is loaded from
  the one file that holds it in a checkout the user made (git clone
  https://github.com/IDEA-Research/DAB-DETR); its compiled-extension import gets an empty
  stand-in module, which the PyTorch core does not use.
- transformers: a Deformable DETR of the same size (backbone, width, heads, layers, feed-forward
  width, levels, sampling points, queries, classes) with box refinement, one stage, no dropout,
  its own random initialization (so different weights from ours) and no download: a timm
  backbone without pretrained weights, and its PyTorch attention path
  (`disable_custom_kernels=True`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import _common
import torch
from torch import nn

from dabdetr.model_types import build_model
from dabdetr.models import deformable_attention
from dabdetr.presets import preset_config

PRESET = "dab-deformable-detr-r50"
CORE_FILE = Path("models/dab_deformable_detr/ops/functions/ms_deform_attn_func.py")
# the --tiny model: the R50 preset cut down to ResNet-18, 2 + 2 layers, 64 wide, 10 queries
TINY = {"backbone": "resnet18", "hidden_dim": 64, "nheads": 4, "enc_layers": 2,
        "dec_layers": 2, "dim_feedforward": 128, "num_queries": 10}
SEED = 0


def model_config(tiny: bool, preset: str = PRESET):
    """The preset's DabDeformableDetrConfig, cut down to `TINY` for smoke tests."""
    return preset_config(preset, **(TINY if tiny else {}))


def ours(config, device: str) -> nn.Module:
    """Our model for `config` with the benchmarks' seeded, well-scaled random weights, in eval
    mode on `device`."""
    torch.manual_seed(SEED)
    return _common.well_scaled(build_model(config)).to(device)


def authors_core(repo: Path) -> Callable:
    """`ms_deform_attn_core_pytorch` from a DAB-DETR checkout, loaded from its file alone."""
    path = repo.expanduser().resolve() / CORE_FILE
    if not path.is_file():
        raise SystemExit(f"{repo} has no {CORE_FILE}; expected a checkout of "
                         "https://github.com/IDEA-Research/DAB-DETR")
    if ("MultiScaleDeformableAttention" not in sys.modules
            and importlib.util.find_spec("MultiScaleDeformableAttention") is None):
        sys.modules["MultiScaleDeformableAttention"] = types.ModuleType(
            "MultiScaleDeformableAttention")
    spec = importlib.util.spec_from_file_location("authors_ms_deform_attn_func", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ms_deform_attn_core_pytorch


@contextlib.contextmanager
def core_replaced(core: Callable) -> Iterator[None]:
    """Our model's attention core swapped for the authors' (signature without level starts)."""
    mine = deformable_attention.ms_deform_attn
    deformable_attention.ms_deform_attn = (
        lambda value, shapes, starts, locations, weights: core(value, shapes, locations, weights))
    try:
        yield
    finally:
        deformable_attention.ms_deform_attn = mine


def import_transformers():
    """transformers with its Deformable DETR modules and timm (its backbone here) imported
    (it loads both lazily), quiet."""
    import timm  # noqa: F401
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.DeformableDetrForObjectDetection  # noqa: B018 (the lazy import)
    return transformers


def transformers_model(config, device: str) -> nn.Module:
    """transformers' DeformableDetrForObjectDetection of the same size as our `config`, random
    weights (seeded), in eval mode on `device`; no network access."""
    transformers = import_transformers()
    theirs = transformers.DeformableDetrConfig(
        backbone=config.backbone, use_timm_backbone=True, use_pretrained_backbone=False,
        d_model=config.hidden_dim, encoder_attention_heads=config.nheads,
        decoder_attention_heads=config.nheads, encoder_layers=config.enc_layers,
        decoder_layers=config.dec_layers, encoder_ffn_dim=config.dim_feedforward,
        decoder_ffn_dim=config.dim_feedforward, num_feature_levels=config.num_feature_levels,
        encoder_n_points=config.enc_n_points, decoder_n_points=config.dec_n_points,
        num_queries=config.num_queries, num_labels=config.num_classes, dropout=0.0,
        with_box_refine=True, two_stage=False, auxiliary_loss=True, disable_custom_kernels=True)
    torch.manual_seed(SEED)
    return transformers.DeformableDetrForObjectDetection(theirs).to(device).eval()


def freeze_like_ours(model: nn.Module) -> None:
    """Train the backbone's layer2..4 only, as ours (and the published recipe) does: with a
    timm backbone transformers leaves the stem and layer1 trainable."""
    for name, p in model.model.backbone.named_parameters():
        if not any(f"layer{i}." in name for i in (2, 3, 4)):
            p.requires_grad_(False)


def trainable(model: nn.Module) -> int:
    """Number of parameters that get gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

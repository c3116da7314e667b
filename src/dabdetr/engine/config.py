"""How a model is trained: `TrainConfig`, and the `train` command's arguments derived from it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dabdetr.data.transforms import TransformRecipe, scaled_recipe


@dataclass
class TrainConfig:
    """Everything about how a model is trained. Defaults are the authors' recipe (per process
    batch 2; they used 8 GPUs, a global batch of 16)."""

    data: str = ""
    out: str = "runs/train"
    train_split: str = "train"
    val_split: str = "val"
    layout: str = "contiguous"  # "coco91": class index = category id (the authors' COCO heads)
    model: str = "dab-detr-r50"  # preset name
    model_overrides: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # initialise from these (fine-tuning); other class count is fine
    backbone_weights: str | None = None  # torchvision ResNet state dict file, or "imagenet"
    epochs: int = 50
    max_steps: int | None = None  # stop after this many optimizer steps (overall)
    time_limit: float | None = None  # stop after this many minutes (checked every step)
    batch_size: int = 2
    accumulate: int = 1  # gradient accumulation: optimizer step every N batches
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop: list[int] = field(default_factory=lambda: [40])  # epochs where lr *= lr_gamma
    lr_gamma: float = 0.1
    # time-budgeted runs: multiply the lr by lr_gamma once this fraction of time_limit has passed
    lr_drop_time: float | None = None
    warmup_steps: int = 0  # linear warm-up of every lr from 0.1% over this many steps
    clip_max_norm: float = 0.1
    amp: str = "none"  # "bf16" (CUDA, or a CPU with bf16 support) or "fp16" (CUDA only)
    ema_decay: float = 0.0  # >0: keep an EMA of the weights and evaluate/save it
    seed: int = 42
    deterministic: bool = False
    num_workers: int = 2
    # matcher / loss (defaults: the published costs and weights)
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    match_repeat: int = 1  # one-to-many matching: each ground truth matched k times (aux layers)
    enc_match_repeat: int = 1  # the same for the encoder proposals of query selection
    # augmentation: image_size=800 is the official recipe, smaller scales it down
    image_size: int = 800
    no_crop: bool = False
    no_flip: bool = False
    no_multi_scale: bool = False  # train at the single scale image_size (fixed input sizes)
    eval_every: int = 1  # epochs
    eval_batch_size: int = 2
    num_select: int = 300
    log_every: int = 20  # steps between JSONL step records
    progress: bool = True

    def recipe(self) -> TransformRecipe:
        recipe = scaled_recipe(self.image_size)
        if self.no_crop:
            recipe = dataclasses.replace(recipe, crop_resize=None)
        if self.no_multi_scale:
            recipe = dataclasses.replace(recipe, scales=(recipe.eval_size,),
                                         max_size=recipe.eval_max_size)
        return recipe

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--data", required=True, help="dataset dir: annotations/instances_{split}.json "
                   "+ images in {split}/, {split}2017/ or images/{split}/")
    p.add_argument("--out", default=d.out, help="run directory (checkpoints, logs, plots)")
    p.add_argument("--train-split", default=d.train_split)
    p.add_argument("--val-split", default=d.val_split)
    p.add_argument("--layout", choices=["contiguous", "coco91"], default=d.layout,
                   help="class indices: contiguous 0..K-1, or the category id itself (authors' COCO)")
    p.add_argument("--model", default=d.model, help="model preset (see `python -m dabdetr.presets`)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model config overrides, e.g. num_queries=100 dilation=true")
    p.add_argument("--weights", default=None, help="initialise from these weights (fine-tune)")
    p.add_argument("--backbone-weights", default=None,
                   help="torchvision ResNet state dict file, or 'imagenet' to download")
    p.add_argument("--resume", default=None, help="a last.pt/best.pt to continue exactly")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    p.add_argument("--time-limit", type=float, default=None, help="stop after N minutes")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--accumulate", type=int, default=d.accumulate, help="batches per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-backbone", type=float, default=d.lr_backbone, help="0 freezes it")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--lr-drop", type=int, nargs="*", default=d.lr_drop, help="epochs")
    p.add_argument("--lr-gamma", type=float, default=d.lr_gamma)
    p.add_argument("--lr-drop-time", type=float, default=d.lr_drop_time, metavar="FRACTION",
                   help="with --time-limit: multiply the lr by --lr-gamma once this fraction "
                   "of the time has passed")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--clip-max-norm", type=float, default=d.clip_max_norm, help="0 disables")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default=d.amp,
                   help="mixed precision: bf16 on CUDA or on a CPU with native bf16 (AVX512-BF16 "
                        "or AMX), fp16 on CUDA only")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 disables the EMA")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--set-cost-class", type=float, default=d.set_cost_class)
    p.add_argument("--set-cost-bbox", type=float, default=d.set_cost_bbox)
    p.add_argument("--set-cost-giou", type=float, default=d.set_cost_giou)
    p.add_argument("--cls-loss-coef", type=float, default=d.cls_loss_coef)
    p.add_argument("--bbox-loss-coef", type=float, default=d.bbox_loss_coef)
    p.add_argument("--giou-loss-coef", type=float, default=d.giou_loss_coef)
    p.add_argument("--focal-alpha", type=float, default=d.focal_alpha)
    p.add_argument("--match-repeat", type=int, default=d.match_repeat,
                   help="one-to-many: match each object k times on auxiliary layers")
    p.add_argument("--enc-match-repeat", type=int, default=d.enc_match_repeat,
                   help="one-to-many: match each object k times among the encoder proposals "
                   "(query selection, --two-stage)")
    p.add_argument("--dn-groups", type=int, default=0,
                   help="denoising query groups (DN-DETR), training only; 0 = off")
    p.add_argument("--dn-label-noise", type=float, default=0.2, help="label flip probability")
    p.add_argument("--dn-box-noise", type=float, default=0.4, help="box noise scale")
    p.add_argument("--two-stage", action="store_true",
                   help="query selection: decoder anchors = best encoder-cell proposals, "
                   "which get their own loss (model config two_stage=True)")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help="max short side; 800 = official multi-scale recipe, smaller scales it")
    p.add_argument("--no-crop", action="store_true", help="disable the random-crop branch")
    p.add_argument("--no-flip", action="store_true", help="disable horizontal flips")
    p.add_argument("--no-multi-scale", action="store_true",
                   help="train at the single short side --image-size")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--num-select", type=int, default=d.num_select)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from dabdetr.cli import parse_overrides

    cfg = TrainConfig()
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg) if hasattr(args, f.name)}
    values["model_overrides"] = parse_overrides(args.set)
    if args.dn_groups:
        values["model_overrides"].update(dn_groups=args.dn_groups,
                                         dn_label_noise=args.dn_label_noise,
                                         dn_box_noise=args.dn_box_noise)
    if args.two_stage:
        values["model_overrides"].update(two_stage=True)
    values["progress"] = not args.no_progress
    return dataclasses.replace(cfg, **values)

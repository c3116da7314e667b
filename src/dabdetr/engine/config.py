"""How a model is trained: `TrainConfig`, and the `train` command's arguments derived from its
fields (each field's metadata holds its help line and the range of values it accepts)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dabdetr.config import DabDetrConfig, parse_overrides
from dabdetr.data.formats import FORMAT_CHOICES
from dabdetr.data.transforms import TransformRecipe, scaled_recipe
from dabdetr.engine.tracking import TRACKERS


@dataclass(frozen=True)
class Bound:
    """The values a number may take: `test(value)` is True for those, `text` says which."""

    test: Callable[[float], bool]
    text: str


POSITIVE = Bound(lambda v: v > 0, "> 0")
NON_NEGATIVE = Bound(lambda v: v >= 0, ">= 0")
PROBABILITY = Bound(lambda v: 0 <= v <= 1, "in [0, 1]")
FRACTION = Bound(lambda v: 0 < v <= 1, "in (0, 1]")
DECAY = Bound(lambda v: 0 <= v < 1, "in [0, 1)")


def option(default: Any, help: str, bound: Bound | None = None, *, flag: str | None = None,
           choices: tuple[str, ...] | None = None, factory: Callable[[], Any] | None = None
           ) -> Any:
    """A TrainConfig field with its `train` switch: help line, accepted range, and a flag name
    where it is not `--field-name`."""
    metadata = {"help": help, "bound": bound, "flag": flag, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything about how a model is trained. Defaults are the authors' recipe (per process
    batch 2; they used 8 GPUs, a global batch of 16)."""

    data: str = option("", "dataset folder: COCO (annotations/instances_{split}.json + images "
                       "in {split}/, {split}2017/ or images/{split}/), YOLO (data.yaml, or "
                       "images/{split} + labels/{split}) or Pascal VOC (Annotations/, "
                       "JPEGImages/, ImageSets/Main/)")
    format: str = option("auto", "dataset format; auto detects it and says which",
                         choices=FORMAT_CHOICES)
    train_json: str | None = option(None, "COCO: the train split's annotation file")
    val_json: str | None = option(None, "COCO: the val split's annotation file")
    images: str | None = option(None, "COCO: the folder the json files' file_name entries are "
                                "relative to")
    skip_bad: bool = option(False, "leave out the entries `dabdetr check-data` reports "
                            "(missing images, bad boxes, unknown classes ...) instead of "
                            "stopping")
    log: str = option("", "also log to any of " + ",".join(TRACKERS) + " (comma separated; "
                      "local files under --out, offline)")
    out: str = option("runs/train", "run directory (checkpoints, logs, plots)")
    train_split: str = option("train", "split to train on")
    val_split: str = option("val", "split to evaluate on")
    layout: str = option("contiguous", "class indices: contiguous 0..K-1, or the category id "
                         "itself (the authors' COCO heads)", choices=("contiguous", "coco91"))
    model: str = option("dab-detr-r50", "model preset (see `python -m dabdetr.presets`)")
    model_overrides: dict[str, Any] = option(
        None, "model config overrides KEY=VALUE, e.g. num_queries=100 dilation=true",
        flag="--set", factory=dict)
    weights: str | None = option(None, "initialise from these weights (fine-tuning; another "
                                 "class count is fine)")
    backbone_weights: str | None = option(None, "torchvision ResNet state dict file, or "
                                          "'imagenet' to download")
    epochs: int = option(50, "epochs to train", POSITIVE)
    max_steps: int | None = option(None, "stop after N optimizer steps (overall)", POSITIVE)
    time_limit: float | None = option(None, "stop after N minutes (checked every step)",
                                      POSITIVE)
    batch_size: int = option(2, "images per batch, per process", POSITIVE)
    accumulate: int = option(1, "gradient accumulation: batches per optimizer step", POSITIVE)
    lr: float = option(1e-4, "learning rate of everything but the backbone", POSITIVE)
    lr_backbone: float = option(1e-5, "learning rate of the backbone; 0 freezes it",
                                NON_NEGATIVE)
    weight_decay: float = option(1e-4, "AdamW weight decay", NON_NEGATIVE)
    lr_drop: list[int] = option(None, "epochs at which the lr is multiplied by --lr-gamma",
                                NON_NEGATIVE, factory=lambda: [40])
    lr_gamma: float = option(0.1, "lr factor of each drop", POSITIVE)
    lr_drop_time: float | None = option(
        None, "with --time-limit: multiply the lr by --lr-gamma once this fraction of the time "
        "has passed", FRACTION)
    warmup_steps: int = option(0, "linear warm-up of every lr from 0.1%% over N steps",
                               NON_NEGATIVE)
    clip_max_norm: float = option(0.1, "gradient norm clipping; 0 disables", NON_NEGATIVE)
    amp: str = option("none", "mixed precision: bf16 on CUDA or on a CPU with native bf16 "
                      "(AVX512-BF16 or AMX), fp16 on CUDA only", choices=("none", "bf16", "fp16"))
    ema_decay: float = option(0.0, "keep an EMA of the weights with this decay, evaluate and "
                              "save it; 0 disables", DECAY)
    seed: int = option(42, "random seed of the run (initialization, order, augmentation)")
    deterministic: bool = option(False, "use deterministic algorithms only")
    num_workers: int = option(2, "data-loading worker processes (0: load in the training "
                              "process)", NON_NEGATIVE)
    set_cost_class: float = option(2.0, "matching cost weight of the class (focal)",
                                   NON_NEGATIVE)
    set_cost_bbox: float = option(5.0, "matching cost weight of the L1 box distance",
                                  NON_NEGATIVE)
    set_cost_giou: float = option(2.0, "matching cost weight of the GIoU", NON_NEGATIVE)
    cls_loss_coef: float = option(1.0, "loss weight of the class (focal)", NON_NEGATIVE)
    bbox_loss_coef: float = option(5.0, "loss weight of the L1 box loss", NON_NEGATIVE)
    giou_loss_coef: float = option(2.0, "loss weight of the GIoU loss", NON_NEGATIVE)
    focal_alpha: float = option(0.25, "focal loss alpha", PROBABILITY)
    match_repeat: int = option(1, "one-to-many: match each object k times on the auxiliary "
                               "decoder layers", POSITIVE)
    enc_match_repeat: int = option(1, "one-to-many: match each object k times among the "
                                   "encoder proposals (query selection, --two-stage)", POSITIVE)
    image_size: int = option(800, "max short side; 800 = the official multi-scale recipe, "
                             "smaller scales it", POSITIVE)
    no_crop: bool = option(False, "disable the random-crop branch")
    no_flip: bool = option(False, "disable horizontal flips")
    no_multi_scale: bool = option(False, "train at the single short side --image-size")
    eval_every: int = option(1, "evaluate every N epochs (and at the end)", POSITIVE)
    eval_batch_size: int = option(2, "images per evaluation batch, per process", POSITIVE)
    num_select: int | None = option(None, "top-k detections per image kept for evaluation "
                                    "(None: the authors' 300 for DAB-DETR, 100 for "
                                    "DAB-Deformable-DETR)", POSITIVE)
    log_every: int = option(20, "steps between step records in metrics.jsonl", POSITIVE)
    progress: bool = option(True, "hide the progress bars", flag="--no-progress")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            bound, value = f.metadata["bound"], getattr(self, f.name)
            for v in value if isinstance(value, list) else [value]:
                if bound is not None and v is not None and not bound.test(v):
                    raise ValueError(f"{f.name}={value!r}: must be {bound.text}")

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


# `train` switches for model-config fields, added to model_overrides when given (after --set);
# their defaults are DabDetrConfig's
MODEL_SWITCHES: dict[str, tuple[str, Bound | None]] = {
    "dn_groups": ("denoising query groups (DN-DETR), training only; 0 = off", NON_NEGATIVE),
    "dn_label_noise": ("denoising: label flip probability", PROBABILITY),
    "dn_box_noise": ("denoising: box noise scale", NON_NEGATIVE),
    "two_stage": ("query selection: decoder anchors = best encoder-cell proposals, which get "
                  "their own loss", None),
}

_PARSE = {"int": int, "float": float, "str": str, "list[int]": int}


def _parser(base: Callable[[str], Any], bound: Bound | None) -> Callable[[str], Any]:
    """argparse `type`: `base(text)` checked against `bound`; argparse names the flag."""
    def parse(text: str) -> Any:
        value = base(text)
        if bound is not None and not bound.test(value):
            raise argparse.ArgumentTypeError(f"must be {bound.text}, got {text}")
        return value

    parse.__name__ = base.__name__  # argparse's "invalid int value" names the type
    return parse


def _add_field(p: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """A switch that leaves its field out of the parsed arguments unless given (a resumed run
    tells the flags given from the defaults); its help line names the default."""
    meta, flag = f.metadata, f.metadata["flag"] or "--" + f.name.replace("_", "-")
    if f.name == "model_overrides":
        p.add_argument(flag, dest=f.name, nargs="*", default=argparse.SUPPRESS,
                       metavar="KEY=VALUE", help=meta["help"])
    elif f.type == "bool":  # its default goes without saying: the switch flips it
        p.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                       default=argparse.SUPPRESS, help=meta["help"])
    else:
        kind = f.type.removesuffix(" | None")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        text = meta["help"] if f.name == "data" else f"{meta['help']} (default: {default})"
        p.add_argument(flag, dest=f.name, type=_parser(_PARSE[kind], meta["bound"]),
                       nargs="*" if kind.startswith("list") else None, choices=meta["choices"],
                       default=argparse.SUPPRESS, help=text)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One switch per TrainConfig field (and per entry of MODEL_SWITCHES)."""
    for f in dataclasses.fields(TrainConfig):
        _add_field(p, f)
    model_defaults = DabDetrConfig()
    for name, (text, bound) in MODEL_SWITCHES.items():
        flag, default = "--" + name.replace("_", "-"), getattr(model_defaults, name)
        text = f"{text} (model default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS,
                           help=text)
        else:
            p.add_argument(flag, dest=name, type=_parser(type(default), bound),
                           default=argparse.SUPPRESS, help=text)


def given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (parsed `train` arguments), with
    model_overrides from --set and the model switches (empty when none is given); ValueError
    for a malformed --set item."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}
    values["model_overrides"] = parse_overrides(getattr(args, "model_overrides", []))
    values["model_overrides"].update(
        {name: getattr(args, name) for name in MODEL_SWITCHES if hasattr(args, name)})
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `train` arguments (TrainConfig's defaults for those not
    given); ValueError for a malformed --set item."""
    return TrainConfig(**given_values(args))

"""Training: the published recipe by default, on any COCO-format dataset, 1 CPU to N GPUs.

Single process: `dabdetr train --data DIR`. Several processes (DDP, nccl on GPUs, gloo on
CPU): `torchrun --nproc_per_node N -m dabdetr train --data DIR`. Every process reads torchrun's
environment through `dabdetr.distributed`; the model never asks for its rank.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dabdetr import distributed as dist
from dabdetr.data.check import load_checked
from dabdetr.data.coco import CocoDetection, collate
from dabdetr.data.formats import open_dataset
from dabdetr.data.transforms import TransformRecipe, scaled_recipe
from dabdetr.engine.evaluate import config_with_categories, run_evaluation
from dabdetr.engine.evaluator import CocoEvaluator, load_coco_gt
from dabdetr.engine.preview import predictions_picture
from dabdetr.engine.sampling import EpochSampler
from dabdetr.engine.tracking import Trackers, open_trackers, parse_trackers
from dabdetr.models.criterion import SetCriterion
from dabdetr.models.dab_detr import DabDetr
from dabdetr.models.matcher import HungarianMatcher
from dabdetr.precision import check_amp
from dabdetr.presets import preset_config

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good one."""


@dataclass
class TrainConfig:
    """Everything about how a model is trained. Defaults are the authors' recipe (per process
    batch 2; they used 8 GPUs, a global batch of 16)."""

    data: str = ""
    out: str = "runs/train"
    train_split: str = "train"
    val_split: str = "val"
    # dataset format and checks (see dabdetr.data.formats, dabdetr.data.check)
    format: str = "auto"  # "auto", "coco", "yolo" or "voc"
    train_json: str | None = None  # COCO: explicit annotation files and image folder
    val_json: str | None = None
    images: str | None = None
    skip_bad: bool = False  # leave out entries check-data reports instead of stopping
    log: str = ""  # experiment trackers: any of "tensorboard,mlflow,wandb"
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


# ----------------------------------------------------------------------------- small pieces


class SeededAugmentation(Dataset):
    """Wraps a dataset so each sample's random augmentation depends only on (seed, epoch,
    index): identical across worker counts, process counts and resumption."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        # the CPU generator only, where the transforms draw: torch.manual_seed also queues a
        # seed for the CUDA devices, and while CUDA is not initialized it formats a stack trace
        # per call (a 128 px demo image took 2.6-3.5 ms to load with it, 2.3-3.2 without)
        torch.default_generator.manual_seed(sample_seed % (2**63))
        random.seed(sample_seed)
        return self.dataset[index]


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The random states a resumed run needs: torch's CPU generator, Python's and NumPy's, and
    on a CUDA `device` that GPU's generator (dropout draws from it there)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       *np_state[2:]]}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state`'s states; the CUDA one only onto a CUDA `device` (a run saved on a
    GPU and resumed on the CPU continues with fresh dropout draws)."""
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file then rename: a kill never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(param)
    groups = [{"params": rest, "lr": cfg.lr}]
    if backbone and cfg.lr_backbone > 0:
        groups.append({"params": backbone, "lr": cfg.lr_backbone})
    elif backbone:
        for p in backbone:
            p.requires_grad_(False)
    params = [p for group in groups for p in group["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=_fused_adamw_supported(params))


def _fused_adamw_supported(params: list[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel (one pass over every parameter, ~4x faster than the
    per-parameter loop on CPU; the same update up to float rounding) can take these
    parameters: floating point, all on one CPU or CUDA device."""
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.is_floating_point() for p in params))


class LrSchedule:
    """Per-step factor: linear warm-up, then x lr_gamma at each lr_drop epoch (a picklable
    callable, so LambdaLR can save it)."""

    def __init__(self, warmup_steps: int, drop_steps: list[int], gamma: float):
        self.warmup_steps, self.drop_steps, self.gamma = warmup_steps, drop_steps, gamma
        self.time_dropped = False  # set once a time-based drop (TrainConfig.lr_drop_time) is due

    def __call__(self, step: int) -> float:
        drops = sum(step >= s for s in self.drop_steps) + int(self.time_dropped)
        factor = self.gamma ** drops
        if self.warmup_steps and step < self.warmup_steps:
            factor *= 0.001 + 0.999 * step / self.warmup_steps
        return factor


def load_backbone_weights(model: DabDetr, source: str) -> None:
    """ImageNet weights into the ResNet: "imagenet" (torchvision download) or a state dict file."""
    import torchvision

    from dabdetr.weights.official import safe_torch_load

    if source == "imagenet":
        weights = torchvision.models.get_model_weights(model.config.backbone).IMAGENET1K_V1
        state = weights.get_state_dict(progress=True)
    else:
        state = safe_torch_load(source)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a ResNet state dict")
    body = model.backbone.body
    own = body.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    ignored = sorted(set(state) - set(usable))
    missing = sorted(k for k in own if k not in usable and not k.endswith("num_batches_tracked"))
    if not usable:
        raise ValueError(f"{source}: no key matches a torchvision {model.config.backbone}")
    if missing:
        raise ValueError(f"{source}: backbone keys missing: {missing[:10]}")
    body.load_state_dict(usable, strict=False)
    logger.info("loaded %d backbone tensors from %s (ignored %d: %s)", len(usable), source,
                len(ignored), ", ".join(ignored[:5]))


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Owns model, data, optimizer and checkpoints for one training run."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None,
                 device: str | None = None):
        self.cfg = cfg
        self.device = dist.init_from_env(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.out = Path(cfg.out)
        seed_everything(cfg.seed, cfg.deterministic)
        if cfg.lr_drop_time is not None and not (0 < cfg.lr_drop_time <= 1
                                                 and cfg.time_limit is not None):
            raise ValueError(f"lr_drop_time={cfg.lr_drop_time} needs a time limit and a value in "
                             "(0, 1]: the fraction of --time-limit after which the lr drops")
        self.amp_dtype = check_amp(cfg.amp, self.device)  # None: float32

        parse_trackers(cfg.log)  # a wrong name or missing package fails before any work
        self.trackers = Trackers()
        recipe = cfg.recipe()
        train_tf = recipe.train_transforms() if not cfg.no_flip else _no_flip(recipe)
        self._build_datasets(train_tf, recipe.eval_transforms())

        model_cfg = preset_config(cfg.model, **cfg.model_overrides)
        model_cfg = config_with_categories(model_cfg, self.categories)
        self.model = DabDetr(model_cfg).to(self.device)
        if cfg.backbone_weights:
            load_backbone_weights(self.model, cfg.backbone_weights)
        if cfg.weights and not resume:
            self._init_from(cfg.weights)
        self.model.train()
        self.ddp: nn.Module = self.model
        if self.world > 1:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou,
                                   cfg.focal_alpha)
        weights = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef,
                   "loss_giou": cfg.giou_loss_coef}
        repeat_layers = None
        if cfg.match_repeat > 1:  # one-to-many only on the auxiliary layers; last layer 1-to-1
            repeat_layers = list(range(model_cfg.dec_layers - 1))
        self.criterion = SetCriterion(model_cfg.num_classes, matcher, weights, cfg.focal_alpha,
                                      match_repeat=cfg.match_repeat,
                                      match_repeat_layers=repeat_layers,
                                      enc_match_repeat=cfg.enc_match_repeat)
        self.optimizer = build_optimizer(self.model, cfg)
        self.sampler = EpochSampler(len(self.train_set), True, cfg.seed, self.rank, self.world)
        self.seeded = SeededAugmentation(self.train_set, cfg.seed)
        self.steps_per_epoch = max(1, -(-len(self.sampler) // (cfg.batch_size * cfg.accumulate)))
        drops = [e * self.steps_per_epoch for e in cfg.lr_drop]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LrSchedule(cfg.warmup_steps, drops, cfg.lr_gamma))
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay),
                use_buffers=True)
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.best_ap = -1.0
        self.history: list[dict[str, Any]] = []
        self.images_seen = 0
        self.train_seconds = 0.0
        self.skipped_images = 0
        if resume:
            self._resume(resume)

    # -- set-up helpers
    def _build_datasets(self, train_tf, eval_tf) -> None:
        """Read, check and wrap both splits in any dataset format (dabdetr.data.formats)."""
        cfg = self.cfg
        reader = open_dataset(cfg.data, cfg.format,
                              {cfg.train_split: cfg.train_json, cfg.val_split: cfg.val_json},
                              cfg.images)
        train = load_checked(reader, cfg.train_split, cfg.skip_bad)
        val = (train if cfg.val_split == cfg.train_split
               else load_checked(reader, cfg.val_split, cfg.skip_bad))
        self.train_set = CocoDetection(train.image_root, train.coco, train_tf, layout=cfg.layout,
                                       source=train.source)
        self.categories = self.train_set.category_map
        self.val_set = CocoDetection(val.image_root, val.coco, eval_tf,
                                     category_map=self.categories, source=val.source)
        self.val_gt = load_coco_gt(val.coco)

    def _init_from(self, source: str) -> None:
        from dabdetr.weights.loading import read_weights
        from dabdetr.weights.strict import load_state_dict_checked

        _, state = read_weights(source)
        report = load_state_dict_checked(self.model, state, strict=False)
        if report.mismatched or report.missing or report.unexpected:
            logger.warning("initialised from %s; not loaded (re-initialized):\n%s", source,
                           report.format())
        else:
            logger.info("initialised from %s (%d tensors)", source, report.loaded)

    def _resume(self, path: str) -> None:
        from dabdetr.weights.official import safe_torch_load

        ckpt = safe_torch_load(path)
        for key in ("model", "optimizer", "scheduler", "epoch", "step", "config"):
            if key not in ckpt:
                raise ValueError(f"{path} is not a dabdetr training checkpoint (no {key!r})")
        if ckpt["config"] != self.model.config.to_dict():
            raise ValueError(f"{path} was trained with another model config; cannot resume")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:
            # the kernel follows this machine, not the one that saved the checkpoint
            group["fused"] = self.optimizer.defaults["fused"]
            group["foreach"] = self.optimizer.defaults["foreach"]
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.batch_in_epoch = ckpt.get("batch_in_epoch", 0)
        self.best_ap = ckpt.get("best_ap", -1.0)
        self.history = list(ckpt.get("history", []))
        self.images_seen = ckpt.get("images_seen", 0)
        self.train_seconds = ckpt.get("train_seconds", 0.0)
        if ckpt.get("rng"):
            set_rng_state(ckpt["rng"][self.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"],
                          self.device)
        logger.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

    def eval_model(self) -> DabDetr:
        return self.ema.module if self.ema is not None else self.model

    # -- checkpoints
    def checkpoint(self, name: str) -> Path | None:
        states = dist.all_gather_objects(rng_state(self.device))
        if not dist.is_main_process():
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = {
            "model": self.model.state_dict(), "config": self.model.config.to_dict(),
            "train_config": self.cfg.to_dict(), "categories": self.categories.to_json(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "best_ap": self.best_ap, "history": self.history, "images_seen": self.images_seen,
            "train_seconds": self.train_seconds, "rng": states,
        }
        path = self.out / name
        atomic_save(ckpt, path)
        return path

    @property
    def metrics_path(self) -> Path:
        """The run's log: one JSON record a line, appended to (steps, epochs)."""
        return self.out / "metrics.jsonl"

    def _log(self, record: dict[str, Any]) -> None:
        if dist.is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop
    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.cfg.batch_size)
        self.seeded.epoch = self.epoch
        return DataLoader(self.seeded, batch_size=self.cfg.batch_size, sampler=self.sampler,
                          collate_fn=collate, num_workers=self.cfg.num_workers,
                          persistent_workers=False, pin_memory=self.device.type == "cuda")

    def _maybe_drop_lr_by_time(self, started: float) -> None:
        cfg, schedule = self.cfg, self.scheduler.lr_lambdas[0]
        if (cfg.lr_drop_time is None or cfg.time_limit is None or schedule.time_dropped
                or (time.time() - started) / 60 < cfg.lr_drop_time * cfg.time_limit):
            return
        schedule.time_dropped = True  # shared by every parameter group; saved in checkpoints
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                  strict=True):  # at once, not from the next step
            group["lr"] = base_lr * schedule(self.scheduler.last_epoch)
        logger.info("lr x %g after %.0f%% of the time limit (step %d)", cfg.lr_gamma,
                    100 * cfg.lr_drop_time, self.step)

    def _budget_left(self, started: float) -> bool:
        cfg = self.cfg
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            return False
        if cfg.time_limit is not None and (time.time() - started) / 60 >= cfg.time_limit:
            return False
        return True

    def train_step(self, batches: list) -> dict[str, float]:
        """One optimizer step over `accumulate` micro-batches."""
        cfg = self.cfg
        amp_dtype = self.amp_dtype
        totals: dict[str, float] = {}
        n_images = sum(len(b) for b in batches)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device, non_blocking=True)
            sync = i == len(batches) - 1 or not isinstance(self.ddp, DistributedDataParallel)
            ctx = self.ddp.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = self.ddp(batch.images, batch.mask, batch.targets)
                    losses = self.criterion(outputs, batch.targets)
                    loss = self.criterion.weighted_total(losses)
                finite = torch.isfinite(loss.detach()).to(torch.float32)
                if self.world > 1:  # every process must stop together, or the others hang
                    finite = dist.all_reduce_mean(finite)
                if finite.item() < 1:
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at epoch {self.epoch}, step {self.step} "
                        f"({ {k: round(float(v.detach()), 4) for k, v in losses.items()} }); the last "
                        f"checkpoint in {self.out} is the last good state. Lower --lr, raise "
                        "--warmup-steps or keep --clip-max-norm on, then --resume.")
                self.scaler.scale(loss / len(batches)).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / len(batches)
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / len(batches)
        if self.world > 1:  # log the global loss: the mean of the processes' losses
            keys = sorted(totals)
            mean = dist.all_reduce_mean(torch.tensor([totals[k] for k in keys], dtype=torch.float64,
                                                     device=self.device))
            totals = dict(zip(keys, mean.tolist(), strict=True))
        if cfg.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), cfg.clip_max_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)  # every step (upstream forgot: see REFERENCE)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        self.images_seen += n_images * self.world
        return totals

    def fit(self) -> dict[str, Any]:
        if dist.is_main_process():
            self.trackers = open_trackers(self.cfg.log, self.out, run_name=self.out.name)
            self.trackers.log_config(self.cfg.to_dict())
        try:
            return self._fit()
        finally:
            self.trackers.close()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.time() - self.train_seconds
        if dist.is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        logger.info("training %s (%.1f M params) on %d images, %d classes, %d step(s)/epoch, "
                    "device %s x %d", cfg.model, self.model.num_parameters() / 1e6,
                    len(self.train_set), self.categories.num_classes, self.steps_per_epoch,
                    self.device, self.world)
        stopped_early = False
        while self.epoch < cfg.epochs and not stopped_early:
            loader = self._loader()
            bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch // cfg.accumulate,
                       desc=f"epoch {self.epoch + 1}" + (f"/{cfg.epochs}" if cfg.epochs < 10_000
                                                         else ""), unit="step",
                       disable=not (cfg.progress and dist.is_main_process()))
            pending: list = []
            running: dict[str, float] = {}
            for batch in loader:
                self.skipped_images += batch.skipped
                if batch.skipped:
                    logger.warning("skipped %d unreadable image(s) (total %d)", batch.skipped,
                                   self.skipped_images)
                if len(batch) == 0 and self.world == 1:
                    self.batch_in_epoch += 1
                    continue
                pending.append(batch)
                self.batch_in_epoch += 1
                if len(pending) < cfg.accumulate:
                    continue
                losses = self.train_step(pending)
                pending = []
                for k, v in losses.items():
                    running[k] = running.get(k, 0.0) * 0.9 + v * 0.1 if k in running else v
                bar.update(1)
                bar.set_postfix(loss=f"{running['loss']:.3f}",
                                lr=f"{self.optimizer.param_groups[0]['lr']:.1e}")
                if self.step % cfg.log_every == 0:
                    self._log({"type": "step", "epoch": self.epoch, "step": self.step,
                               "images_seen": self.images_seen,
                               "minutes": (time.time() - started) / 60,
                               "lr": self.optimizer.param_groups[0]["lr"], **losses})
                    self.trackers.log_metrics(self.step, {
                        "lr": self.optimizer.param_groups[0]["lr"],
                        **{f"train/{k}": v for k, v in losses.items()}})
                self._maybe_drop_lr_by_time(started)
                if not self._budget_left(started):
                    stopped_early = True
                    break
            bar.close()
            self.train_seconds = time.time() - started
            if not stopped_early:
                self.epoch += 1
                self.batch_in_epoch = 0
            self.end_of_epoch(running, started, force_eval=stopped_early)
        summary = {"epochs": self.epoch, "steps": self.step, "images_seen": self.images_seen,
                   "minutes": self.train_seconds / 60, "best_AP": self.best_ap,
                   "skipped_images": self.skipped_images,
                   "last": self.history[-1] if self.history else None}
        if dist.is_main_process():
            plot_history(self.history, self.out / "curves.png", read_log(self.metrics_path))
        return summary

    def end_of_epoch(self, running: dict[str, float], started: float, force_eval: bool) -> None:
        record: dict[str, Any] = {"type": "epoch", "epoch": self.epoch, "step": self.step,
                                  "images_seen": self.images_seen,
                                  "minutes": (time.time() - started) / 60,
                                  "skipped_images": self.skipped_images,
                                  **{f"train_{k}": v for k, v in running.items()}}
        if force_eval or self.epoch % self.cfg.eval_every == 0 or self.epoch == self.cfg.epochs:
            evaluator = CocoEvaluator(self.val_gt, self.categories)
            metrics = run_evaluation(self.eval_model(), self.val_set, evaluator, self.device,
                                     self.cfg.eval_batch_size, self.cfg.num_workers,
                                     self.cfg.num_select, self.cfg.progress)
            record.update({k: v for k, v in metrics.items() if k != "per_class"})
            record["eval_minutes"] = (time.time() - started) / 60 - record["minutes"]
            self.history.append(record)
            if metrics["AP"] > self.best_ap:
                self.best_ap = metrics["AP"]
                self.checkpoint("best.pt")
            if dist.is_main_process():
                evaluator.save_results(self.out / "val_detections.json")
                self._track_evaluation(metrics)
        else:
            self.history.append(record)
        self._log(record)
        self.checkpoint("last.pt")


    def _track_evaluation(self, metrics: dict[str, Any]) -> None:
        """AP numbers and a predictions picture to the experiment trackers (main process)."""
        if not self.trackers:
            return
        self.trackers.log_metrics(self.step, {f"val/{k}": v for k, v in metrics.items()
                                              if k != "per_class"})
        picture = predictions_picture(self.eval_model(), self.val_set, self.device)
        if picture is not None:
            self.trackers.log_image(self.step, "val/predictions", picture)


def _no_flip(recipe: TransformRecipe):
    from dabdetr.data.transforms import make_train_transforms

    return make_train_transforms(recipe.scales, recipe.max_size, recipe.crop_resize,
                                 recipe.crop_size, hflip_prob=0.0)


def read_log(path: Path, record_type: str = "step") -> list[dict[str, Any]]:
    """The records of one type ("step" or "epoch") of a run's metrics.jsonl, in step order:
    empty if there is none. The file is appended to, so it may also hold the records a resumed
    run repeated after its checkpoint, or an earlier run's in the same folder: read from the
    end, only records whose step comes before the one after them are kept. A line that does not
    parse (a run killed mid-write, or one still writing) is skipped with a warning."""
    if not path.exists():
        return []
    records, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            bad += 1
            continue
        if (isinstance(record, dict) and record.get("type") == record_type
                and isinstance(record.get("step"), int)):
            records.append(record)
    if bad:
        logger.warning("%s: skipped %d unreadable line(s)", path, bad)
    kept: list[dict[str, Any]] = []
    for record in reversed(records):
        if not kept or record["step"] < kept[-1]["step"]:
            kept.append(record)
    return kept[::-1]


def plot_history(history: list[dict[str, Any]], path: Path,
                 steps: Sequence[dict[str, Any]] = ()) -> None:
    """Training losses and validation AP against images seen, as a PNG.

    `history`: the epoch records (their mean losses, and AP where evaluated); `steps`: the step
    records of metrics.jsonl, logged every `log_every` steps, which draw the losses densely
    where given. A run stopped by its time limit ends with a partial epoch: on the images-seen
    axis it is a point of its own rather than a second point at the same epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history and not steps:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = (("loss", "total (weighted, every layer)"), ("loss_ce", "class (focal)"),
             ("loss_bbox", "L1"), ("loss_giou", "GIoU"))
    for key, label in names:
        if steps:
            pts = [(r["images_seen"] / 1000, r[key]) for r in steps if key in r]
            style = {"linewidth": 1}
        else:
            pts = [(h["images_seen"] / 1000, h[f"train_{key}"]) for h in history
                   if f"train_{key}" in h]
            style = {"marker": "o"}
        if pts:
            ax1.plot(*zip(*pts, strict=True), label=label, **style)
    ax1.set_xlabel("thousand images seen")
    ax1.set_ylabel("training loss (parts: last decoder layer)")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3)
    ax1.legend()
    for key in ("AP", "AP50"):
        pts = [(h["images_seen"] / 1000, h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker="o", label=key)
            x, y = pts[-1]
            ax2.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax2.set_xlabel("thousand images seen")
    ax2.set_ylabel("validation COCO")
    ax2.set_xlim(left=0)
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig, resume: str | None = None, device: str | None = None
          ) -> dict[str, Any]:
    """Run a training job end to end; returns a summary dict (main process meaningful)."""
    trainer = Trainer(cfg, resume=resume, device=device)
    return trainer.fit()


# ----------------------------------------------------------------------------- CLI


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--data", default=d.data,
                   help="dataset folder: COCO (annotations/instances_{split}.json + images in "
                   "{split}/, {split}2017/ or images/{split}/), YOLO (data.yaml, or images/{split} "
                   "+ labels/{split}) or Pascal VOC (Annotations/, JPEGImages/, ImageSets/Main/)")
    p.add_argument("--format", choices=["auto", "coco", "yolo", "voc"], default=d.format,
                   help="dataset format; auto detects it and says which")
    p.add_argument("--train-json", default=None, help="COCO: the train split's annotation file")
    p.add_argument("--val-json", default=None, help="COCO: the val split's annotation file")
    p.add_argument("--images", default=None,
                   help="COCO: the folder the json files' file_name entries are relative to")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out the entries `dabdetr check-data` reports (missing images, bad "
                   "boxes, unknown classes ...) instead of stopping")
    p.add_argument("--log", default=d.log, metavar="TRACKERS",
                   help="also log to any of tensorboard,mlflow,wandb (comma separated; local "
                   "files under --out, offline)")
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


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune on a COCO-format dataset (torchrun-ready)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        summary = train(cfg, resume=args.resume, device=args.device)
    except TrainingDiverged as err:
        print(f"dabdetr train: stopped: {err}")
        return 3
    finally:
        dist.destroy()
    if dist.is_main_process():
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}, indent=1))
        if summary.get("last"):
            last = summary["last"]
            print(f"final: AP {last.get('AP', float('nan')):.4f}  AP50 "
                  f"{last.get('AP50', float('nan')):.4f}  -> {cfg.out}")
    return 0



"""The training loop: model, data, optimizer, evaluation and checkpoints of one run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dabdetr import distributed as dist
from dabdetr.data.coco import collate
from dabdetr.engine.checkpoint import (
    rank_rng,
    read_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from dabdetr.engine.config import TrainConfig
from dabdetr.engine.datasets import build_run_data
from dabdetr.engine.evaluate import config_with_categories, run_evaluation
from dabdetr.engine.evaluator import CocoEvaluator
from dabdetr.engine.preemption import StopRequest, TrainingInterrupted, ignore_ctrl_c
from dabdetr.engine.preview import predictions_picture
from dabdetr.engine.runlog import RunLog, plot_history, read_log
from dabdetr.engine.sampling import EpochSampler, SeededAugmentation
from dabdetr.engine.schedule import LrSchedule, build_optimizer
from dabdetr.engine.tracking import Trackers, open_trackers, parse_trackers
from dabdetr.errors import UnwritableError
from dabdetr.io_utils import atomic_path
from dabdetr.model_types import build_model, class_agnostic_proposals, model_type_of
from dabdetr.models.criterion import SetCriterion
from dabdetr.models.dab_detr import DabDetr
from dabdetr.models.matcher import HungarianMatcher
from dabdetr.precision import check_amp
from dabdetr.presets import preset_config

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good one."""


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


class Trainer:
    """Owns model, data, optimizer and checkpoints for one training run."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None,
                 device: str | None = None):
        self.cfg = cfg
        self.device = dist.init_from_env(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.out = Path(cfg.out)
        self.log = RunLog(self.out, write=dist.is_main_process())
        seed_everything(cfg.seed, cfg.deterministic)
        if cfg.lr_drop_time is not None and cfg.time_limit is None:
            raise ValueError(f"lr_drop_time={cfg.lr_drop_time} needs a time limit: it is the "
                             "fraction of --time-limit after which the lr drops")
        self.amp_dtype = check_amp(cfg.amp, self.device)  # None: float32

        parse_trackers(cfg.log)  # a wrong name or missing package fails before any work
        self.trackers = Trackers()  # opened by fit()
        recipe = cfg.recipe()
        train_tf = recipe.train_transforms(hflip=not cfg.no_flip)
        data = build_run_data(cfg, train_tf, recipe.eval_transforms())
        self.train_set, self.val_set, self.val_gt = data.train_set, data.val_set, data.val_gt
        self.categories = data.categories

        model_cfg = preset_config(cfg.model, **cfg.model_overrides)
        model_cfg = config_with_categories(model_cfg, self.categories)
        # the eval resize travels with the weights (checkpoints, saved models): predict/evaluate
        model_cfg = model_cfg.replace(eval_size=recipe.eval_size,
                                      eval_max_size=recipe.eval_max_size)
        self.model = build_model(model_cfg).to(self.device)
        if cfg.backbone_weights and not resume:  # a resumed run's weights are all in it
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
                                      enc_match_repeat=cfg.enc_match_repeat,
                                      enc_class_agnostic=class_agnostic_proposals(model_cfg))
        self.optimizer = build_optimizer(self.model, cfg)
        self.sampler = EpochSampler(len(self.train_set), True, cfg.seed, self.rank, self.world)
        self.seeded = SeededAugmentation(self.train_set, cfg.seed)
        # the training loader's own generator (it seeds the loader's workers), and its state
        # when the current epoch's loader drew from it: what a mid-epoch checkpoint saves
        self.loader_generator = torch.Generator().manual_seed(cfg.seed)
        self.loader_epoch_state = self.loader_generator.get_state()
        self.steps_per_epoch = max(1, -(-len(self.sampler) // (cfg.batch_size * cfg.accumulate)))
        drops = [e * self.steps_per_epoch for e in cfg.lr_drop]
        self.scheduler = LrSchedule(self.optimizer, cfg.warmup_steps, drops, cfg.lr_gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        self.ema = None
        self.time_limit = cfg.time_limit  # minutes; fit(time_limit=...) may set another
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
        ckpt = read_checkpoint(path)
        ours = self.model.config.to_dict()
        if ckpt["config"] != ours:
            differ = sorted(k for k in ours.keys() | ckpt["config"].keys()
                            if ours.get(k) != ckpt["config"].get(k))
            raise ValueError(
                f"{path} was trained with another model config; cannot resume (differs in: "
                + ", ".join(f"{k} {ckpt['config'].get(k)!r} there, {ours.get(k)!r} here"
                            for k in differ) + ")")
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
        rng = rank_rng(ckpt, self.rank)
        if rng is None:
            logger.warning("%s holds no random state for process %d: it continues with fresh "
                           "draws (not exactly as an uninterrupted run)", path, self.rank)
        elif "train_loader" in (generators := set_rng_state(rng, self.device)):
            self.loader_generator.set_state(generators["train_loader"])
            self.loader_epoch_state = generators["train_loader"]
        logger.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

    def eval_model(self) -> DabDetr:
        return self.ema.module if self.ema is not None else self.model

    # -- checkpoints
    def checkpoint(self, name: str) -> Path | None:
        """Write OUT/`name` (main process; every process must call it). A write that fails
        (read-only folder, full disk) is a warning naming the path: the previous file stays,
        the next checkpoint tries again, training goes on. Returns the path written, or None."""
        # mid-epoch, the loader generator's state before this epoch's loader drew: a resumed
        # run makes that loader again, which draws the same (its workers get the same seeds)
        loader_state = (self.loader_generator.get_state() if self.batch_in_epoch == 0
                        else self.loader_epoch_state)
        states = dist.all_gather_objects(rng_state(self.device, {"train_loader": loader_state}))
        if not dist.is_main_process():
            return None
        ckpt = {
            "model": self.model.state_dict(), "config": self.model.config.to_dict(),
            "model_type": model_type_of(self.model.config),
            "train_config": self.cfg.to_dict(), "categories": self.categories.to_json(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "best_ap": self.best_ap, "history": self.history, "images_seen": self.images_seen,
            "train_seconds": self.train_seconds, "rng": states,
        }
        path = self.out / name
        try:
            with atomic_path(path) as tmp:
                torch.save(ckpt, tmp)
        except UnwritableError as err:
            logger.warning("checkpoint not saved: %s. Training goes on; the previous %s (if "
                           "any) is kept and the next checkpoint tries again", err, name)
            return None
        return path

    # -- the loop
    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.cfg.batch_size)
        self.seeded.set_epoch(self.epoch)
        self.loader_epoch_state = self.loader_generator.get_state()
        return DataLoader(self.seeded, batch_size=self.cfg.batch_size, sampler=self.sampler,
                          collate_fn=collate, num_workers=self.cfg.num_workers,
                          persistent_workers=False, pin_memory=self.device.type == "cuda",
                          generator=self.loader_generator, worker_init_fn=ignore_ctrl_c)

    def _maybe_drop_lr_by_time(self, started: float) -> None:
        cfg = self.cfg
        if (cfg.lr_drop_time is None or self.time_limit is None
                or (time.time() - started) / 60 < cfg.lr_drop_time * self.time_limit):
            return
        if self.scheduler.drop():  # at once, not from the next step; saved in checkpoints
            logger.info("lr x %g after %.0f%% of the time limit (step %d)", cfg.lr_gamma,
                        100 * cfg.lr_drop_time, self.step)

    def _budget_left(self, started: float) -> bool:
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            return False
        if self.time_limit is not None and (time.time() - started) / 60 >= self.time_limit:
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

    def fit(self, time_limit: float | None = None) -> dict[str, Any]:
        """Train until cfg.epochs, cfg.max_steps or the time limit (minutes in all, default
        cfg.time_limit), evaluating and checkpointing at each epoch's end and at the stop, with
        `cfg.log`'s trackers open (main process). Returns the summary of `_fit`."""
        if dist.is_main_process():
            self.trackers = open_trackers(self.cfg.log, self.out, run_name=self.out.name)
            self.trackers.log_config(self.cfg.to_dict())
        try:
            return self._fit(time_limit)
        finally:
            self.trackers.close()

    def _fit(self, time_limit: float | None) -> dict[str, Any]:
        cfg = self.cfg
        if time_limit is not None:
            self.time_limit = time_limit
        started = time.time() - self.train_seconds
        if dist.is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
            ran = dataclasses.replace(cfg, time_limit=self.time_limit)
            (self.out / "train_config.json").write_text(json.dumps(ran.to_dict(), indent=2))
        logger.info("training %s (%.1f M params) on %d images, %d classes, %d step(s)/epoch, "
                    "device %s x %d", cfg.model, self.model.num_parameters() / 1e6,
                    len(self.train_set), self.categories.num_classes, self.steps_per_epoch,
                    self.device, self.world)
        with StopRequest() as stop:
            self._run_epochs(started, stop)
        summary = {"epochs": self.epoch, "steps": self.step, "images_seen": self.images_seen,
                   "minutes": self.train_seconds / 60, "best_AP": self.best_ap,
                   "skipped_images": self.skipped_images,
                   "last": self.history[-1] if self.history else None}
        if dist.is_main_process():
            plot_history(self.history, self.out / "curves.png", read_log(self.log.path))
        return summary

    def _stop_for_signal(self, stop: StopRequest, started: float) -> None:
        """When a signal asked every process to stop: write last.pt, raise
        TrainingInterrupted."""
        signum = stop.agreed(self.device)
        if signum is None:
            return
        self.train_seconds = time.time() - started
        self.checkpoint("last.pt")
        raise TrainingInterrupted(signum, str(self.out / "last.pt"))

    def _run_epochs(self, started: float, stop: StopRequest) -> None:
        cfg = self.cfg
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
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.log.append({"type": "step", "epoch": self.epoch, "step": self.step,
                               "images_seen": self.images_seen,
                               "minutes": (time.time() - started) / 60, "lr": lr, **losses})
                    self.trackers.log_metrics(
                        self.step, {"lr": lr, **{f"train/{k}": v for k, v in losses.items()}})
                self._maybe_drop_lr_by_time(started)
                self._stop_for_signal(stop, started)
                if not self._budget_left(started):
                    stopped_early = True
                    break
            bar.close()
            self.train_seconds = time.time() - started
            # a budget that ran out on an epoch's last batch still completed the epoch: counted
            # here, a resumed run does not log an empty end of that epoch again
            if not stopped_early or self.batch_in_epoch * cfg.batch_size >= len(self.sampler):
                self.epoch += 1
                self.batch_in_epoch = 0
            self.end_of_epoch(running, started, force_eval=stopped_early)
            self._stop_for_signal(stop, started)  # one that came while evaluating

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
        self.log.append(record)
        self.checkpoint("last.pt")

    def _track_evaluation(self, metrics: dict[str, Any]) -> None:
        """AP numbers and a predictions picture to the experiment trackers (main process)."""
        if self.trackers:
            scalars = {f"val/{k}": v for k, v in metrics.items() if k != "per_class"}
            self.trackers.log_metrics(self.step, scalars)
            picture = predictions_picture(self.eval_model(), self.val_set, self.device)
            if picture is not None:
                self.trackers.log_image(self.step, "val/predictions", picture)

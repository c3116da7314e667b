"""The optimizer (AdamW with a backbone parameter group) and the learning-rate schedule."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dabdetr.engine.config import TrainConfig


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
    """The learning rate of every parameter group, step by step: its base lr times a linear
    warm-up from 0.1% over `warmup_steps`, times `gamma` once per step of `drop_steps` passed,
    times `gamma` once more after `drop()` (a time-based drop, TrainConfig.lr_drop_time).

    Its whole state, `step` and `dropped`, is in `state_dict()`; every change of the rates goes
    through `step()`, `drop()` or `load_state_dict()`, which write them into the optimizer at
    once.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int,
                 drop_steps: list[int], gamma: float):
        self.optimizer = optimizer
        # "initial_lr", as torch's schedulers keep it: a schedule made again for an optimizer
        # that already trained starts from the same base
        self.base_lrs = [group.setdefault("initial_lr", group["lr"])
                         for group in optimizer.param_groups]
        self.warmup_steps, self.drop_steps, self.gamma = warmup_steps, list(drop_steps), gamma
        self.step_count, self.dropped = 0, False
        self._apply()

    def factor(self) -> float:
        """The current multiple of each group's base lr."""
        drops = sum(self.step_count >= s for s in self.drop_steps) + int(self.dropped)
        factor = self.gamma ** drops
        if self.warmup_steps and self.step_count < self.warmup_steps:
            factor *= 0.001 + 0.999 * self.step_count / self.warmup_steps
        return factor

    def step(self) -> None:
        """After an optimizer step: the rates of the next one."""
        self.step_count += 1
        self._apply()

    def drop(self) -> bool:
        """Multiply every lr by gamma from now on (once; False if it already had)."""
        if self.dropped:
            return False
        self.dropped = True
        self._apply()
        return True

    def state_dict(self) -> dict[str, int | bool]:
        return {"step": self.step_count, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        self.step_count, self.dropped = int(state["step"]), bool(state["dropped"])
        self._apply()

    def _apply(self) -> None:
        factor = self.factor()
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor

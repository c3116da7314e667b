"""The `train` command: the published recipe by default, on a COCO, YOLO or Pascal VOC
dataset, 1 CPU to N GPUs.

Single process: `dabdetr train --data DIR`. Several processes (DDP, nccl on GPUs, gloo on
CPU): `torchrun --nproc_per_node N -m dabdetr train --data DIR`. Every process reads torchrun's
environment through `dabdetr.distributed`; the model never asks for its rank.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dabdetr import distributed as dist
from dabdetr.engine.config import TrainConfig, add_train_arguments, given_values
from dabdetr.engine.preemption import TrainingInterrupted
from dabdetr.engine.resume import check_fresh_out, resume_path, resumed_config
from dabdetr.engine.trainer import Trainer, TrainingDiverged
from dabdetr.errors import UserError


def train(cfg: TrainConfig, resume: str | None = None, device: str | None = None
          ) -> dict[str, Any]:
    """Run a training job end to end; returns a summary dict (main process meaningful)."""
    trainer = Trainer(cfg, resume=resume, device=device)
    return trainer.fit()


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune on a COCO, YOLO or VOC dataset (torchrun-ready)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue a run exactly from its last.pt (or best.pt), with the model, "
                   "recipe and data settings stored in it; 'auto': OUT/last.pt when it exists, "
                   "else a fresh start (for restarts under a scheduler or torchrun)")
    p.add_argument("--force", action="store_true",
                   help="start a new run in an --out that holds another run")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                   "available); under torchrun each process takes cuda:LOCAL_RANK")
    p.set_defaults(func=_cmd_train)


def config_and_checkpoint(args: argparse.Namespace) -> tuple[TrainConfig, str | None]:
    """The TrainConfig and checkpoint (None: a fresh run) of parsed `train` arguments."""
    given = given_values(args)
    ckpt = resume_path(args.resume, given.get("out", TrainConfig.out))
    if ckpt is not None:
        cfg = resumed_config(ckpt, given, out_given="out" in given)
        if Path(cfg.out).resolve() != ckpt.parent.resolve():
            check_fresh_out(cfg.out, args.force)
        return cfg, str(ckpt)
    if "data" not in given:
        raise UserError("--data is required for a new run (or --resume PATH to continue one)")
    cfg = TrainConfig(**given)
    if args.resume != "auto":  # auto: a job's restart before its first checkpoint starts anew
        check_fresh_out(cfg.out, args.force)
    return cfg, None


def _cmd_train(args: argparse.Namespace) -> int:
    cfg, ckpt = config_and_checkpoint(args)
    try:
        summary = train(cfg, resume=ckpt, device=args.device)
    except TrainingDiverged as err:
        print(f"dabdetr train: stopped: {err}")
        return 3
    except TrainingInterrupted as err:
        if dist.is_main_process():
            print(f"dabdetr train: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        dist.destroy()
    if dist.is_main_process():
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}, indent=1))
        if summary.get("last"):
            last = summary["last"]
            print(f"final: AP {last.get('AP', float('nan')):.4f}  AP50 "
                  f"{last.get('AP50', float('nan')):.4f}  -> {cfg.out}")
    return 0


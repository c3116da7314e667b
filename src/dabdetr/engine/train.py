"""The `train` command: the published recipe by default, on a COCO, YOLO or Pascal VOC
dataset, 1 CPU to N GPUs.

Single process: `dabdetr train --data DIR`. Several processes (DDP, nccl on GPUs, gloo on
CPU): `torchrun --nproc_per_node N -m dabdetr train --data DIR`. Every process reads torchrun's
environment through `dabdetr.distributed`; the model never asks for its rank.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dabdetr import distributed as dist
from dabdetr.engine.config import TrainConfig, add_train_arguments, config_from_args
from dabdetr.engine.trainer import Trainer, TrainingDiverged


def train(cfg: TrainConfig, resume: str | None = None, device: str | None = None
          ) -> dict[str, Any]:
    """Run a training job end to end; returns a summary dict (main process meaningful)."""
    trainer = Trainer(cfg, resume=resume, device=device)
    return trainer.fit()


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune on a COCO, YOLO or VOC dataset (torchrun-ready)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--resume", default=None,
                   help="a last.pt/best.pt of this run to continue exactly")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                   "available); under torchrun each process takes cuda:LOCAL_RANK")
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


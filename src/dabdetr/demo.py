"""`dabdetr demo`: generate the synthetic benchmark, train from scratch on this machine for a
bounded time, evaluate COCO AP, and draw what the model detects."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from dabdetr.argtypes import non_negative_int, positive_float, positive_int
from dabdetr.errors import UserError

logger = logging.getLogger(__name__)

# The fast-convergence recipe (each entry is a `dabdetr train` switch; the measurements behind
# every choice are summarized in benchmarks/README.md; benchmarks/convergence.py reruns them).
DEMO_RECIPE: dict[str, Any] = {
    "model": "cpu-small",  # ResNet-18 cut after layer2, trainable BatchNorm, hidden 128, 2+3
    # layers, 20 queries from query selection (two_stage)
    "model_overrides": {},
    "batch_size": 8,  # twice the steps of batch 16 per image: on a 2-core AMD EPYC, four
    # seeds ended at AP50 0.514-0.600 (mean 0.555), against 0.458-0.556 (mean 0.524, one seed
    # under 0.5) with batch 16 (2-core AMD EPYC, 2026-11-27)
    "lr": 1e-3,  # 10x the published lr, for everything (backbone trained from scratch)
    "lr_backbone": 1e-3,
    "warmup_steps": 100,
    "clip_max_norm": 1.0,
    "image_size": 128,
    "no_multi_scale": True,  # train at the 128 px the images have (multi-scale shrinks objects)
    "no_crop": True,
    "cls_loss_coef": 8.0,  # focal-loss weight 8 instead of the published 1: AP ~0.23 after
    # 8,000 images against 0.13-0.18 with weight 2 (2-core AMD EPYC, 2026-11-27); the
    # matching cost of the class stays 2
    "lr_drop_time": 0.8,  # lr x 0.1 for the last fifth of the training time
}

DEMO_DATA = {"num_train": 4000, "num_val": 200, "seed": 12345, "difficulty": "standard",
             "image_size": 128}
RESERVE_SECONDS = 20  # final evaluation, drawing and saving (about 8 s here)


def loader_workers(device_type: str, cpus: int | None = None) -> int:
    """Data-loading worker processes for the demo: one, or none (loading in the training
    process) when it trains on a CPU with two cores or fewer. There a worker process takes
    cores from the training threads, which then wait for each other at parallel steps. On a
    2-core AMD EPYC, demo steps (30-60 a run, alternating) ran 0.97x-1.11x as fast without the
    worker, median 1.05x, in six pairs with OMP_WAIT_POLICY=PASSIVE, and 0.92x-1.20x, median
    1.09x, in ten pairs under OpenMP's default (2-core AMD EPYC, 2026-11-27). Hosts with more
    cores keep the worker (not measured)."""
    from dabdetr.data.synthetic import available_cpus

    cpus = available_cpus() if cpus is None else cpus
    return 0 if device_type == "cpu" and cpus <= 2 else 1


class DemoError(UserError):
    """A demo argument or --out folder the user must change."""


def _check_out_dir(out: Path, resume: bool, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} exists and is not a directory")
    previous = out / "train" / "last.pt"
    if out.exists() and any(out.iterdir()):
        if previous.exists() and not (resume or force):
            raise DemoError(
                f"{out} holds a previous demo run ({previous}); pass --resume to continue it, "
                "--force to start over (its checkpoint is replaced), or choose another --out")
        known = {"data", "train", "demo.json", "predictions.png", "curves.png", "model"}
        unknown = sorted(p.name for p in out.iterdir() if p.name not in known)
        if unknown and not force:
            raise DemoError(f"{out} is not empty and does not look like a demo run (found "
                            f"{unknown[:5]}); choose an empty or new --out, or pass --force")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise DemoError(f"cannot write to --out {out}: {err.strerror or err}") from None


def run_demo(out: str | os.PathLike = "demo_out", minutes: float = 10.0,
             preset: str | None = None, seed: int = 0, backbone_weights: str | None = None,
             resume: bool = False, force: bool = False, device: str | None = None,
             num_train: int | None = None, num_val: int | None = None,
             max_steps: int | None = None, progress: bool = True,
             recipe_overrides: dict[str, Any] | None = None,
             generation_workers: int = 1) -> dict[str, Any]:
    """Run the demo; returns the summary written to `out/demo.json`. `generation_workers`:
    processes that make the dataset when it is absent (`dabdetr demo` passes
    `synthetic.default_workers()`; more than one needs a script's `__main__` guard, as
    `generate_dataset` says)."""
    from dabdetr.data.synthetic import dataset_matches, generate_dataset
    from dabdetr.distributed import resolve_device
    from dabdetr.engine.config import TrainConfig
    from dabdetr.engine.trainer import Trainer

    started = time.time()
    out = Path(out)
    _check_out_dir(out, resume, force)
    data = out / "data"
    data_args = dict(DEMO_DATA)
    if num_train is not None:
        data_args["num_train"] = num_train
    if num_val is not None:
        data_args["num_val"] = num_val
    if dataset_matches(data, **data_args):
        logger.info("reusing the synthetic dataset in %s", data)
    else:
        generate_dataset(data, progress=progress, workers=generation_workers, **data_args)
    recipe = dict(DEMO_RECIPE)
    if preset:
        recipe["model"] = preset
    last = out / "train" / "last.pt"
    resuming = resume and last.exists()
    recipe.update(recipe_overrides or {})

    def budget_minutes() -> float:  # what is left of --minutes for training
        return (minutes * 60 - (time.time() - started) - RESERVE_SECONDS) / 60

    if budget_minutes() <= 0 and max_steps is None:
        raise DemoError(f"--minutes {minutes} leaves no time to train after data generation")
    cfg = TrainConfig(data=str(data), out=str(out / "train"), epochs=10_000,
                      time_limit=max(budget_minutes(), 0.05), max_steps=max_steps, seed=seed,
                      lr_drop=[], eval_every=1, backbone_weights=backbone_weights,
                      num_workers=loader_workers(resolve_device(device).type),
                      progress=progress, eval_batch_size=16, **recipe)
    trainer = Trainer(cfg, resume=str(last) if resuming else None, device=device)
    # the budget again, now that set-up is done; a resumed demo gets a fresh one on top of the
    # time already trained
    summary = trainer.fit(time_limit=max(budget_minutes(), 0.05) + trainer.train_seconds / 60)
    if backbone_weights:
        started_from = f"torchvision backbone weights {backbone_weights}, then trained live"
    elif resuming:
        started_from = f"the previous run in {out} (resumed), trained live"
    else:
        started_from = "random initialization (trained live from scratch)"
    return finish_demo(trainer, out, started, summary, started_from, resuming)


def finish_demo(trainer, out: Path, started: float, summary: dict[str, Any],
                started_from: str, resumed: bool) -> dict[str, Any]:
    """Write the drawings, curves, metrics JSON and model; return the summary."""
    import shutil

    from dabdetr.weights.loading import save_model

    model = trainer.eval_model()
    draw_grid(model, trainer.val_set, out / "predictions.png", device=trainer.device)
    curves = out / "train" / "curves.png"
    if curves.exists():
        shutil.copyfile(curves, out / "curves.png")
    save_model(model, out / "model", extra={"train_config": {**trainer.cfg.to_dict(),
                                                      "time_limit": trainer.time_limit}})
    last = trainer.history[-1] if trainer.history else {}
    result = {
        "AP": last.get("AP"), "AP50": last.get("AP50"), "AP75": last.get("AP75"),
        "train_minutes": summary["minutes"], "total_minutes": (time.time() - started) / 60,
        "images_seen": summary["images_seen"], "steps": summary["steps"],
        "started_from": started_from,
        "resumed": resumed,
        "files": {"predictions": str(out / "predictions.png"), "curves": str(out / "curves.png"),
                  "metrics": str(out / "demo.json"), "model": str(out / "model"),
                  "checkpoint": str(out / "train" / "last.pt"),
                  "log": str(out / "train" / "metrics.jsonl")},
        "history": trainer.history,
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    return result


def draw_grid(model, dataset, path: Path, device, count: int = 12, threshold: float = 0.3,
              at_least: int = 3, scale: int = 3) -> None:
    """Draw detections on the first `count` validation images, enlarged `scale` times: every
    box scoring >= threshold, and at least the `at_least` best ones (with their scores), so a
    model that is not yet confident still shows what it predicts. For the picture only, boxes
    overlapping a better one by IoU > 0.7 (a query's second-best class, near-duplicate queries)
    are left out; the evaluation sees every detection."""
    import torch
    from torchvision.ops import nms
    from torchvision.transforms.v2.functional import to_pil_image

    from dabdetr.postprocessing import postprocess
    from dabdetr.visualize import draw_detections, image_grid, to_uint8_image

    pictures = []
    model.eval()
    with torch.inference_mode():
        for index in range(min(count, len(dataset))):
            item = dataset[index]
            if item is None:
                continue
            image, _ = item
            out = model(image[None].to(device))
            h, w = image.shape[-2:]
            res = postprocess(out, [[h, w]], num_select=100)[0]
            kept = nms(res["boxes"].float(), res["scores"].float(), 0.7)  # best first
            scores = res["scores"][kept]
            kept = kept[:max(int((scores >= threshold).sum()), at_least)]
            labels = res["labels"][kept].tolist()
            names = [model.config.label_name(i) for i in labels]
            canvas = to_pil_image(to_uint8_image(image)).resize((w * scale, h * scale))
            pictures.append(draw_detections(canvas, res["boxes"][kept] * scale, labels, names,
                                            res["scores"][kept], width=2))
    image_grid(pictures, columns=4).save(path)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train DAB-DETR from scratch on synthetic shapes, evaluate "
                       "and draw, in minutes on a CPU",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--minutes", type=positive_float, default=10.0,
                   help="total time budget, data generation and evaluation included")
    p.add_argument("--preset", default=None, help=f"model preset (default {DEMO_RECIPE['model']})")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--backbone-weights", default=None,
                   help="torchvision ResNet-18 state dict (ImageNet weights converge much faster)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="replace a previous run in --out")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--train-images", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--val-images", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-steps", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from dabdetr.data.synthetic import default_workers

    result = run_demo(args.out, args.minutes, args.preset, args.seed, args.backbone_weights,
                      args.resume, args.force, args.device, args.train_images, args.val_images,
                      args.max_steps, progress=not args.no_progress,
                      generation_workers=default_workers())
    files = result["files"]
    ap = result["AP"] if result["AP"] is not None else float("nan")
    ap50 = result["AP50"] if result["AP50"] is not None else float("nan")
    print(f"\nDAB-DETR demo: AP {ap:.3f}  AP50 {ap50:.3f} on {DEMO_DATA['num_val']} held-out "
          f"synthetic images after {result['train_minutes']:.1f} min of training "
          f"({result['images_seen']:,} images seen, {result['total_minutes']:.1f} min in all)")
    print(f"started from: {result['started_from']}")
    print(f"predictions: {files['predictions']}\ncurves:      {files['curves']}\n"
          f"metrics:     {files['metrics']}\nmodel:       {files['model']}  (dabdetr predict "
          f"IMAGES --weights {files['model']})")
    return 0

"""`dabdetr demo`: generate the synthetic benchmark, train on this machine for a bounded time,
evaluate COCO AP, and draw what the model detects.

By default the demo starts from the bundled checkpoint (`dabdetr/assets/demo_start/`, trained
by `dabdetr train` on this same benchmark; its command and log are in that folder) and goes on
training live; `--from-scratch` trains from random initialization instead. Either way it trains,
evaluates and draws live, and its summary says where it started."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The fast-convergence recipe (each entry is a `dabdetr train` switch; the measurements behind
# every choice are in benchmarks/RESULTS.md, produced by benchmarks/convergence.py).
DEMO_RECIPE: dict[str, Any] = {
    "model": "cpu-small",  # ResNet-18 cut after layer2, trainable BatchNorm, hidden 128, 2+3
    # layers, 20 queries from query selection (two_stage)
    "model_overrides": {},
    "batch_size": 16,
    "lr": 1e-3,  # 10x the published lr, for everything (backbone trained from scratch)
    "lr_backbone": 1e-3,
    "warmup_steps": 100,
    "clip_max_norm": 1.0,
    "image_size": 128,
    "no_multi_scale": True,  # train at the 128 px the images have (multi-scale shrinks objects)
    "no_crop": True,
    "match_repeat": 3,  # one-to-many matching on the auxiliary decoder layers
    "cls_loss_coef": 2.0,  # classification weight (and matching cost) 2 instead of the
    "set_cost_class": 2.0,  # published 1, as in Deformable DETR
    "lr_drop_time": 0.8,  # lr x 0.1 for the last fifth of the training time
}
# Continuing from the bundled checkpoint: its schedule ended at lr 1e-4 (after the drop), so the
# live part goes on at that rate, without warm-up.
BUNDLED_RECIPE: dict[str, Any] = {"lr": 1e-4, "lr_backbone": 1e-4, "warmup_steps": 0}
BUNDLED_START = Path(__file__).resolve().parent / "assets" / "demo_start"
DEMO_DATA = {"num_train": 4000, "num_val": 200, "seed": 12345, "difficulty": "standard",
             "image_size": 128}
RESERVE_SECONDS = 15  # final evaluation, drawing and saving (about 8 s here)


class DemoError(ValueError):
    pass


def bundled_start_available(preset: str) -> bool:
    """True when the bundled starting checkpoint exists and has this preset's architecture."""
    from dabdetr.presets import PRESETS

    config_file = BUNDLED_START / "config.json"
    if preset not in PRESETS or not (BUNDLED_START / "model.safetensors").is_file() \
            or not config_file.is_file():
        return False
    bundled = json.loads(config_file.read_text()).get("config", {})
    return all(bundled.get(key) == value for key, value in PRESETS[preset].items())


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
             from_scratch: bool = False) -> dict[str, Any]:
    """Run the demo; returns the summary written to `out/demo.json`.

    Starts from the bundled checkpoint when it exists for the preset, unless `from_scratch`,
    `backbone_weights` or `resume` say otherwise."""
    from dabdetr.data.synthetic import dataset_matches, generate_dataset
    from dabdetr.engine.train import TrainConfig, Trainer

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
        generate_dataset(data, progress=progress, **data_args)
    recipe = dict(DEMO_RECIPE)
    if preset:
        recipe["model"] = preset
    last = out / "train" / "last.pt"
    resuming = resume and last.exists()
    start = None
    if not (from_scratch or backbone_weights or resuming) and bundled_start_available(
            recipe["model"]):
        start = BUNDLED_START
        recipe.update(BUNDLED_RECIPE)
    recipe.update(recipe_overrides or {})
    budget = minutes * 60 - (time.time() - started) - RESERVE_SECONDS
    if budget <= 0 and max_steps is None:
        raise DemoError(f"--minutes {minutes} leaves no time to train after data generation")
    cfg = TrainConfig(data=str(data), out=str(out / "train"), epochs=10_000,
                      time_limit=max(budget, 0.05 * 60) / 60, max_steps=max_steps, seed=seed,
                      lr_drop=[], eval_every=1, backbone_weights=backbone_weights,
                      weights=str(start) if start else None,
                      num_workers=1, progress=progress, eval_batch_size=16, **recipe)
    trainer = Trainer(cfg, resume=str(last) if resuming else None, device=device)
    start_metrics = None
    if start is not None:
        start_metrics = _evaluate(trainer)
        logger.info("bundled checkpoint before live training: AP %.3f AP50 %.3f",
                    start_metrics["AP"], start_metrics["AP50"])
    # the training budget is what is left of --minutes after set-up (and the first evaluation)
    budget = minutes * 60 - (time.time() - started) - RESERVE_SECONDS
    cfg.time_limit = max(budget, 0.05 * 60) / 60
    if resuming:
        # a resumed demo gets a fresh time budget on top of the time already trained
        cfg.time_limit += trainer.train_seconds / 60
    summary = trainer.fit()
    if start is not None:
        started_from = (f"the bundled checkpoint {start} (trained by `dabdetr train` on this "
                        f"benchmark; AP {start_metrics['AP']:.3f} / AP50 "
                        f"{start_metrics['AP50']:.3f} before this run), then trained live")
    elif backbone_weights:
        started_from = f"torchvision backbone weights {backbone_weights}, then trained live"
    elif resuming:
        started_from = f"the previous run in {out} (resumed), trained live"
    else:
        started_from = "random initialization (trained live from scratch)"
    return finish_demo(trainer, out, started, summary, started_from, resuming, start_metrics)


def _evaluate(trainer) -> dict[str, Any]:
    """COCO metrics of the trainer's current model on its validation split."""
    from dabdetr.engine.evaluate import run_evaluation
    from dabdetr.engine.evaluator import CocoEvaluator

    cfg = trainer.cfg
    metrics = run_evaluation(trainer.eval_model(), trainer.val_set,
                             CocoEvaluator(trainer.val_gt, trainer.categories), trainer.device,
                             cfg.eval_batch_size, cfg.num_workers, cfg.num_select, cfg.progress)
    trainer.model.train()
    return {k: v for k, v in metrics.items() if k != "per_class"}


def finish_demo(trainer, out: Path, started: float, summary: dict[str, Any],
                started_from: str, resumed: bool,
                start_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the drawings, curves, metrics JSON and model; return the summary."""
    import shutil

    from dabdetr.weights.loading import save_model

    model = trainer.eval_model()
    draw_grid(model, trainer.val_set, out / "predictions.png", device=trainer.device)
    curves = out / "train" / "curves.png"
    if curves.exists():
        shutil.copyfile(curves, out / "curves.png")
    save_model(model, out / "model", extra={"train_config": trainer.cfg.to_dict()})
    last = trainer.history[-1] if trainer.history else {}
    result = {
        "AP": last.get("AP"), "AP50": last.get("AP50"), "AP75": last.get("AP75"),
        "train_minutes": summary["minutes"], "total_minutes": (time.time() - started) / 60,
        "images_seen": summary["images_seen"], "steps": summary["steps"],
        "started_from": started_from,
        "start_metrics": start_metrics,
        "resumed": resumed,
        "files": {"predictions": str(out / "predictions.png"), "curves": str(out / "curves.png"),
                  "metrics": str(out / "demo.json"), "model": str(out / "model"),
                  "checkpoint": str(out / "train" / "last.pt"),
                  "log": str(out / "train" / "metrics.jsonl")},
        "history": trainer.history,
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    return result


def draw_grid(model, dataset, path: Path, device, count: int = 12, threshold: float = 0.4,
              at_least: int = 3) -> None:
    """Draw detections on the first `count` validation images: every box scoring >= threshold,
    and at least the `at_least` best ones (with their scores), so a model that is not yet
    confident still shows what it predicts."""
    import torch

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
            keep = max(int((res["scores"] >= threshold).sum()), at_least)
            labels = res["labels"][:keep].tolist()
            names = [model.config.label_name(i) for i in labels]
            drawn = draw_detections(to_uint8_image(image), res["boxes"][:keep], labels, names,
                                    res["scores"][:keep], width=1)
            pictures.append(drawn.resize((w * 2, h * 2)))
    image_grid(pictures, columns=4).save(path)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train DAB-DETR on synthetic shapes, evaluate and draw, in "
                       "minutes on a CPU",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="total time budget, data generation and evaluation included")
    p.add_argument("--preset", default=None, help=f"model preset (default {DEMO_RECIPE['model']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone-weights", default=None,
                   help="torchvision ResNet-18 state dict (ImageNet weights converge much faster)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train from random initialization instead of the bundled checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="replace a previous run in --out")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--train-images", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--val-images", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    result = run_demo(args.out, args.minutes, args.preset, args.seed, args.backbone_weights,
                      args.resume, args.force, args.device, args.train_images, args.val_images,
                      args.max_steps, progress=not args.no_progress,
                      from_scratch=args.from_scratch)
    files = result["files"]
    ap = result["AP"] if result["AP"] is not None else float("nan")
    ap50 = result["AP50"] if result["AP50"] is not None else float("nan")
    print(f"\nDAB-DETR demo: AP {ap:.3f}  AP50 {ap50:.3f} on {DEMO_DATA['num_val']} held-out "
          f"synthetic images after {result['train_minutes']:.1f} min of training "
          f"({result['images_seen']:,} images seen, {result['total_minutes']:.1f} min in all)")
    print(f"started from: {result['started_from']}")
    if result["start_metrics"] is None and result["AP"] is not None and result["AP"] < 0.25:
        print("(from scratch, ten minutes on two CPU cores are not enough for this benchmark: "
              "see benchmarks/RESULTS.md for the curves)")
    print(f"predictions: {files['predictions']}\ncurves:      {files['curves']}\n"
          f"metrics:     {files['metrics']}\nmodel:       {files['model']}  (dabdetr predict "
          f"IMAGES --weights {files['model']})")
    return 0

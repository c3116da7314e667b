"""COCO evaluation of a model on a dataset split (single process or under torchrun)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dabdetr import distributed as dist
from dabdetr.argtypes import non_negative_int, positive_int
from dabdetr.config import DabDetrConfig, resolve_eval_resize
from dabdetr.data.categories import CategoryMap
from dabdetr.data.check import load_checked
from dabdetr.data.coco import CocoDetection, collate
from dabdetr.data.formats import FORMAT_CHOICES, open_dataset
from dabdetr.data.transforms import make_eval_transforms
from dabdetr.engine.evaluator import CocoEvaluator, format_table, load_coco_gt
from dabdetr.engine.sampling import EpochSampler
from dabdetr.errors import UserError
from dabdetr.io_utils import atomic_write, check_writable_target
from dabdetr.models.dab_detr import DabDetr
from dabdetr.postprocessing import postprocess, resolve_num_select

if TYPE_CHECKING:
    from dabdetr.runtime import OnnxDetector

logger = logging.getLogger(__name__)


def category_map_of(config: DabDetrConfig) -> CategoryMap | None:
    """The category map a model was trained with (None: the authors' COCO id layout)."""
    if config.class_to_category is None:
        if config.num_classes == 91 and not config.id2label:
            return CategoryMap.coco()
        names = {i: config.label_name(i) for i in config.id2label}
        return CategoryMap.coco91(names) if names else None
    names = {cat: config.label_name(i) for i, cat in enumerate(config.class_to_category)}
    return CategoryMap.contiguous(names)


def config_with_categories(config: DabDetrConfig, categories: CategoryMap) -> DabDetrConfig:
    """Store a dataset's category map in a model config (plain data)."""
    names = {i: categories.name(i) for i in range(categories.num_classes)}
    id2label = {i: n for i, n in names.items() if n is not None}
    mapping = None
    if categories.layout == "contiguous":
        mapping = [categories.class_to_category(i) for i in range(categories.num_classes)]
    return config.replace(num_classes=categories.num_classes, id2label=id2label,
                          class_to_category=mapping)


@torch.no_grad()
def run_evaluation(model: DabDetr | OnnxDetector, dataset: CocoDetection, evaluator: CocoEvaluator,
                   device: torch.device, batch_size: int = 1, num_workers: int = 0,
                   num_select: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Detect on every image of `dataset` (sharded over processes), then COCO-evaluate.

    Post-processing keeps the top `num_select` (query, class) pairs per image with boxes in
    original-image pixels, as the authors' evaluation (None: their top-k for the model's
    family, `dabdetr.postprocessing.default_num_select`). Returns the evaluator's metrics on
    every process. Draws nothing from the global random generators: the loader (which seeds
    its workers) has a generator of its own, so evaluating in the middle of a training run
    leaves the run's dropout and denoising draws as they were.
    """
    sampler = EpochSampler(len(dataset), shuffle=False, rank=dist.get_rank(),
                           world_size=dist.get_world_size())
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=num_workers, generator=torch.Generator().manual_seed(0))
    was_training = isinstance(model, torch.nn.Module) and model.training
    top_k = resolve_num_select(num_select, model.config)
    model.eval()
    evaluator.reset()
    for batch in tqdm(loader, desc="evaluate", unit="batch",
                      disable=not (progress and dist.is_main_process())):
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        outputs = model(batch.images, batch.mask)
        sizes = torch.stack([t["orig_size"] for t in batch.targets])
        results = postprocess(outputs, sizes, num_select=top_k)
        evaluator.update([t["image_id"] for t in batch.targets], results)
    evaluator.synchronize()
    if was_training:
        model.train()
    return evaluator.evaluate()


def category_mismatch(model: CategoryMap, dataset: dict[int, str]) -> list[str]:
    """One line per kind of mismatch between the categories a model predicts and a dataset's
    (`dataset`: category id -> name): ids the model cannot predict, names that differ."""
    unknown = sorted(i for i in dataset if not model.has_category(i))
    renamed = sorted((i, model.name(model.category_to_class(i)), name)
                     for i, name in dataset.items()
                     if model.has_category(i) and model.name(model.category_to_class(i)) not in
                     (None, name))
    lines = []
    if unknown:
        shown = ", ".join(f"{i} {dataset[i]!r}" for i in unknown[:8]) + (
            " ..." if len(unknown) > 8 else "")
        lines.append(f"the dataset has {len(unknown)} of {len(dataset)} categories the model "
                     f"cannot predict ({shown}): their objects count as missed")
    if renamed:
        shown = ", ".join(f"{i} {a!r} in the model, {b!r} in the dataset"
                          for i, a, b in renamed[:5]) + (" ..." if len(renamed) > 5 else "")
        lines.append(f"{len(renamed)} category id(s) are named differently ({shown}): is this "
                     "the dataset the model was trained for?")
    return lines


def warn_category_mismatch(model: CategoryMap, coco: dict[str, Any]) -> None:
    """Log `category_mismatch` of a model's map and a COCO-style dataset's categories."""
    cats = coco.get("categories", [])
    for line in category_mismatch(model, {c["id"]: c["name"] for c in cats}):
        logger.warning("%s", line)


def evaluate_weights(weights: str, data: str, split: str = "val", batch_size: int = 1,
                     device: str | None = None, eval_size: int | None = None,
                     max_size: int | None = None,
                     num_select: int | None = None, num_workers: int = 2, out: str | None = None,
                     progress: bool = True, optimize: str = "none", format: str = "auto",
                     ann_json: str | None = None, images: str | None = None,
                     skip_bad: bool = False, backend: str = "pytorch") -> dict[str, Any]:
    """Load weights, evaluate on `data`/`split`, optionally write results JSON + metrics.
    eval_size/max_size: the resize; None takes the model's own (`resolve_eval_resize`).
    optimize: one of `dabdetr.optimize.OPTIMIZE_CHOICES` (see `dabdetr.optimize.optimized`).
    format: "auto", "coco", "yolo" or "voc" (`dabdetr.data.formats`); ann_json / images: COCO
    annotation file of `split` and the folder its file names are relative to; skip_bad: leave
    out entries with problems (`dabdetr.data.check`) instead of stopping. backend
    "onnxruntime": `weights` is an ONNX file from `dabdetr export`, run on the CPU in one
    process (no `optimize`, no `device` but the CPU)."""
    model, dev = _evaluated_model(weights, device, optimize, backend)
    reader = open_dataset(data, format, {split: ann_json}, images)
    checked = load_checked(reader, split, skip_bad)
    categories = category_map_of(model.config)
    size, cap = resolve_eval_resize(model.config, eval_size, max_size)
    logger.info("evaluating at short side %d, long side at most %s", size, cap)
    dataset = CocoDetection(checked.image_root, checked.coco, make_eval_transforms(size, cap),
                            category_map=categories, source=checked.source)
    if dataset.category_map.num_classes != model.config.num_classes:
        raise ValueError(f"the model predicts {model.config.num_classes} classes but the dataset "
                         f"maps to {dataset.category_map.num_classes}")
    if categories is not None:
        warn_category_mismatch(categories, checked.coco)
    evaluator = CocoEvaluator(load_coco_gt(checked.coco), dataset.category_map)
    metrics = run_evaluation(model, dataset, evaluator, dev, batch_size, num_workers,
                             num_select, progress)
    if out and dist.is_main_process():
        out_dir = Path(out)
        evaluator.save_results(out_dir / "detections.json")
        atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _evaluated_model(weights: str, device: str | None, optimize: str, backend: str):
    """(model, device): the PyTorch model (optimized as asked) or an ONNX Runtime detector."""
    if backend == "onnxruntime":
        if dist.get_world_size() > 1:
            raise UserError("--backend onnxruntime evaluates in one process: run it without "
                            "torchrun")
        from dabdetr.runtime import open_onnx_backend

        used = {"--optimize": optimize != "none", "--device": device not in (None, "cpu")}
        return open_onnx_backend(weights, used), torch.device("cpu")
    if backend != "pytorch":
        raise ValueError(f"unknown backend {backend!r}; choose pytorch or onnxruntime")
    from dabdetr.optimize import optimized
    from dabdetr.weights.loading import load_model

    dev = dist.init_from_env(device)
    return optimized(load_model(weights, device=str(dev)), optimize), dev


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="COCO box AP of weights on a COCO, YOLO or VOC dataset",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", required=True, help="any source load_model accepts")
    p.add_argument("--backend", choices=["pytorch", "onnxruntime"], default="pytorch",
                   help="onnxruntime: --weights is an ONNX file from `dabdetr export` (CPU)")
    p.add_argument("--data", default=None,
                   help="dataset folder: COCO, YOLO or Pascal VOC layout (see `train --help`)")
    p.add_argument("--split", default="val")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="auto",
                   help="dataset format; auto detects it and says which")
    p.add_argument("--val-json", default=None,
                   help="COCO: the annotation file of the evaluated split")
    p.add_argument("--images", default=None,
                   help="COCO: the folder the json's file_name entries are relative to")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out entries with problems instead of stopping")
    p.add_argument("--batch-size", type=positive_int, default=1, help="per process")
    p.add_argument("--device", default=None)
    p.add_argument("--eval-size", "--size", type=positive_int, default=None,
                   help="short side (default: the size the model was trained and evaluated at, "
                   "stored with it; 800 for published weights)")
    p.add_argument("--max-size", type=non_negative_int, default=None,
                   help="long side cap, 0 for none (default: the model's, scaled with --size)")
    p.add_argument("--num-select", type=positive_int, default=None,
                   help="top-k detections per image (None: the authors' 300 for DAB-DETR, "
                   "100 for DAB-Deformable-DETR)")
    p.add_argument("--num-workers", type=non_negative_int, default=2)
    p.add_argument("--out", default=None, help="write detections.json and metrics.json here")
    p.add_argument("--force", action="store_true", help="replace the results in --out")
    from dabdetr.optimize import add_cli_argument

    add_cli_argument(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.out:
        for name in ("detections.json", "metrics.json"):
            check_writable_target(Path(args.out) / name, args.force)
    metrics = evaluate_weights(args.weights, args.data, args.split, args.batch_size,
                               args.device, args.eval_size, args.max_size, args.num_select,
                               args.num_workers, args.out, optimize=args.optimize,
                               format=args.format, ann_json=args.val_json, images=args.images,
                               skip_bad=args.skip_bad, backend=args.backend)
    if dist.is_main_process():
        print(" ".join(f"{k}={metrics[k]:.4f}" for k in ("AP", "AP50", "AP75", "APs", "APm",
                                                        "APl")))
        print(format_table(metrics))
    dist.destroy()
    return 0

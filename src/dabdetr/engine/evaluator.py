"""COCO box evaluation with pycocotools, across processes.

Flow: ``update`` per batch with the post-processed detections (absolute xyxy in original
image pixels, class indices) -> ``synchronize`` (gathers every process's detections) ->
``evaluate`` (COCOeval on the images seen) -> metrics dict; ``save_results`` writes the COCO
results JSON (main process only).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from ..data.categories import CategoryMap
from ..distributed import all_gather_objects, is_main_process

logger = logging.getLogger(__name__)

__all__ = ["METRIC_NAMES", "CocoEvaluator", "format_table", "load_coco_gt"]

# Names of COCOeval.stats, in order.
METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip

Metrics = dict[str, Any]  # METRIC_NAMES -> float, plus "per_class": {name: float}


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """pycocotools prints progress to stdout; keep it out of logs unless asked."""
    if verbose:
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def load_coco_gt(ann_file: str | os.PathLike[str] | Mapping[str, Any],
                 verbose: bool = False) -> COCO:
    """pycocotools' COCO object for an annotation file, or for its content as a dict (any
    `dabdetr.data.formats` split's ``coco``; copied, so the caller's dict stays as it is),
    without its prints."""
    with _quiet(verbose):
        if isinstance(ann_file, Mapping):
            coco = COCO()
            coco.dataset = copy.deepcopy(dict(ann_file))
            coco.createIndex()
            return coco
        return COCO(str(ann_file))


class CocoEvaluator:
    """Accumulates detections and computes COCO box AP/AR with pycocotools.

    Args:
        coco_gt: ground truth (e.g. `load_coco_gt(ann_file)`).
        category_map: maps the model's class indices to the dataset's category ids. Class
            indices no category uses (coco91 layout) cannot match any ground truth and are
            left out.
        verbose: let pycocotools print its progress and summary.

    Only the images passed to `update` are evaluated (a subset evaluation measures that
    subset); an image updated with zero detections counts, with all its objects missed.
    """

    def __init__(self, coco_gt: COCO, category_map: CategoryMap, verbose: bool = False) -> None:
        self.coco_gt = coco_gt
        self.category_map = category_map
        self.verbose = verbose
        self._gt_image_ids = set(coco_gt.getImgIds())
        gt_categories = set(coco_gt.getCatIds())
        mapped = {c for c in category_map.category_ids if c is not None}
        if not gt_categories & mapped:
            raise ValueError(
                f"the category map's ids {sorted(mapped)[:20]} share none with the ground "
                f"truth's {sorted(gt_categories)[:20]}: wrong category map for this dataset?"
            )
        if mapped - gt_categories:
            logger.info(
                "%d categories of the model are not in the ground truth; their detections "
                "are ignored by COCOeval",
                len(mapped - gt_categories),
            )
        # class index -> category id, -1 for class indices no category uses
        self._category_of_class = np.array(
            [-1 if c is None else c for c in category_map.category_ids], dtype=np.int64
        )
        # image id -> [K, 6] float64 rows (x, y, w, h, score, category_id)
        self._detections: dict[int, np.ndarray] = {}

    def reset(self) -> None:
        self._detections = {}

    @property
    def image_ids(self) -> list[int]:
        """Sorted ids of the images with results (after `synchronize`: on any process)."""
        return sorted(self._detections)

    def update(
        self, image_ids: Sequence[int] | Tensor, results: Sequence[Mapping[str, Tensor]]
    ) -> None:
        """Add the detections of a batch.

        Args:
            image_ids: B dataset image ids.
            results: B dicts (what post-processing returns): ``"scores"`` [K] float,
                ``"labels"`` [K] int64 class indices, ``"boxes"`` [K, 4] absolute xyxy in
                original image pixels (the image file's frame).

        An image already seen keeps its first results (DistributedSampler repeats images to
        even out shards).
        """
        if isinstance(image_ids, Tensor):
            image_ids = image_ids.tolist()
        if len(image_ids) != len(results):
            raise ValueError(
                f"got {len(image_ids)} image ids but {len(results)} results; one per image"
            )
        for image_id, result in zip(image_ids, results, strict=True):
            image_id = int(image_id)
            if image_id not in self._gt_image_ids:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            if image_id not in self._detections:
                self._detections[image_id] = self._to_rows(image_id, result)

    def _to_rows(self, image_id: int, result: Mapping[str, Tensor]) -> np.ndarray:
        missing = {"scores", "labels", "boxes"} - set(result)
        if missing:
            raise ValueError(f"image {image_id}: result lacks {sorted(missing)}")
        # float64 so the xywh arithmetic matches COCO results made from the same boxes
        scores = torch.as_tensor(result["scores"]).detach().cpu().to(torch.float64).numpy()
        labels = torch.as_tensor(result["labels"]).detach().cpu().to(torch.int64).numpy()
        boxes = torch.as_tensor(result["boxes"]).detach().cpu().to(torch.float64).numpy()
        k = scores.shape[0]
        if scores.shape != (k,) or labels.shape != (k,) or boxes.shape != (k, 4):
            raise ValueError(
                f"image {image_id}: expected scores [K], labels [K], boxes [K, 4]; got "
                f"{scores.shape}, {labels.shape}, {boxes.shape}"
            )
        if k and (labels.min() < 0 or labels.max() >= len(self._category_of_class)):
            raise ValueError(
                f"image {image_id}: labels must be class indices in "
                f"[0, {len(self._category_of_class)}), got {labels.min()}..{labels.max()}"
            )
        categories = self._category_of_class[labels]
        keep = categories >= 0
        x1, y1, x2, y2 = boxes[keep].T
        return np.stack(
            [x1, y1, x2 - x1, y2 - y1, scores[keep], categories[keep].astype(np.float64)], axis=1
        ).reshape(-1, 6)

    def synchronize(self) -> None:
        """Gather every process's detections into every process (no-op in one process).

        Images evaluated on several processes are kept once.
        """
        merged: dict[int, np.ndarray] = {}
        for detections in all_gather_objects(self._detections):
            for image_id, rows in detections.items():
                merged.setdefault(image_id, rows)
        self._detections = merged

    def coco_results(self) -> list[dict[str, Any]]:
        """Detections in the COCO results format (``bbox`` is absolute [x, y, w, h])."""
        results = []
        for image_id in self.image_ids:
            for x, y, w, h, score, category_id in self._detections[image_id].tolist():
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(category_id),
                        "bbox": [x, y, w, h],
                        "score": score,
                    }
                )
        return results

    def evaluate(self) -> Metrics:
        """COCO box metrics of the images updated so far (call `synchronize` first under DDP).

        Returns:
            ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
            "ARm", "ARl": float in [0, 1], "per_class": {category name: AP}}``. As in
            pycocotools, a number whose ground truth is empty (e.g. APs on a dataset with no
            small objects, or a class absent from the evaluated images) is -1. No detections at
            all give 0 wherever there is ground truth. If no image was ever updated, every
            number is 0 (with a warning).
        """
        image_ids = self.image_ids
        if not image_ids:
            logger.warning("CocoEvaluator.evaluate() before any update(): reporting zeros")
            metrics: Metrics = dict.fromkeys(METRIC_NAMES, 0.0)
            metrics["per_class"] = dict.fromkeys(self._class_names().values(), 0.0)
            return metrics
        with _quiet(self.verbose):
            coco_dt = self._load_results()
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        metrics = {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats, strict=True)}
        metrics["per_class"] = self._per_class_ap(coco_eval)
        return metrics

    def _load_results(self) -> COCO:
        results = self.coco_results()
        if results:
            return self.coco_gt.loadRes(results)
        # loadRes fails on an empty list; an empty results set evaluates fine.
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": list(self.coco_gt.dataset["images"]),
            "categories": copy.deepcopy(self.coco_gt.dataset["categories"]),
            "annotations": [],
        }
        coco_dt.createIndex()
        return coco_dt

    def _class_names(self) -> dict[int, str]:
        """Ground-truth category id -> display name (unique, from the annotation file)."""
        names = {cat_id: cat["name"] for cat_id, cat in self.coco_gt.cats.items()}
        counts = {}
        for name in names.values():
            counts[name] = counts.get(name, 0) + 1
        return {
            cat_id: name if counts[name] == 1 else f"{name} ({cat_id})"
            for cat_id, name in sorted(names.items())
        }

    def _per_class_ap(self, coco_eval: COCOeval) -> dict[str, float]:
        # precision: [T iou thresholds, R recall points, K categories, A areas, M max dets];
        # area "all" is index 0, maxDets 100 the last index, as in COCOeval.summarize.
        precision = coco_eval.eval["precision"]
        names = self._class_names()
        per_class = {}
        for k, cat_id in enumerate(coco_eval.params.catIds):
            values = precision[:, :, k, 0, -1]
            values = values[values > -1]
            per_class[names[cat_id]] = float(values.mean()) if values.size else -1.0
        return per_class

    def save_results(self, path: str | os.PathLike[str]) -> None:
        """Write the COCO results JSON (`coco_results`) on the main process; others do nothing."""
        if not is_main_process():
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.coco_results(), f)


def format_table(metrics: Metrics, columns: int = 3) -> str:
    """The per-class AP of `CocoEvaluator.evaluate` as a text table (AP in percent).

    Classes with no ground truth (AP -1) show "n/a".
    """
    per_class = metrics.get("per_class")
    if not isinstance(per_class, Mapping) or not per_class:
        raise ValueError("metrics have no 'per_class' entries; pass CocoEvaluator.evaluate()")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    cells = [(name, "n/a" if ap < 0 else f"{100 * ap:.1f}") for name, ap in per_class.items()]
    name_w = max(len("category"), *(len(n) for n, _ in cells))
    ap_w = max(len("AP"), *(len(v) for _, v in cells))

    def row(pairs: Sequence[tuple[str, str]]) -> str:
        return " | ".join(f"{n:<{name_w}} {v:>{ap_w}}" for n, v in pairs).rstrip()

    header = row([("category", "AP")] * min(columns, len(cells)))
    lines = [header, "-" * len(header)]
    lines += [row(cells[i : i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join(lines)

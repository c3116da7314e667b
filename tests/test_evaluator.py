"""CocoEvaluator against pycocotools run directly on the same detections."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dabdetr.data.categories import CategoryMap
from dabdetr.engine import evaluator as evaluator_module
from dabdetr.engine.evaluator import METRIC_NAMES, CocoEvaluator, format_table, load_coco_gt

CATEGORIES = [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}, {"id": 42, "name": "answer"}]
WIDTH, HEIGHT = 640, 480


def _random_gt(seed: int = 0, num_images: int = 15) -> COCO:
    """Random boxes of every COCO size range, a few crowd regions, one image with no objects."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        image_id = 100 + 3 * i  # ids need not be contiguous
        images.append({"id": image_id, "file_name": f"{i}.jpg", "width": WIDTH, "height": HEIGHT})
        for _ in range(0 if i == 0 else int(rng.integers(1, 7))):
            side = rng.choice([rng.uniform(4, 30), rng.uniform(35, 90), rng.uniform(100, 300)])
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice([3, 7, 42])),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.05),
                }
            )
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _detections(
    coco: COCO, cmap: CategoryMap, seed: int = 1, noise: float = 0.05
) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
    """Jittered copies of most objects, some with a wrong class, plus false positives.

    Boxes are float64 absolute xyxy, labels class indices (what post-processing returns).
    """
    rng = np.random.default_rng(seed)
    image_ids, results = [], []
    for image_id in coco.getImgIds():
        boxes, labels, scores = [], [], []
        for ann in coco.imgToAnns[image_id]:
            if rng.random() < 0.2:
                continue  # missed
            x, y, w, h = ann["bbox"]
            dx, dy, dw, dh = rng.normal(0, noise, 4) * [w, h, w, h]
            boxes.append([x + dx, y + dy, x + dx + w + dw, y + dy + h + dh])
            category = ann["category_id"] if rng.random() < 0.9 else int(rng.choice([3, 7, 42]))
            labels.append(cmap.category_to_class(category))
            scores.append(rng.random())
        for _ in range(int(rng.integers(0, 4))):  # false positives
            x, y = rng.uniform(0, WIDTH - 50), rng.uniform(0, HEIGHT - 50)
            boxes.append([x, y, x + rng.uniform(5, 50), y + rng.uniform(5, 50)])
            labels.append(cmap.category_to_class(int(rng.choice([3, 7, 42]))))
            scores.append(rng.random())
        image_ids.append(image_id)
        results.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "scores": torch.tensor(scores, dtype=torch.float64),
            }
        )
    return image_ids, results


def _pycocotools_direct(
    coco: COCO, cmap: CategoryMap, image_ids: list[int], results: list[dict]
) -> COCOeval:
    dets = []
    for image_id, result in zip(image_ids, results, strict=True):
        for (x1, y1, x2, y2), label, score in zip(
            result["boxes"].tolist(),
            result["labels"].tolist(),
            result["scores"].tolist(),
            strict=True,
        ):
            dets.append(
                {
                    "image_id": image_id,
                    "category_id": cmap.class_to_category(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(dets), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


@pytest.fixture(scope="module")
def gt() -> COCO:
    return _random_gt()


@pytest.mark.parametrize("layout", ["contiguous", "coco91"])
def test_matches_pycocotools_exactly(gt: COCO, layout: str) -> None:
    cmap = CategoryMap.from_coco_json_categories(CATEGORIES, layout)
    image_ids, results = _detections(gt, cmap)
    reference = _pycocotools_direct(gt, cmap, image_ids, results)

    evaluator = CocoEvaluator(gt, cmap)
    for start in range(0, len(image_ids), 4):  # in batches, as an evaluation loop does
        evaluator.update(image_ids[start : start + 4], results[start : start + 4])
    evaluator.synchronize()
    metrics = evaluator.evaluate()

    assert [metrics[name] for name in METRIC_NAMES] == reference.stats.tolist()
    assert 0.2 < metrics["AP"] < 0.95  # a meaningful, not a degenerate, comparison
    assert min(metrics[name] for name in METRIC_NAMES) > 0  # every size range is populated
    precision = reference.eval["precision"][:, :, :, 0, -1]
    for k, name in enumerate(["dog", "cat", "answer"]):  # catIds sorted: 3, 7, 42
        values = precision[:, :, k]
        assert metrics["per_class"][name] == values[values > -1].mean()


def test_unused_coco91_classes_are_ignored(gt: COCO) -> None:
    cmap = CategoryMap.from_coco_json_categories(CATEGORIES, "coco91")
    image_ids, results = _detections(gt, cmap)
    plain = CocoEvaluator(gt, cmap)
    plain.update(image_ids, results)
    noisy = CocoEvaluator(gt, cmap)
    for result in results:  # add confident detections on class indices with no category
        result["boxes"] = torch.cat([result["boxes"], torch.tensor([[0.0, 0.0, 50.0, 50.0]] * 2)])
        result["labels"] = torch.cat([result["labels"], torch.tensor([0, 5])])
        result["scores"] = torch.cat([result["scores"], torch.tensor([0.99, 0.99])])
    noisy.update(image_ids, results)
    assert noisy.evaluate() == plain.evaluate()


def test_perfect_detections_give_ap_one(gt: COCO) -> None:
    cmap = CategoryMap.contiguous({c["id"]: c["name"] for c in CATEGORIES})
    evaluator = CocoEvaluator(gt, cmap)
    for image_id in gt.getImgIds():
        anns = [a for a in gt.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([cmap.category_to_class(a["category_id"]) for a in anns])
        evaluator.update(
            [image_id], [{"boxes": boxes, "labels": labels, "scores": torch.ones(len(anns))}]
        )
    metrics = evaluator.evaluate()
    for name in METRIC_NAMES:
        if name != "AR1":  # one detection per image cannot recall several objects
            assert metrics[name] == pytest.approx(1.0), name
    assert metrics["per_class"] == pytest.approx({"dog": 1.0, "cat": 1.0, "answer": 1.0})


def test_empty_detections_give_zeros(gt: COCO, caplog: pytest.LogCaptureFixture) -> None:
    cmap = CategoryMap.contiguous({c["id"]: c["name"] for c in CATEGORIES})
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
    }
    evaluator = CocoEvaluator(gt, cmap)
    evaluator.update(gt.getImgIds(), [empty] * len(gt.getImgIds()))
    metrics = evaluator.evaluate()
    assert all(metrics[name] == 0.0 for name in METRIC_NAMES)
    assert metrics["per_class"] == {"dog": 0.0, "cat": 0.0, "answer": 0.0}
    assert evaluator.coco_results() == []

    with caplog.at_level(logging.WARNING):
        never_updated = CocoEvaluator(gt, cmap).evaluate()
    assert all(never_updated[name] == 0.0 for name in METRIC_NAMES)
    assert "before any update" in caplog.text


def test_synchronize_merges_processes_and_dedups(gt: COCO, monkeypatch) -> None:
    cmap = CategoryMap.contiguous({c["id"]: c["name"] for c in CATEGORIES})
    image_ids, results = _detections(gt, cmap)
    whole = CocoEvaluator(gt, cmap)
    whole.update(image_ids, results)

    # two "processes"; DistributedSampler padding evaluates the first image on both
    rank0, rank1 = CocoEvaluator(gt, cmap), CocoEvaluator(gt, cmap)
    rank0.update(image_ids[::2], results[::2])
    rank1.update(image_ids[1::2] + image_ids[:1], results[1::2] + results[:1])
    rank1_state = copy.deepcopy(rank1._detections)
    monkeypatch.setattr(evaluator_module, "all_gather_objects", lambda obj: [obj, rank1_state])
    rank0.synchronize()
    assert rank0.image_ids == sorted(image_ids)
    assert rank0.evaluate() == whole.evaluate()


def test_subset_evaluation_uses_updated_images_only(gt: COCO) -> None:
    cmap = CategoryMap.contiguous({c["id"]: c["name"] for c in CATEGORIES})
    image_ids, results = _detections(gt, cmap)
    evaluator = CocoEvaluator(gt, cmap)
    evaluator.update(image_ids[:5], results[:5])
    metrics = evaluator.evaluate()
    with contextlib.redirect_stdout(io.StringIO()):
        reference = _pycocotools_direct(gt, cmap, image_ids[:5], results[:5])
        reference.params.imgIds = image_ids[:5]
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert [metrics[name] for name in METRIC_NAMES] == reference.stats.tolist()


def test_save_results_and_table(gt: COCO, tmp_path: Path, monkeypatch) -> None:
    cmap = CategoryMap.contiguous({c["id"]: c["name"] for c in CATEGORIES})
    image_ids, results = _detections(gt, cmap)
    evaluator = CocoEvaluator(gt, cmap)
    evaluator.update(image_ids, results)
    path = tmp_path / "out" / "results.json"
    evaluator.save_results(path)
    saved = json.loads(path.read_text())
    assert len(saved) == sum(len(r["scores"]) for r in results)
    assert set(saved[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {d["category_id"] for d in saved} <= {3, 7, 42}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.loadRes(str(path))  # a valid COCO results file

    monkeypatch.setattr(evaluator_module, "is_main_process", lambda: False)
    evaluator.save_results(tmp_path / "not_main.json")
    assert not (tmp_path / "not_main.json").exists()

    metrics = evaluator.evaluate()
    table = format_table(metrics)
    for name in ("dog", "cat", "answer", "category", "AP"):
        assert name in table
    assert f"{100 * metrics['per_class']['cat']:.1f}" in table
    assert "n/a" in format_table({"per_class": {"ghost": -1.0}})
    with pytest.raises(ValueError, match="per_class"):
        format_table({"AP": 0.5})


def test_bad_input(gt: COCO, tmp_path: Path) -> None:
    cmap = CategoryMap.contiguous({c["id"]: c["name"] for c in CATEGORIES})
    evaluator = CocoEvaluator(gt, cmap)
    result = {"boxes": torch.zeros(1, 4), "labels": torch.tensor([0]), "scores": torch.ones(1)}
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluator.update([123456], [result])
    with pytest.raises(ValueError, match="one per image"):
        evaluator.update([100, 103], [result])
    with pytest.raises(ValueError, match="class indices"):
        evaluator.update([100], [{**result, "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match="boxes"):
        evaluator.update([100], [{**result, "boxes": torch.zeros(1, 5)}])
    with pytest.raises(ValueError, match="share none"):
        CocoEvaluator(gt, CategoryMap.contiguous({1: "person"}))

    ann_file = tmp_path / "gt.json"
    ann_file.write_text(json.dumps(gt.dataset))
    assert sorted(load_coco_gt(ann_file).getImgIds()) == sorted(gt.getImgIds())

"""A training run's datasets from any dataset format: read, checked, wrapped for training and
evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from pycocotools.coco import COCO

from dabdetr.data.categories import CategoryMap
from dabdetr.data.check import load_checked
from dabdetr.data.coco import CocoDetection, Transforms
from dabdetr.data.formats import open_dataset
from dabdetr.engine.config import TrainConfig
from dabdetr.engine.evaluator import load_coco_gt

__all__ = ["RunData", "build_run_data"]


@dataclass
class RunData:
    """The train and val splits of a run, and the val ground truth for pycocotools."""

    train_set: CocoDetection
    val_set: CocoDetection
    val_gt: COCO

    @property
    def categories(self) -> CategoryMap:
        return self.train_set.category_map


def build_run_data(cfg: TrainConfig, train_tf: Transforms, eval_tf: Transforms) -> RunData:
    """Read `cfg.train_split` and `cfg.val_split` in `cfg.format` (`dabdetr.data.formats`),
    check them (`dabdetr.data.check.load_checked`: stop on problems, or leave the bad entries
    out under `cfg.skip_bad`) and wrap them with the given transforms; the val split uses the
    train split's category map.

    Raises:
        ValueError: no dataset, an unknown layout, or (`DataProblems`) a split with problems.
    """
    reader = open_dataset(cfg.data, cfg.format,
                          {cfg.train_split: cfg.train_json, cfg.val_split: cfg.val_json},
                          cfg.images)
    train = load_checked(reader, cfg.train_split, cfg.skip_bad)
    val = (train if cfg.val_split == cfg.train_split
           else load_checked(reader, cfg.val_split, cfg.skip_bad))
    train_set = CocoDetection(train.image_root, train.coco, train_tf, layout=cfg.layout,
                              source=train.source)
    val_set = CocoDetection(val.image_root, val.coco, eval_tf,
                            category_map=train_set.category_map, source=val.source)
    return RunData(train_set, val_set, load_coco_gt(val.coco))

"""COCO json datasets: reading a split into a `DatasetSplit`, and writing one.

Layouts read:

- ``DIR/annotations/instances_{split}.json`` with images in ``DIR/{split}``,
  ``DIR/{split}2017``, ``DIR/images/{split}`` or ``DIR/images/{split}2017``
  (`dabdetr.data.coco.resolve_split`);
- ``DIR/{split}/_annotations.coco.json`` with the images beside it (what several labelling
  services export);
- explicit files: ``split_files={"train": PATH, "val": PATH}`` and ``images=DIR`` (the folder
  every ``file_name`` is relative to; default: the split's images folder in the dataset folder
  or in the folder above the json, as above, else the json's own folder).

The json is parsed with the standard library; its entries are validated by
`dabdetr.data.check`, which names each bad entry.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..coco import read_coco_json, resolve_split
from .base import DatasetSplit

__all__ = ["CocoReader", "looks_like_coco", "write_coco"]

_EXPORT_NAME = "_annotations.coco.json"


def looks_like_coco(root: Path) -> bool:
    """Whether ``root`` holds COCO annotation files in a layout `CocoReader` reads."""
    return bool(list((root / "annotations").glob("instances_*.json"))
                or list(root.glob(f"*/{_EXPORT_NAME}")))


class CocoReader:
    """A COCO-format dataset folder (or explicit annotation files).

    Args:
        root: dataset folder (may be None when every split's file is given).
        split_files: split name -> annotation json, overriding the folder layout.
        images: folder the images' ``file_name`` entries are relative to, for every split.
    """

    format = "coco"

    def __init__(self, root: str | os.PathLike[str] | None,
                 split_files: Mapping[str, str | os.PathLike[str]] | None = None,
                 images: str | os.PathLike[str] | None = None) -> None:
        self.split_files = {k: Path(v) for k, v in (split_files or {}).items() if v}
        self.folder = Path(root) if root else None  # None: only the explicit files
        if self.folder is None and not self.split_files:
            raise ValueError("no COCO dataset given: pass --data DIR or --train-json/--val-json")
        self.root = self.folder or next(iter(self.split_files.values())).parent
        self.images = Path(images) if images else None
        if self.images is not None and not self.images.is_dir():
            raise ValueError(f"--images {self.images} is not a folder")

    def splits(self) -> list[str]:
        found = set(self.split_files)
        if self.folder is not None:
            found.update(p.stem[len("instances_"):]
                         for p in (self.folder / "annotations").glob("instances_*.json"))
            found.update(p.parent.name for p in self.folder.glob(f"*/{_EXPORT_NAME}"))
        return sorted(found)

    def _locate(self, split: str) -> tuple[Path, Path]:
        """(annotation file, images folder) of a split."""
        if split in self.split_files:
            ann = self.split_files[split]
            if self.images is not None:
                return ann, self.images
            # the dataset folder's layout, else the one the json sits in, else its own folder
            for root in filter(None, (self.folder, ann.parent.parent)):
                try:
                    return ann, resolve_split(root, split)[0]
                except ValueError:
                    continue
            return ann, ann.parent
        if self.folder is None:
            raise ValueError(f"no annotation file for split {split!r}: pass --data DIR or the "
                             f"split's json (given: {', '.join(self.split_files)})")
        export = self.folder / split / _EXPORT_NAME
        if export.is_file():
            return export, self.images or export.parent
        images_dir, ann = resolve_split(self.folder, split)
        return ann, self.images or images_dir

    def load(self, split: str) -> DatasetSplit:
        ann_file, image_root = self._locate(split)
        data = read_coco_json(ann_file)
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{ann_file}: '{key}' must be a list of objects, got "
                                 f"{type(data.get(key)).__name__}")
        coco = {"images": data["images"], "annotations": data["annotations"],
                "categories": data["categories"]}
        return DatasetSplit("coco", split, coco, image_root, ann_file)


def _copy_images(split: DatasetSplit, dst_dir: Path) -> None:
    for img in split.coco["images"]:
        target = dst_dir / img["file_name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(split.image_root / img["file_name"], target)


def write_coco(splits: Mapping[str, DatasetSplit], dst: Path) -> list[Path]:
    """Write ``DST/annotations/instances_{split}.json`` and the images to ``DST/{split}/``.

    Returns the annotation files written. ``dst`` must be empty or new (checked by the caller).
    """
    written = []
    (dst / "annotations").mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        _copy_images(split, dst / name)
        ann_file = dst / "annotations" / f"instances_{name}.json"
        data: dict[str, Any] = {"images": split.coco["images"],
                                "annotations": split.coco["annotations"],
                                "categories": split.coco["categories"]}
        ann_file.write_text(json.dumps(data), encoding="utf-8")
        written.append(ann_file)
    return written

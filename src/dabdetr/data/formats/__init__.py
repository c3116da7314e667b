"""Dataset formats: COCO json, YOLO txt and Pascal VOC xml, each read into COCO form.

`open_dataset(DIR, "auto")` finds which format a folder holds and returns its reader;
``reader.load(split)`` gives a `DatasetSplit` (an in-memory COCO dict and its image folder),
which `dabdetr.data.check.check_split` validates and `CocoDetection` / pycocotools read.
`write_dataset` writes checked splits in any of the three formats (`dabdetr convert-data`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from .base import FORMATS, DatasetReader, DatasetSplit, Problem, read_image_size
from .coco import CocoReader, looks_like_coco, write_coco
from .voc import VocReader, looks_like_voc, write_voc
from .yolo import YoloReader, looks_like_yolo, write_yolo

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "FORMAT_CHOICES",
    "DatasetReader",
    "DatasetSplit",
    "Problem",
    "detect_format",
    "open_dataset",
    "read_image_size",
    "write_dataset",
]

FORMAT_CHOICES: tuple[str, ...] = ("auto", *FORMATS)

_SIGNS = {
    "coco": "annotations/instances_*.json or */_annotations.coco.json",
    "yolo": "data.yaml, or images/ and labels/ folders",
    "voc": "Annotations/ with JPEGImages/ or ImageSets/",
}


def detect_format(root: str | os.PathLike[str]) -> str:
    """"coco", "yolo" or "voc": the one format whose layout ``root`` holds.

    Raises:
        ValueError: if ``root`` does not exist, holds none of the layouts, or several.
    """
    path = Path(root)
    if not path.exists():
        raise ValueError(f"dataset {path} does not exist")
    found = [name for name, looks in (("coco", looks_like_coco), ("yolo", looks_like_yolo),
                                      ("voc", looks_like_voc)) if looks(path)]
    if len(found) == 1:
        return found[0]
    signs = "; ".join(f"{k}: {v}" for k, v in _SIGNS.items())
    if not found:
        raise ValueError(f"{path}: no known dataset layout (looked for {signs}); pass "
                         "--format or fix the layout")
    raise ValueError(f"{path} looks like several formats ({', '.join(found)}); pass --format "
                     f"{'|'.join(found)}")


def open_dataset(root: str | os.PathLike[str] | None, format: str = "auto",
                 split_files: Mapping[str, str | os.PathLike[str] | None] | None = None,
                 images: str | os.PathLike[str] | None = None) -> DatasetReader:
    """The reader of a dataset folder.

    Args:
        root: the dataset folder (for YOLO also its yaml file); may be empty for COCO when
            ``split_files`` names every split's json.
        format: "auto" (detect, and log what was found), "coco", "yolo" or "voc".
        split_files: COCO only: split name -> annotation json (``--train-json/--val-json``).
        images: COCO only: the folder the json's ``file_name`` entries are relative to.
    """
    if format not in FORMAT_CHOICES:
        raise ValueError(f"unknown dataset format {format!r}; use one of "
                         f"{', '.join(FORMAT_CHOICES)}")
    explicit = {k: v for k, v in (split_files or {}).items() if v}
    if (explicit or images) and format not in ("auto", "coco"):
        raise ValueError("--train-json/--val-json/--images are for COCO json datasets; "
                         f"drop them for --format {format}")
    if format == "auto":
        if explicit and not root:
            format = "coco"
        else:
            if not root:
                raise ValueError("no dataset given: pass --data DIR")
            format = "coco" if explicit or images else detect_format(root)
            logger.info("dataset %s: %s format (auto-detected)", root, format)
    if format == "coco":
        return CocoReader(root, explicit, images)
    if not root or not Path(root).exists():
        raise ValueError(f"dataset {root} does not exist")
    return YoloReader(root) if format == "yolo" else VocReader(root)


_WRITERS = {"coco": write_coco, "yolo": write_yolo, "voc": write_voc}


def write_dataset(splits: Mapping[str, DatasetSplit], dst: str | os.PathLike[str],
                  to: str) -> list[Path]:
    """Write checked splits (complete image sizes, valid entries) as ``to`` into ``dst``.

    ``dst`` must not exist or be an empty folder: nothing is overwritten. Every split must
    have the same categories. Returns the annotation files written (lists, yaml, jsons).
    """
    if to not in _WRITERS:
        raise ValueError(f"unknown output format {to!r}; use one of {', '.join(FORMATS)}")
    if not splits:
        raise ValueError("no splits to write")
    out = Path(dst)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; pick a new output folder "
                         "(nothing is overwritten)")
    first = sorted((c["id"], c["name"]) for c in next(iter(splits.values())).coco["categories"])
    for name, split in splits.items():
        if sorted((c["id"], c["name"]) for c in split.coco["categories"]) != first:
            raise ValueError(f"split {name!r} has other categories than the first split; "
                             "convert the splits separately")
    # written beside, then moved into place: a failed conversion leaves nothing half-written
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        written = _WRITERS[to](splits, partial)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return [out / p.relative_to(partial) for p in written]

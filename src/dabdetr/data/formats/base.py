"""What every dataset reader produces: a split as an in-memory COCO dict, plus its problems.

A reader turns one split of a dataset folder (COCO json, YOLO txt, Pascal VOC xml) into a
`DatasetSplit`: a COCO-style dict (``images``, ``annotations``, ``categories``; boxes absolute
[x, y, w, h] in image pixels) and the folder its ``file_name`` entries are relative to. Training
(`CocoDetection`) and evaluation (pycocotools) read that dict, so they work the same for every
format. Whatever a reader could not turn into an entry is a `Problem` naming the file (and the
line, for line-based files); `dabdetr.data.check` adds the checks common to all formats.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "DatasetReader",
    "DatasetSplit",
    "Problem",
    "read_image_size",
]

FORMATS: tuple[str, ...] = ("coco", "yolo", "voc")

# Image file suffixes the folder readers list (lower case).
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)

# Problem kinds, in the order `check-data` explains them.
PROBLEM_KINDS: tuple[str, ...] = (
    "malformed",  # a file or entry that does not parse (bad line, bad xml, wrong JSON types)
    "missing_image",  # an annotated image whose file does not exist
    "unreadable_image",  # an image file that PIL cannot open
    "box_outside_image",  # a box reaching more than `OUTSIDE_TOLERANCE` px past the image
    "degenerate_box",  # zero or negative width/height, or not finite
    "unknown_class",  # a class id / category id / name not in the class list
    "unknown_image",  # a COCO annotation whose image_id is not in 'images'
    "duplicate_id",  # a repeated image id or annotation id
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a dataset, where a user can find it.

    Attributes:
        kind: one of `PROBLEM_KINDS`.
        file: the file to open (annotation file, label file or image).
        line: 1-based line in ``file`` (YOLO label files), else None.
        message: what is wrong, in words.
    """

    kind: str
    file: str
    line: int | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.file, "line": self.line, "message": self.message}

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class DatasetSplit:
    """One split of a dataset in COCO form.

    Attributes:
        format: "coco", "yolo" or "voc" (what it was read from).
        split: the split's name ("train", "val", ...).
        coco: ``{"images": [{"id", "file_name", "width", "height"}], "annotations": [{"id",
            "image_id", "category_id", "bbox": [x, y, w, h] absolute pixels, "area",
            "iscrowd"}], "categories": [{"id", "name"}]}``. VOC ``difficult`` objects have
            ``iscrowd=1`` (ignored by COCO evaluation, not training targets).
        image_root: folder the images' ``file_name`` entries are relative to.
        source: the annotation file or folder the split came from (for messages).
        problems: what the reader could not read (each entry left out of ``coco``).
        image_origin: image id -> the file holding its annotations (label txt, xml).
        ann_origin: annotation id -> (file, 1-based line or None).
        images_checked: the reader already opened every image (missing and unreadable ones
            are in ``problems`` and out of ``coco``; sizes come from the files).
    """

    format: str
    split: str
    coco: dict[str, Any]
    image_root: Path
    source: Path
    problems: list[Problem] = field(default_factory=list)
    image_origin: dict[int, str] = field(default_factory=dict)
    ann_origin: dict[int, tuple[str, int | None]] = field(default_factory=dict)
    images_checked: bool = False

    @property
    def category_names(self) -> dict[int, str]:
        """Category id -> name."""
        return {c["id"]: c["name"] for c in self.coco["categories"]}


class DatasetReader(Protocol):
    """A dataset folder in one format; `load` reads one split."""

    format: str
    root: Path

    def splits(self) -> list[str]:
        """The split names this folder holds, e.g. ["train", "val"]."""
        ...

    def load(self, split: str) -> DatasetSplit:
        """Read one split; ValueError naming what was looked for if it is not there."""
        ...


_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_EXIF_ORIENTATION = 0x0112


def read_image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of an image as viewers show it (EXIF rotation applied), from its header.

    Only the header is read, not the pixels. Raises OSError (PIL's UnidentifiedImageError
    included) if the file is missing or not an image.
    """
    with Image.open(path) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION)
        except Exception:  # a broken EXIF block: the stored frame it is
            orientation = None
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height

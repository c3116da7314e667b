"""Dataset checks shared by every format: counts, box sizes, and every problem with its file.

`check_split` validates the COCO form of a split (`DatasetSplit`, from any reader) and returns
a clean copy, with every bad entry left out, and a `SplitReport`. What counts as a problem:

- malformed entries (reader: unparsable lines or xml; here: wrong JSON types);
- missing or unreadable images (their annotations go with them);
- boxes reaching more than ``OUTSIDE_TOLERANCE`` pixels past the image, or degenerate ones
  (zero or negative width or height);
- unknown classes, annotations of unknown images, repeated image or annotation ids.

Counts are of what is left: ``images`` every usable image (negatives included), ``boxes`` and
``per_class`` the training boxes (crowd regions and VOC ``difficult`` objects, which
evaluation ignores, are not counted). `dabdetr check-data` prints and writes the reports;
`dabdetr train` stops on problems, or leaves the bad entries out under ``--skip-bad``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dabdetr.errors import BadDataError

from .categories import CategoryMap, is_int
from .formats.base import DatasetReader, DatasetSplit, Problem, read_image_size

logger = logging.getLogger(__name__)

__all__ = [
    "OUTSIDE_TOLERANCE",
    "DataProblems",
    "SplitReport",
    "check_dataset",
    "check_split",
    "load_checked",
    "format_report",
    "plot_box_sizes",
    "report_json",
]

# Pixels a box may reach past the image before it is a problem (rounding of exported
# coordinates; the dataset clips such boxes to the image).
OUTSIDE_TOLERANCE = 1.0
_SHOWN_PROBLEMS = 20


class DataProblems(BadDataError):
    """A dataset has problems (the message is the report); rerun with --skip-bad to leave the
    bad entries out."""


@dataclass
class SplitReport:
    """What `check_split` found in one split.

    Attributes:
        split: split name.
        images: usable images. boxes: training boxes (not crowd / difficult).
        per_class: class name -> training boxes (classes with boxes only).
        problems: every problem, reader's first.
        box_sizes: float64 [boxes] sqrt(width * height) in pixels of the counted boxes.
    """

    split: str
    images: int
    boxes: int
    per_class: dict[str, int]
    problems: list[Problem]
    box_sizes: np.ndarray = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "boxes": self.boxes, "per_class": self.per_class,
                "problems": [p.to_json() for p in self.problems]}


class _Checker:
    """One pass over one split's COCO dict."""

    def __init__(self, split: DatasetSplit) -> None:
        self.split = split
        self.source = str(split.source)
        self.problems = list(split.problems)

    def add(self, kind: str, file: str, line: int | None, message: str) -> None:
        self.problems.append(Problem(kind, file, line, message))

    def categories(self) -> dict[int, str]:
        try:
            cmap = CategoryMap.from_coco_json_categories(self.split.coco["categories"])
        except ValueError as err:
            raise ValueError(f"{self.source}: bad 'categories': {err}") from None
        return {cmap.class_to_category(i): cmap.name(i) for i in range(cmap.num_classes)}

    def images(self) -> tuple[list[dict[str, Any]], set[int]]:
        """(usable images with sizes, ids of images left out for a reported problem)."""
        kept, dropped, seen = [], set(), set()
        for i, img in enumerate(self.split.coco["images"]):
            where = f"images[{i}]"
            if not isinstance(img, dict) or not is_int(img.get("id")):
                self.add("malformed", self.source, None, f"{where}: needs an int 'id', got "
                         f"{img.get('id') if isinstance(img, dict) else img!r:.80}")
                continue
            image_id = img["id"]
            if image_id in seen:
                self.add("duplicate_id", self.source, None, f"{where}: image id {image_id} "
                         "appears more than once (the first is kept)")
                continue
            seen.add(image_id)
            name = img.get("file_name")
            sizes_ok = all(is_int(img.get(k)) and img[k] > 0 for k in ("width", "height")
                           if k in img)
            if not isinstance(name, str) or not name or not sizes_ok:
                self.add("malformed", self.source, None, f"{where} (id {image_id}): needs a "
                         "non-empty 'file_name' and positive int 'width'/'height'")
                dropped.add(image_id)
                continue
            img = dict(img)
            if not self.split.images_checked and not self._open(img):
                dropped.add(image_id)
                continue
            kept.append(img)
        return kept, dropped

    def _open(self, img: dict[str, Any]) -> bool:
        path = self.split.image_root / img["file_name"]
        origin = self.split.image_origin.get(img["id"], self.source)
        try:
            width, height = read_image_size(path)
        except FileNotFoundError:
            self.add("missing_image", str(path), None,
                     f"image id {img['id']} (annotated in {origin}) does not exist")
            return False
        except Exception as err:  # PIL raises many types for broken files
            self.add("unreadable_image", str(path), None,
                     f"image id {img['id']}: cannot read it: {type(err).__name__}: {err}")
            return False
        img.setdefault("width", width)
        img.setdefault("height", height)
        return True

    def annotations(self, images: dict[int, dict[str, Any]], dropped: set[int],
                    names: dict[int, str]) -> list[dict[str, Any]]:
        kept, seen = [], set()
        for i, ann in enumerate(self.split.coco["annotations"]):
            file, line = self.split.ann_origin.get(
                ann.get("id") if isinstance(ann, dict) else None, (self.source, None))
            where = f"annotations[{i}]" if file == self.source else "box"

            def bad(kind: str, message: str, file=file, line=line, where=where) -> None:
                self.add(kind, file, line, f"{where}: {message}")

            if not isinstance(ann, dict) or not all(
                    is_int(ann.get(k)) for k in ("id", "image_id", "category_id")):
                bad("malformed", "needs int 'id', 'image_id' and 'category_id'")
                continue
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in bbox)) or ann.get("iscrowd", 0) not in (0, 1):
                bad("malformed", f"'bbox' must be 4 finite numbers and 'iscrowd' 0 or 1, got "
                    f"{bbox!r:.80}, {ann.get('iscrowd')!r}")
                continue
            if ann["id"] in seen:
                bad("duplicate_id", f"annotation id {ann['id']} appears more than once")
                continue
            seen.add(ann["id"])
            if ann["image_id"] in dropped:
                continue  # its image's problem is reported
            img = images.get(ann["image_id"])
            if img is None:
                bad("unknown_image", f"image_id {ann['image_id']} is not in 'images'")
                continue
            if ann["category_id"] not in names:
                bad("unknown_class", f"category_id {ann['category_id']} is not in 'categories'")
                continue
            x, y, w, h = (float(v) for v in bbox)
            if not (w > 0 and h > 0):
                bad("degenerate_box", f"box [x={x:g}, y={y:g}, w={w:g}, h={h:g}] has no area")
                continue
            width, height = img["width"], img["height"]
            tol = OUTSIDE_TOLERANCE
            if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
                bad("box_outside_image", f"box [x1={x:g}, y1={y:g}, x2={x + w:g}, y2={y + h:g}] "
                    f"reaches outside the {width}x{height} image")
                continue
            ann = dict(ann)
            ann.setdefault("area", w * h)
            ann.setdefault("iscrowd", 0)
            kept.append(ann)
        return kept


def check_split(split: DatasetSplit) -> tuple[DatasetSplit, SplitReport]:
    """Validate one split; returns (a clean copy without the bad entries, its report).

    The clean copy's images all have ``width``/``height`` and its annotations ``area`` and
    ``iscrowd``. Raises ValueError only if the categories themselves are unusable.
    """
    checker = _Checker(split)
    names = checker.categories()
    images, dropped = checker.images()
    by_id = {img["id"]: img for img in images}
    annotations = checker.annotations(by_id, dropped, names)
    coco = {"images": images, "annotations": annotations,
            "categories": copy.deepcopy(split.coco["categories"])}
    clean = replace(split, coco=coco, problems=[])
    training = [a for a in annotations if not a["iscrowd"]]
    counts = Counter(names[a["category_id"]] for a in training)
    sizes = np.sqrt(np.array([a["bbox"][2] * a["bbox"][3] for a in training], dtype=np.float64))
    report = SplitReport(split.split, len(images), len(training),
                         {n: counts[n] for n in sorted(counts)}, checker.problems, sizes)
    return clean, report


def report_json(format: str, reports: list[SplitReport]) -> dict[str, Any]:
    """``{"format": ..., "splits": {split: {"images", "boxes", "per_class", "problems"}}}``."""
    return {"format": format, "splits": {r.split: r.to_json() for r in reports}}


def format_report(format: str, reports: list[SplitReport], shown: int = _SHOWN_PROBLEMS) -> str:
    """A readable summary: counts per split and class, and the first ``shown`` problems."""
    lines = []
    for r in reports:
        lines.append(f"{format} split {r.split!r}: {r.images} images, {r.boxes} boxes, "
                     f"{len(r.problems)} problem(s)")
        if r.per_class:
            lines.append("  per class: " + ", ".join(f"{k} {v}" for k, v in r.per_class.items()))
        kinds = Counter(p.kind for p in r.problems)
        if kinds:
            lines.append("  problems: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
        lines.extend(f"    {p}" for p in r.problems[:shown])
        if len(r.problems) > shown:
            lines.append(f"    ... and {len(r.problems) - shown} more (check-data --json PATH "
                         "lists them all)")
    return "\n".join(lines)


def plot_box_sizes(reports: list[SplitReport], path: str | os.PathLike[str]) -> Path:
    """A PNG histogram of box sizes (sqrt of the box area, pixels, log bins) per split, with
    COCO's small/medium/large limits (32 and 96 px) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r.box_sizes for r in reports if len(r.box_sizes)]
    high = max((float(s.max()) for s in sizes), default=100.0)
    low = min((float(s.min()) for s in sizes), default=1.0)
    bins = np.geomspace(max(low, 0.5), max(high, 2 * max(low, 0.5)), 40)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in reports:
        if len(r.box_sizes):
            ax.hist(r.box_sizes, bins=bins, histtype="step", linewidth=1.5,
                    label=f"{r.split} ({r.boxes} boxes)")
    for limit, label in ((32, "small | medium"), (96, "medium | large")):
        ax.axvline(limit, color="grey", linestyle="--", linewidth=1)
        ax.annotate(label, (limit, 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("box size: sqrt(width x height), pixels")
    ax.set_ylabel("boxes")
    if sizes:
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def check_dataset(reader: DatasetReader, splits: list[str] | None = None
                  ) -> list[tuple[DatasetSplit, SplitReport]]:
    """Load and check ``splits`` (default: every split the folder holds)."""
    names = splits or reader.splits()
    if not names:
        raise ValueError(f"{reader.root}: found no splits of a {reader.format} dataset")
    return [check_split(reader.load(name)) for name in names]


def load_checked(reader: DatasetReader, split: str, skip_bad: bool = False) -> DatasetSplit:
    """Load one split and check it, for training and evaluation.

    Returns the clean split. Raises `DataProblems` (a ValueError whose message is the report)
    if there are problems, unless ``skip_bad``: then the bad entries are left out and their
    count is logged.
    """
    clean, report = check_split(reader.load(split))
    if report.problems:
        if not skip_bad:
            raise DataProblems(
                f"{clean.source}: the {reader.format} dataset has problems:\n"
                f"{format_report(reader.format, [report])}\nfix them (`dabdetr check-data` "
                "lists them all), or pass --skip-bad to leave the bad entries out")
        logger.warning("%s split %r (%s): left out %d bad entr%s (--skip-bad); `dabdetr "
                       "check-data` lists them", reader.format, split, clean.source,
                       len(report.problems), "y" if len(report.problems) == 1 else "ies")
    return clean

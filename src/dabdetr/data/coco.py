"""COCO-format detection datasets: validation of the annotation file, loading, collation.

The annotation file is checked completely when the dataset is built, so a broken file fails
before training starts, with a ValueError that names the file and the offending entries.
Recoverable problems (annotations of unknown images or categories, boxes with no area) are
dropped and counted in the log. Images are read lazily; an unreadable one is skipped (None)
and `collate` counts it.

Box formats: the annotation file holds absolute [x, y, w, h]; the dataset keeps absolute
xyxy through the transforms (tv_tensors.BoundingBoxes) and converts once, at the end of
`CocoDetection.__getitem__` (`boxes_to_normalized_cxcywh`), to the normalized cxcywh the model
and criterion use.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

from dabdetr.errors import BadDataError

from .batching import batch_images
from .categories import LAYOUTS, CategoryMap, Layout, is_int
from .io import load_image_rgb
from .transforms import to_normalized_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "CocoDetection",
    "boxes_to_normalized_cxcywh",
    "collate",
    "load_image_rgb",
    "read_coco_json",
    "resolve_split",
]

Target = dict[str, Any]
Transforms = Callable[[Any, Target], tuple[Any, Target]]

_MAX_REPORTED = 10  # problems listed in one error message
_MAX_IDS_LOGGED = 20  # ids listed in one log line


# --------------------------------------------------------------------------- annotation file


@dataclass(frozen=True)
class _ImageRecord:
    image_id: int
    file_name: str
    width: int | None  # as stated in the annotation file (None: not stated)
    height: int | None
    boxes: np.ndarray  # [N, 4] float32 absolute xyxy, clipped to (width, height) when known
    labels: np.ndarray  # [N] int64 class indices


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show_ids(ids: Sequence[Any]) -> str:
    ids = sorted(set(ids), key=repr)
    shown = ", ".join(map(repr, ids[:_MAX_IDS_LOGGED]))
    return shown + (f", ... ({len(ids)} distinct)" if len(ids) > _MAX_IDS_LOGGED else "")


class _Problems:
    """Collects validation errors so one BadDataError can report several at once."""

    def __init__(self, ann_file: Path) -> None:
        self.ann_file = ann_file
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def raise_if_any(self) -> None:
        if not self.messages:
            return
        shown = self.messages[:_MAX_REPORTED]
        more = len(self.messages) - len(shown)
        lines = "\n  ".join(shown) + (f"\n  ... and {more} more problems" if more else "")
        raise BadDataError(f"{self.ann_file}: invalid COCO annotation file:\n  {lines}")


def read_coco_json(ann_file: Path) -> dict[str, Any]:
    if not ann_file.is_file():
        raise BadDataError(f"{ann_file}: annotation file does not exist (or is not a file)")
    if ann_file.stat().st_size == 0:
        raise BadDataError(f"{ann_file}: annotation file is empty (0 bytes)")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise BadDataError(f"{ann_file}: not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise BadDataError(f"{ann_file}: not a UTF-8 JSON text file ({err})") from err
    if not isinstance(data, dict):
        raise BadDataError(
            f"{ann_file}: expected a JSON object with 'images', 'annotations' and "
            f"'categories', got a JSON {type(data).__name__}"
        )
    return data


def _check_sections(data: dict[str, Any], ann_file: Path) -> None:
    problems = _Problems(ann_file)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            problems.add(f"missing the '{key}' key")
        elif not isinstance(data[key], list):
            problems.add(f"'{key}' must be a list, got {type(data[key]).__name__}")
        elif not data[key]:
            problems.add(f"'{key}' is empty")
    problems.raise_if_any()


def _check_images(images: list[Any], problems: _Problems) -> None:
    seen: set[int] = set()
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            problems.add(f"images[{i}] must be an object, got {type(img).__name__}")
            continue
        image_id = img.get("id")
        if not is_int(image_id):
            problems.add(f"images[{i}].id must be an int, got {image_id!r}")
        elif image_id in seen:
            problems.add(f"images[{i}]: duplicate image id {image_id}")
        else:
            seen.add(image_id)
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            problems.add(f"images[{i}].file_name must be a non-empty string, got {name!r}")
        for key in ("width", "height"):
            if key in img and not (is_int(img[key]) and img[key] > 0):
                problems.add(f"images[{i}].{key} must be a positive int, got {img[key]!r}")


def _check_annotations(annotations: list[Any], problems: _Problems) -> None:
    seen: set[int] = set()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            problems.add(f"annotations[{i}] must be an object, got {type(ann).__name__}")
            continue
        ann_id = ann.get("id")
        # pycocotools indexes annotations by id: a missing or repeated id breaks evaluation.
        if not is_int(ann_id):
            problems.add(f"annotations[{i}].id must be an int, got {ann_id!r}")
        elif ann_id in seen:
            problems.add(f"annotations[{i}]: duplicate annotation id {ann_id}")
        else:
            seen.add(ann_id)
        for key in ("image_id", "category_id"):
            if not is_int(ann.get(key)):
                problems.add(f"annotations[{i}].{key} must be an int, got {ann.get(key)!r}")
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(_is_number(v) and math.isfinite(v) for v in bbox)
        ):
            problems.add(
                f"annotations[{i}].bbox must be 4 finite numbers [x, y, width, height], "
                f"got {bbox!r}"
            )
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            problems.add(f"annotations[{i}].iscrowd must be 0 or 1, got {crowd!r}")


# --------------------------------------------------------------------------- dataset


class CocoDetection(Dataset):
    """A COCO-format detection dataset (torch Dataset).

    Args:
        images_dir: folder the images' ``file_name`` entries are relative to.
        ann_file: COCO annotation JSON (``images``, ``annotations``, ``categories``), or the
            same content as a dict (what `dabdetr.data.formats` readers produce for any format).
        transforms: callable ``(image, target) -> (image, target)`` taking a PIL RGB image and
            ``{"boxes": tv_tensors.BoundingBoxes (XYXY, absolute), "labels": int64 [N]}`` and
            returning a float [3, H, W] tensor (see `data.transforms`). None: no augmentation,
            only conversion to a normalized tensor.
        layout: class index layout, "contiguous" or "coco91" (see `CategoryMap`). Default:
            "contiguous", or the layout of ``category_map`` if given.
        category_map: a fixed map (e.g. from a checkpoint when fine-tuning or evaluating);
            annotations of categories it lacks are dropped. Default: built from the file.
        source: the file or folder an in-memory ``ann_file`` came from, for messages.

    Each item is ``(image, target)`` or None if the image file cannot be read:
        image: float32 [3, H, W], normalized with ImageNet mean/std (after ``transforms``).
        target: ``{"boxes": float32 [N, 4] normalized cxcywh relative to the transformed
            image, "labels": int64 [N] class indices, "image_id": int, "orig_size": int64 [2]
            (h, w) of the loaded image file (the frame its annotations live in), "size": int64
            [2] (h, w) after transforms}``.

    Crowd annotations (iscrowd=1) are not in the targets; they still count in COCO evaluation,
    which reads the annotation file itself. Images with no annotations are kept (negatives).

    Raises:
        BadDataError (a ValueError): at construction, if the annotation file is missing or
            malformed, or ``images_dir`` does not exist.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        ann_file: str | os.PathLike[str] | Mapping[str, Any],
        transforms: Transforms | None = None,
        layout: Layout | None = None,
        category_map: CategoryMap | None = None,
        source: str | os.PathLike[str] | None = None,
    ) -> None:
        self.images_dir = Path(images_dir)
        in_memory = isinstance(ann_file, Mapping)
        self.ann_file = Path(source or ("<in-memory annotations>" if in_memory else ann_file))
        self.transforms: Transforms = (
            transforms if transforms is not None else to_normalized_tensor()
        )
        if not self.images_dir.is_dir():
            raise BadDataError(f"images folder {self.images_dir} does not exist (for {ann_file})")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if category_map is not None and layout is not None and layout != category_map.layout:
            raise ValueError(
                f"layout={layout!r} contradicts the given category_map (layout "
                f"{category_map.layout!r}); pass only one of them"
            )

        data = dict(ann_file) if in_memory else read_coco_json(self.ann_file)
        _check_sections(data, self.ann_file)
        problems = _Problems(self.ann_file)
        try:
            file_map = CategoryMap.from_coco_json_categories(
                data["categories"], layout or "contiguous"
            )
        except ValueError as err:
            problems.add(f"bad 'categories': {err}")
            file_map = None
        _check_images(data["images"], problems)
        _check_annotations(data["annotations"], problems)
        problems.raise_if_any()
        assert file_map is not None  # guaranteed by raise_if_any
        self.category_map = category_map if category_map is not None else file_map
        self._records = self._build_records(
            data["images"], data["annotations"], fixed_map=category_map is not None
        )
        self._warned_sizes: set[int] = set()

    def _build_records(
        self, images: list[dict[str, Any]], annotations: list[dict[str, Any]], fixed_map: bool
    ) -> list[_ImageRecord]:
        cmap = self.category_map
        by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in images}
        sizes = {img["id"]: (img.get("width"), img.get("height")) for img in images}
        unknown_images: list[int] = []
        unknown_categories: list[int] = []
        degenerate: list[int] = []
        crowd = clipped = 0
        for ann in annotations:
            if ann["image_id"] not in by_image:
                unknown_images.append(ann["image_id"])
            elif not cmap.has_category(ann["category_id"]):
                unknown_categories.append(ann["category_id"])
            elif ann.get("iscrowd", 0):
                crowd += 1
            else:
                by_image[ann["image_id"]].append(ann)

        records = []
        for img in images:
            width, height = sizes[img["id"]]
            boxes, labels = [], []
            for ann in by_image[img["id"]]:
                x, y, w, h = (float(v) for v in ann["bbox"])
                x1, y1, x2, y2 = x, y, x + w, y + h
                if width is not None and height is not None:
                    box = (
                        min(max(x1, 0.0), width),
                        min(max(y1, 0.0), height),
                        min(max(x2, 0.0), width),
                        min(max(y2, 0.0), height),
                    )
                    clipped += box != (x1, y1, x2, y2)
                    x1, y1, x2, y2 = box
                if x2 <= x1 or y2 <= y1:
                    degenerate.append(ann["id"])
                    continue
                boxes.append((x1, y1, x2, y2))
                labels.append(cmap.category_to_class(ann["category_id"]))
            records.append(
                _ImageRecord(
                    image_id=img["id"],
                    file_name=img["file_name"],
                    width=width,
                    height=height,
                    boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    labels=np.asarray(labels, dtype=np.int64),
                )
            )

        source = "the given category map" if fixed_map else "'categories'"
        if unknown_categories:
            logger.warning(
                "%s: dropped %d annotations whose category_id is not in %s: ids %s",
                self.ann_file,
                len(unknown_categories),
                source,
                _show_ids(unknown_categories),
            )
        if unknown_images:
            logger.warning(
                "%s: dropped %d annotations whose image_id is not in 'images': ids %s",
                self.ann_file,
                len(unknown_images),
                _show_ids(unknown_images),
            )
        if degenerate:
            logger.warning(
                "%s: dropped %d boxes with zero area after clipping to the image "
                "(annotation ids %s)",
                self.ann_file,
                len(degenerate),
                _show_ids(degenerate),
            )
        if clipped:
            logger.info("%s: clipped %d boxes to their image", self.ann_file, clipped)
        if crowd:
            logger.info("%s: %d crowd annotations are not training targets", self.ann_file, crowd)
        return records

    # ----------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._records)

    @property
    def image_ids(self) -> list[int]:
        """Image ids in dataset order (``dataset.image_ids[i]`` is item i's image)."""
        return [r.image_id for r in self._records]

    def num_boxes(self) -> int:
        """Number of training boxes (non-crowd, non-degenerate, known category)."""
        return sum(len(r.labels) for r in self._records)

    def label_counts(self) -> Counter[int]:
        """Boxes per class index."""
        counts: Counter[int] = Counter()
        for r in self._records:
            counts.update(r.labels.tolist())
        return counts

    def __getitem__(self, index: int) -> tuple[Tensor, Target] | None:
        record = self._records[index]
        path = self.images_dir / record.file_name
        try:
            image = load_image_rgb(path)
            image = self._match_annotation_frame(image, path, record)
        except Exception as err:  # PIL raises many types for broken files; skip, never crash
            logger.warning(
                "skipping image %s (image id %d): %s: %s",
                path,
                record.image_id,
                type(err).__name__,
                err,
            )
            return None
        width, height = image.size
        boxes = tv_tensors.BoundingBoxes(
            torch.from_numpy(record.boxes.copy()), format="XYXY", canvas_size=(height, width)
        )
        labels = torch.from_numpy(record.labels.copy())
        if record.width is None or (height, width) != (record.height, record.width):
            # The file states no size (boxes unclipped) or another size: clip to the real one.
            boxes = F.clamp_bounding_boxes(boxes)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = tv_tensors.wrap(boxes[keep], like=boxes), labels[keep]
        target: Target = {"boxes": boxes, "labels": labels}

        image, target = self.transforms(image, target)
        if not (isinstance(image, Tensor) and image.is_floating_point() and image.dim() == 3):
            raise TypeError(
                "transforms must return a float [3, H, W] image tensor, got "
                f"{type(image).__name__}; end them with data.transforms.to_normalized_tensor()"
            )
        out_h, out_w = image.shape[-2:]
        return image.as_subclass(Tensor), {
            "boxes": boxes_to_normalized_cxcywh(target["boxes"]),
            "labels": target["labels"].as_subclass(Tensor).to(torch.int64),
            "image_id": record.image_id,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor([out_h, out_w], dtype=torch.int64),
        }

    def _match_annotation_frame(self, image: Any, path: Path, record: _ImageRecord) -> Any:
        """Undo the EXIF rotation if the annotation file's size says it was annotated unrotated.

        Annotation tools disagree on EXIF: when the stated (width, height) matches the stored
        pixels but not the EXIF-rotated ones, the boxes are in the stored frame.
        """
        if record.width is None or record.height is None:
            return image
        stated = (record.width, record.height)
        if image.size == stated:
            return image
        if image.size == stated[::-1]:
            raw = load_image_rgb(path, exif_transpose=False)
            if raw.size == stated:
                self._warn_size_once(
                    record,
                    f"{path}: the annotation size {stated} matches the "
                    "image without its EXIF rotation; using it unrotated",
                )
                return raw
        self._warn_size_once(
            record,
            f"{path}: image is {image.size[0]}x{image.size[1]} but the "
            f"annotation file says {stated[0]}x{stated[1]}; boxes are clipped "
            "to the real image",
        )
        return image

    def _warn_size_once(self, record: _ImageRecord, message: str) -> None:
        if record.image_id not in self._warned_sizes:
            self._warned_sizes.add(record.image_id)
            logger.warning(message)


def boxes_to_normalized_cxcywh(boxes: tv_tensors.BoundingBoxes) -> Tensor:
    """The named box-format boundary of the data pipeline.

    Args:
        boxes: [N, 4] tv_tensors.BoundingBoxes in XYXY absolute pixels of their canvas.

    Returns:
        [N, 4] float32 plain tensor, cxcywh normalized by the canvas (w, h), i.e. in [0, 1].
    """
    if not isinstance(boxes, tv_tensors.BoundingBoxes):
        raise TypeError(f"expected tv_tensors.BoundingBoxes, got {type(boxes).__name__}")
    if boxes.format != tv_tensors.BoundingBoxFormat.XYXY:
        raise ValueError(f"expected XYXY boxes, got {boxes.format}")
    height, width = boxes.canvas_size
    cxcywh = box_convert(boxes.as_subclass(Tensor).to(torch.float32), "xyxy", "cxcywh")
    return cxcywh / torch.tensor([width, height, width, height], dtype=torch.float32)


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """A collated batch.

    Attributes:
        images: [B, 3, H, W] float32, each image top-left, zero padding; None if every item
            of the incoming batch was unreadable (then ``len(batch) == 0``: skip the step).
        mask: [B, H, W] bool, True on padding; None exactly when ``images`` is None.
        targets: B target dicts (see `CocoDetection`); boxes are normalized to each image's own
            size, not the padded one.
        skipped: number of unreadable items (None) that were dropped from this batch.

    Under DDP every process must take the same number of optimizer steps: rather than skip an
    empty batch on one process only, run the step on all processes (or none).
    """

    images: Tensor | None
    mask: Tensor | None
    targets: list[Target] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor (images, mask, target tensors) on ``device``."""

        def move(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.to(device, non_blocking=non_blocking)
            return value

        return Batch(
            images=move(self.images),
            mask=move(self.mask),
            targets=[{k: move(v) for k, v in t.items()} for t in self.targets],
            skipped=self.skipped,
        )

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""

        def pin(value: Any) -> Any:
            return value.pin_memory() if isinstance(value, Tensor) else value

        return Batch(
            images=pin(self.images),
            mask=pin(self.mask),
            targets=[{k: pin(v) for k, v in t.items()} for t in self.targets],
            skipped=self.skipped,
        )


def collate(batch: Sequence[tuple[Tensor, Target] | None], size_divisibility: int = 0) -> Batch:
    """DataLoader collate_fn: drop unreadable items (None), pad the rest into one tensor.

    Use ``functools.partial(collate, size_divisibility=32)`` to round the padded size.
    """
    items = [item for item in batch if item is not None]
    skipped = len(batch) - len(items)
    if not items:
        return Batch(images=None, mask=None, targets=[], skipped=skipped)
    images, mask = batch_images([image for image, _ in items], size_divisibility)
    return Batch(images=images, mask=mask, targets=[t for _, t in items], skipped=skipped)


# --------------------------------------------------------------------------- folder layouts


def resolve_split(data_dir: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    """Find the images folder and annotation file of a split in a COCO-style folder.

    Looks for ``DIR/annotations/instances_{split}.json`` (and, for split "train"/"val",
    ``instances_{split}2017.json``), with images in ``DIR/{split}``, ``DIR/{split}2017``,
    ``DIR/images/{split}`` or ``DIR/images/{split}2017``; the first existing of each wins.

    Returns:
        (images_dir, ann_file).

    Raises:
        ValueError: listing every path that was looked for.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist")
    names = [split] + ([f"{split}2017"] if split in ("train", "val") else [])
    ann_candidates = [root / "annotations" / f"instances_{name}.json" for name in names]
    image_names = [split] + ([] if split.endswith("2017") else [f"{split}2017"])
    image_candidates = [root / name for name in image_names]
    image_candidates += [root / "images" / name for name in image_names]
    ann_file = next((p for p in ann_candidates if p.is_file()), None)
    images_dir = next((p for p in image_candidates if p.is_dir()), None)
    if ann_file is None or images_dir is None:
        missing = []
        if ann_file is None:
            missing.append(
                "an annotation file, looked for: " + ", ".join(str(p) for p in ann_candidates)
            )
        if images_dir is None:
            missing.append(
                "an images folder, looked for: " + ", ".join(str(p) for p in image_candidates)
            )
        raise ValueError(f"split {split!r} of {root}: found no " + "; and no ".join(missing))
    return images_dir, ann_file

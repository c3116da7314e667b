"""The one place that says what a class index means.

A detection head predicts `num_classes` logits per query; a dataset labels boxes with category
ids; people read names. `CategoryMap` ties the three together, and is stored as plain JSON in
checkpoints and weight files so a model always carries its own label space.

Two layouts exist:

- ``contiguous``: the dataset's category ids, sorted, become class indices 0..K-1 and
  ``num_classes == K``. The natural choice for a new dataset (COCO gives 80 classes).
- ``coco91``: the authors' layout. The class index *is* the category id, so
  ``num_classes == max id + 1`` (91 for COCO: ids 1..90, with index 0 and the ten unused COCO
  ids predicting nothing). Needed to load the published checkpoints, whose heads have 91 logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

Layout = Literal["contiguous", "coco91"]
LAYOUTS: tuple[str, ...] = ("contiguous", "coco91")

# Guard against building a coco91 head from a dataset whose category ids are, e.g., hashes.
_MAX_COCO91_ID = 10_000

# The 80 COCO object categories by their official category id (1..90, ten ids unused:
# 12, 26, 29, 30, 45, 66, 68, 69, 71, 83), as listed in the COCO 2017 annotation files.
COCO_CATEGORY_NAMES: Mapping[int, str] = MappingProxyType(
    {
        1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
        7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
        13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog",
        19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra",
        25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie",
        33: "suitcase", 34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball",
        38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
        42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup",
        48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
        54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog",
        59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant",
        65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse",
        75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven",
        80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
        87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
    }
)  # fmt: skip


def is_int(value: Any) -> bool:
    """Whether `value` is an int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CategoryMap:
    """Class index <-> dataset category id <-> name.

    Attributes:
        layout: "contiguous" or "coco91" (see the module docstring).
        category_ids: one entry per class index, ``len == num_classes``; None marks a class
            index that no category uses (only in the coco91 layout).
        names: one entry per class index; None exactly where ``category_ids`` is None.

    Build one with `contiguous`, `coco91`, `from_coco_json_categories`, `coco` or `from_json`.
    """

    layout: Layout
    category_ids: tuple[int | None, ...]
    names: tuple[str | None, ...]
    _class_of: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        object.__setattr__(self, "category_ids", tuple(self.category_ids))
        object.__setattr__(self, "names", tuple(self.names))
        if len(self.category_ids) != len(self.names):
            raise ValueError(
                f"category_ids ({len(self.category_ids)}) and names ({len(self.names)}) must "
                "have one entry per class index"
            )
        class_of: dict[int, int] = {}
        for index, (cat_id, name) in enumerate(zip(self.category_ids, self.names, strict=True)):
            if (cat_id is None) != (name is None):
                raise ValueError(
                    f"class {index}: category id {cat_id!r} and name {name!r} must both be set "
                    "or both be None"
                )
            if cat_id is None:
                if self.layout == "contiguous":
                    raise ValueError(f"class {index} has no category: contiguous maps have none")
                continue
            if not is_int(cat_id):
                raise ValueError(f"class {index}: category id must be an int, got {cat_id!r}")
            if not isinstance(name, str):
                raise ValueError(f"class {index}: name must be a str, got {name!r}")
            if self.layout == "coco91" and cat_id != index:
                raise ValueError(
                    f"coco91 layout needs class index == category id, got class {index} -> "
                    f"id {cat_id}"
                )
            if cat_id in class_of:
                raise ValueError(
                    f"category id {cat_id} appears twice (classes {class_of[cat_id]} and {index})"
                )
            class_of[cat_id] = index
        if not class_of:
            raise ValueError("a CategoryMap needs at least one category")
        object.__setattr__(self, "_class_of", class_of)  # a plain dict: picklable for workers

    # ----------------------------------------------------------------- constructors
    @classmethod
    def contiguous(cls, categories: Mapping[int, str]) -> CategoryMap:
        """Sorted category ids -> class indices 0..K-1 (``num_classes == K``).

        Args:
            categories: category id -> name.
        """
        ids = sorted(_check_categories(categories))
        return cls("contiguous", tuple(ids), tuple(categories[i] for i in ids))

    @classmethod
    def coco91(cls, categories: Mapping[int, str]) -> CategoryMap:
        """The authors' layout: class index == category id, ``num_classes == max id + 1``.

        Args:
            categories: category id (>= 0) -> name. Indices with no category predict nothing.
        """
        ids = _check_categories(categories)
        low, high = min(ids), max(ids)
        if low < 0:
            raise ValueError(
                f"the coco91 layout needs category ids >= 0, got {low}; use layout='contiguous'"
            )
        if high > _MAX_COCO91_ID:
            raise ValueError(
                f"the coco91 layout would make a {high + 1}-class head (max category id {high});"
                " use layout='contiguous'"
            )
        cat_ids = tuple(i if i in categories else None for i in range(high + 1))
        names = tuple(categories.get(i) for i in range(high + 1))
        return cls("coco91", cat_ids, names)

    @classmethod
    def from_coco_json_categories(
        cls, categories: Sequence[Mapping[str, Any]], layout: Layout = "contiguous"
    ) -> CategoryMap:
        """Build from the ``categories`` list of a COCO annotation file.

        Args:
            categories: ``[{"id": int, "name": str, ...}, ...]``.
            layout: "contiguous" or "coco91".
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence):
            raise ValueError(f"categories must be a list of dicts, got {type(categories).__name__}")
        by_id: dict[int, str] = {}
        for i, entry in enumerate(categories):
            if not isinstance(entry, Mapping):
                raise ValueError(f"categories[{i}] must be a dict, got {type(entry).__name__}")
            cat_id, name = entry.get("id"), entry.get("name")
            if not is_int(cat_id):
                raise ValueError(f"categories[{i}].id must be an int, got {cat_id!r}")
            if not isinstance(name, str):
                raise ValueError(f"categories[{i}].name must be a str, got {name!r}")
            if cat_id in by_id:
                raise ValueError(f"categories[{i}]: duplicate category id {cat_id}")
            by_id[cat_id] = name
        return cls.contiguous(by_id) if layout == "contiguous" else cls.coco91(by_id)

    @classmethod
    def coco(cls) -> CategoryMap:
        """The 80 COCO categories in the authors' 91-class layout (for the published weights)."""
        return cls.coco91(COCO_CATEGORY_NAMES)

    # ----------------------------------------------------------------- lookups
    @property
    def num_classes(self) -> int:
        """Number of logits the classification head needs."""
        return len(self.category_ids)

    def has_category(self, category_id: int) -> bool:
        return category_id in self._class_of

    def class_to_category(self, class_index: int) -> int:
        """Dataset category id predicted by ``class_index``; ValueError if no category uses it."""
        self._check_index(class_index)
        cat_id = self.category_ids[class_index]
        if cat_id is None:
            raise ValueError(
                f"class index {class_index} is not used by any category ({self.layout} layout)"
            )
        return cat_id

    def category_to_class(self, category_id: int) -> int:
        """Class index of a dataset category id; ValueError for an unknown id."""
        try:
            return self._class_of[category_id]
        except (KeyError, TypeError):
            known = sorted(self._class_of)
            shown = ", ".join(map(str, known[:20])) + (", ..." if len(known) > 20 else "")
            raise ValueError(f"unknown category id {category_id!r}; known ids: {shown}") from None

    def name(self, class_index: int) -> str | None:
        """Name of ``class_index``; None for an index no category uses (coco91 layout)."""
        self._check_index(class_index)
        return self.names[class_index]

    def _check_index(self, class_index: int) -> None:
        if not is_int(class_index) or not 0 <= class_index < self.num_classes:
            raise ValueError(
                f"class index must be an int in [0, {self.num_classes}), got {class_index!r}"
            )

    # ----------------------------------------------------------------- plain-data form
    def to_json(self) -> dict[str, Any]:
        """Plain data for checkpoints: layout, num_classes and the used categories."""
        return {
            "layout": self.layout,
            "num_classes": self.num_classes,
            "categories": [
                {"class_index": i, "id": cat_id, "name": name}
                for i, (cat_id, name) in enumerate(zip(self.category_ids, self.names, strict=True))
                if cat_id is not None
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CategoryMap:
        """Inverse of `to_json`; ValueError if the data is inconsistent."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a category map must be a dict, got {type(data).__name__}")
        missing = {"layout", "num_classes", "categories"} - set(data)
        if missing:
            raise ValueError(f"category map JSON lacks keys {sorted(missing)}")
        layout, num_classes = data["layout"], data["num_classes"]
        if not is_int(num_classes) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        entries = data["categories"]
        if not isinstance(entries, list):
            raise ValueError("'categories' must be a list")
        cat_ids: list[int | None] = [None] * num_classes
        names: list[str | None] = [None] * num_classes
        for entry in entries:
            index = entry.get("class_index") if isinstance(entry, Mapping) else None
            if not is_int(index) or not 0 <= index < num_classes:
                raise ValueError(
                    f"bad category entry {entry!r}: class_index must be an int in "
                    f"[0, {num_classes})"
                )
            if cat_ids[index] is not None:
                raise ValueError(f"class index {index} appears twice")
            cat_ids[index], names[index] = entry.get("id"), entry.get("name")
        return cls(layout, tuple(cat_ids), tuple(names))


def _check_categories(categories: Mapping[int, str]) -> list[int]:
    if not isinstance(categories, Mapping) or not categories:
        raise ValueError("categories must be a non-empty mapping of category id -> name")
    for cat_id, name in categories.items():
        if not is_int(cat_id):
            raise ValueError(f"category ids must be ints, got {cat_id!r}")
        if not isinstance(name, str):
            raise ValueError(f"category {cat_id}: name must be a str, got {name!r}")
    return list(categories)

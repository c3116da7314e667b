"""YOLO txt datasets: reading a split into a `DatasetSplit`, and writing one.

Layouts read:

- a ``data.yaml`` (or ``data.yml``, ``dataset.yaml``; or ``--data`` pointing at the yaml file):
  ``names`` (a list, or a {class id: name} mapping), ``train``/``val``/``test`` (a folder of
  images, a .txt file listing image paths, or a list of those), relative to ``path`` if given,
  else to the yaml's folder;
- ``DIR/images/{split}`` + ``DIR/labels/{split}``, class names from ``DIR/classes.txt`` (or
  ``names.txt``, ``obj.names``), one a line; without such a file the classes are named
  ``class_0``, ``class_1``, ... up to the highest id in any label file.

Each image's labels are in the file at the image's path with its last ``images`` folder
replaced by ``labels`` and the suffix by ``.txt``; no label file means no objects (a negative
image), and so does an empty one. A line is ``class cx cy w h`` with the box normalized by the
image's width and height (EXIF rotation applied, as viewers show it); a line of ``class x1 y1
x2 y2 ...`` (a polygon, at least 3 points) becomes its bounding box. Image sizes come from the
image headers (PIL opens only the header). YAML is parsed with PyYAML's ``safe_load`` (the
format's own reference is YAML; ``safe_load`` builds only plain data from untrusted files).

Category ids in COCO form are the YOLO class id + 1; names are kept.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .base import IMAGE_SUFFIXES, DatasetSplit, Problem, read_image_size

logger = logging.getLogger(__name__)

__all__ = ["YoloReader", "find_yaml", "looks_like_yolo", "write_yolo"]

_YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
_NAME_FILES = ("classes.txt", "names.txt", "obj.names")


def find_yaml(root: Path) -> Path | None:
    """The dataset yaml of a YOLO folder (or ``root`` itself if it is a yaml file)."""
    if root.is_file() and root.suffix.lower() in (".yaml", ".yml"):
        return root
    return next((root / n for n in _YAML_NAMES if (root / n).is_file()), None)


def looks_like_yolo(root: Path) -> bool:
    """Whether ``root`` holds a YOLO dataset yaml, or ``images/`` and ``labels/`` folders."""
    return find_yaml(root) is not None or ((root / "images").is_dir()
                                           and (root / "labels").is_dir())


def label_path(image: Path) -> Path:
    """The label file of an image: its last ``images`` folder replaced by ``labels``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


def _parse_names(raw: Any, yaml_file: Path) -> dict[int, str]:
    if isinstance(raw, list) and all(isinstance(n, (str, int)) for n in raw):
        return {i: str(n) for i, n in enumerate(raw)}
    if isinstance(raw, Mapping) and all(isinstance(k, int) and not isinstance(k, bool)
                                        for k in raw):
        return {int(k): str(v) for k, v in raw.items()}
    raise ValueError(f"{yaml_file}: 'names' must be a list of class names or a mapping "
                     f"{{class id: name}}, got {raw!r:.80}")


class YoloReader:
    """A YOLO-format dataset folder (or its yaml file)."""

    format = "yolo"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.yaml_file = find_yaml(self.root)
        self._config: dict[str, Any] = self._read_yaml() if self.yaml_file else {}
        self._names: dict[int, str] | None = None

    # ----------------------------------------------------------------- layout
    def _read_yaml(self) -> dict[str, Any]:
        assert self.yaml_file is not None
        try:
            data = yaml.safe_load(self.yaml_file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.yaml_file}: not valid YAML ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{self.yaml_file}: expected a mapping with 'names' and "
                             f"'train'/'val' paths, got {type(data).__name__}")
        if "names" not in data:
            raise ValueError(f"{self.yaml_file}: no 'names' (the list of class names)")
        return data

    def _base(self) -> Path:
        assert self.yaml_file is not None
        base = self._config.get("path")
        here = self.yaml_file.parent
        if isinstance(base, str) and base:
            return (here / base) if not Path(base).is_absolute() else Path(base)
        return here

    def _resolve(self, entry: str) -> Path:
        """A yaml path: relative to ``path`` (or the yaml's folder); failing that, relative to
        the yaml's folder, with any leading ``..`` dropped (what several exports mean)."""
        path = Path(entry)
        if path.is_absolute():
            return path
        assert self.yaml_file is not None
        stripped = Path(*[p for p in path.parts if p not in ("..", ".")])
        here = self.yaml_file.parent
        candidates = [self._base() / path, here / path, self._base() / stripped, here / stripped]
        return next((c for c in candidates if c.exists()), candidates[0])

    def _exists(self, split: str) -> bool:
        entries = self._config.get(split)
        if not entries:
            return False
        listed = entries if isinstance(entries, list) else [entries]
        missing = [str(e) for e in listed if not self._resolve(str(e)).exists()]
        if missing:
            logger.warning("%s: %s path %s does not exist; skipping the split", self.yaml_file,
                           split, ", ".join(missing))
        return not missing

    def splits(self) -> list[str]:
        if self.yaml_file is not None:
            return [s for s in ("train", "val", "test") if self._exists(s)]
        images = self.root / "images"
        return sorted(p.name for p in images.iterdir() if p.is_dir()) if images.is_dir() else []

    def _split_images(self, split: str) -> list[Path]:
        if self.yaml_file is None:
            folder = self.root / "images" / split
            if not folder.is_dir():
                raise ValueError(f"YOLO split {split!r} of {self.root}: no folder {folder} "
                                 f"(splits here: {', '.join(self.splits()) or 'none'})")
            return _list_images(folder)
        entries = self._config.get(split)
        if not entries:
            raise ValueError(f"{self.yaml_file}: no {split!r} entry (splits here: "
                             f"{', '.join(self.splits()) or 'none'})")
        images: list[Path] = []
        for entry in entries if isinstance(entries, list) else [entries]:
            path = self._resolve(str(entry))
            if path.is_dir():
                images.extend(_list_images(path))
            elif path.is_file() and path.suffix == ".txt":
                lines = path.read_text(encoding="utf-8").splitlines()
                images.extend(self._resolve_listed(path, ln.strip()) for ln in lines if ln.strip())
            else:
                raise ValueError(f"{self.yaml_file}: {split} path {entry!r} ({path}) is neither "
                                 "a folder of images nor a .txt list of images")
        return images

    def _resolve_listed(self, listing: Path, entry: str) -> Path:
        path = Path(entry)
        if path.is_absolute():
            return path
        return listing.parent / path if (listing.parent / path).exists() else self._base() / path

    # ----------------------------------------------------------------- classes
    def names(self) -> dict[int, str]:
        """YOLO class id -> name."""
        if self._names is None:
            self._names = self._find_names()
        return self._names

    def _find_names(self) -> dict[int, str]:
        if self.yaml_file is not None:
            names = _parse_names(self._config["names"], self.yaml_file)
            nc = self._config.get("nc")
            if nc is not None and nc != len(names):
                raise ValueError(f"{self.yaml_file}: nc is {nc} but 'names' lists {len(names)} "
                                 "classes; make them agree")
            return names
        for name in _NAME_FILES:
            path = self.root / name
            if path.is_file():
                lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
                return {i: n for i, n in enumerate(ln for ln in lines if ln)}
        highest = -1
        for split in self.splits():
            for image in self._split_images(split):
                for _, _, values in _label_lines(label_path(image)):
                    if values and _class_id(values[0]) is not None:
                        highest = max(highest, _class_id(values[0]))
        return {i: f"class_{i}" for i in range(highest + 1)}

    # ----------------------------------------------------------------- reading
    def load(self, split: str) -> DatasetSplit:
        images = self._split_images(split)
        names = self.names()
        if not names:
            raise ValueError(f"{self.yaml_file or self.root}: no class names found")
        image_root = Path(os.path.commonpath([p.parent for p in images])) if images else self.root
        out = DatasetSplit("yolo", split, {"images": [], "annotations": [], "categories": [
            {"id": k + 1, "name": n} for k, n in sorted(names.items())]}, image_root,
            self.yaml_file or self.root / "labels" / split, images_checked=True)
        for image in images:
            self._add_image(out, image, names)
        return out

    def _add_image(self, out: DatasetSplit, image: Path, names: dict[int, str]) -> None:
        labels = label_path(image)
        try:
            width, height = read_image_size(image)
        except FileNotFoundError:
            out.problems.append(Problem("missing_image", str(image), None,
                                        f"image listed for split {out.split!r} does not exist"))
            return
        except Exception as err:  # PIL raises many types for broken files
            out.problems.append(Problem("unreadable_image", str(image), None,
                                        f"cannot read the image: {type(err).__name__}: {err}"))
            return
        image_id = len(out.coco["images"]) + 1
        out.coco["images"].append({"id": image_id, "width": width, "height": height,
                                   "file_name": image.relative_to(out.image_root).as_posix()})
        out.image_origin[image_id] = str(labels)
        for line_no, text, values in _label_lines(labels):
            box = _parse_line(values, names, labels, line_no, text, out.problems)
            if box is None:
                continue
            cls, (cx, cy, w, h) = box
            ann_id = len(out.coco["annotations"]) + 1
            bbox = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            out.coco["annotations"].append({"id": ann_id, "image_id": image_id,
                                            "category_id": cls + 1, "bbox": bbox,
                                            "area": bbox[2] * bbox[3], "iscrowd": 0})
            out.ann_origin[ann_id] = (str(labels), line_no)


def _label_lines(path: Path) -> list[tuple[int, str, list[str]]]:
    """(1-based line number, text, fields) of each non-blank line; [] if there is no file."""
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [(1, "<binary>", ["<binary>"])]
    return [(i, ln.strip(), ln.split()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]


def _class_id(token: str) -> int | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return int(value) if value.is_integer() and value >= 0 else None


def _parse_line(values: list[str], names: dict[int, str], file: Path, line: int, text: str,
                problems: list[Problem]) -> tuple[int, tuple[float, ...]] | None:
    """(class id, normalized cx, cy, w, h) of a label line, or None with a problem added."""
    def bad(kind: str, message: str) -> None:
        problems.append(Problem(kind, str(file), line, f"{message}: {text!r:.120}"))

    cls = _class_id(values[0])
    try:
        coords = [float(v) for v in values[1:]]
    except ValueError:
        coords = None
    if cls is None or coords is None or not all(math.isfinite(c) for c in coords):
        bad("malformed", "expected 'class cx cy w h' with an integer class and finite numbers")
        return None
    if len(coords) == 4:
        box = tuple(coords)
    elif len(coords) >= 6 and len(coords) % 2 == 0:  # a polygon: its bounding box
        xs, ys = coords[0::2], coords[1::2]
        box = ((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs),
               max(ys) - min(ys))
    else:
        bad("malformed", f"expected 5 fields 'class cx cy w h' (or a polygon), got {len(values)}")
        return None
    if cls not in names:
        bad("unknown_class", f"class {cls} is not in the class list (ids "
                             f"{min(names)}..{max(names)})")
        return None
    return cls, box


# --------------------------------------------------------------------------- writing


def _fmt(value: float) -> str:
    return repr(float(value))


def write_yolo(splits: Mapping[str, DatasetSplit], dst: Path) -> list[Path]:
    """Write ``DST/images/{split}``, ``DST/labels/{split}`` and ``DST/data.yaml``.

    Class ids are the categories' positions in id order. Crowd (VOC difficult) boxes have no
    YOLO equivalent and are left out, with their count returned in the log by the caller.
    Returns the files written besides images and labels (the yaml).
    """
    categories = sorted(next(iter(splits.values())).coco["categories"], key=lambda c: c["id"])
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    for name, split in splits.items():
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in split.coco["annotations"]:
            if not ann.get("iscrowd", 0):
                by_image.setdefault(ann["image_id"], []).append(ann)
        for img in split.coco["images"]:
            image = dst / "images" / name / img["file_name"]
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(split.image_root / img["file_name"], image)
            labels = label_path(image)
            labels.parent.mkdir(parents=True, exist_ok=True)
            w, h = img["width"], img["height"]
            lines = []
            for ann in by_image.get(img["id"], []):
                x, y, bw, bh = ann["bbox"]
                lines.append(" ".join([str(class_of[ann["category_id"]]), _fmt((x + bw / 2) / w),
                                       _fmt((y + bh / 2) / h), _fmt(bw / w), _fmt(bh / h)]))
            labels.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    config = {**{name: f"images/{name}" for name in splits},
              "names": {i: c["name"] for i, c in enumerate(categories)}}
    yaml_file = dst / "data.yaml"
    yaml_file.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                         encoding="utf-8")
    return [yaml_file]

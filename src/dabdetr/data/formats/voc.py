"""Pascal VOC xml datasets: reading a split into a `DatasetSplit`, and writing one.

Layout: ``DIR/Annotations/{id}.xml``, images in ``DIR/JPEGImages/`` (the xml's ``filename``,
else ``{id}.jpg``), and the ids of each split in ``DIR/ImageSets/Main/{split}.txt``. The class
list is every object ``name`` in ``DIR/Annotations/*.xml``, sorted (so train and val agree),
unless ``DIR/labels.txt`` (or ``classes.txt``) lists them, one a line.

Boxes: VOC counts pixels from 1 and includes ``xmax``; pixel ``p`` covers ``[p - 1, p]``, so a
box is ``[xmin - 1, ymin - 1, xmax, ymax]`` in COCO's continuous coordinates (written back the
same way). ``difficult`` objects become ``iscrowd=1``: COCO evaluation ignores detections that
match them (pycocotools matches crowd regions by the share of the detection inside them, where
VOC uses IoU >= 0.5; the difference is small), and they are not training targets, as in VOC.

XML is parsed with defusedxml (its ElementTree API): label files come from other people and
tools, and defusedxml refuses entity-expansion and external-entity tricks that the standard
library's parser would follow.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ElementTree, ParseError, SubElement, indent

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from .base import DatasetSplit, Problem

__all__ = ["VocReader", "looks_like_voc", "write_voc"]

_NAME_FILES = ("labels.txt", "classes.txt")


def looks_like_voc(root: Path) -> bool:
    """Whether ``root`` has the VOC ``Annotations/`` folder and ``JPEGImages/`` or ``ImageSets/``."""
    return (root / "Annotations").is_dir() and ((root / "JPEGImages").is_dir()
                                                or (root / "ImageSets").is_dir())


class _Malformed(Exception):
    pass


def _text(node: Element, path: str, required: bool = True) -> str | None:
    found = node.find(path)
    if found is None or found.text is None or not found.text.strip():
        if required:
            raise _Malformed(f"no <{path}>")
        return None
    return found.text.strip()


def _number(node: Element, path: str) -> float:
    text = _text(node, path)
    try:
        return float(text)  # type: ignore[arg-type]
    except ValueError:
        raise _Malformed(f"<{path}> is {text!r}, not a number") from None


def _parse_xml(path: Path) -> Element:
    if path.stat().st_size == 0:
        raise _Malformed("the file is empty")
    try:
        return SafeET.parse(path).getroot()
    except ParseError as err:
        raise _Malformed(f"not valid XML ({err})") from None
    except DefusedXmlException as err:
        raise _Malformed(f"refused unsafe XML ({err})") from None


class VocReader:
    """A Pascal VOC dataset folder."""

    format = "voc"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._names: list[str] | None = None

    def splits(self) -> list[str]:
        main = self.root / "ImageSets" / "Main"
        # per-class lists are named {class}_{split}.txt
        return sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)

    def names(self) -> list[str]:
        """The class names, in class-id order."""
        if self._names is None:
            self._names = self._find_names()
        return self._names

    def _find_names(self) -> list[str]:
        for name in _NAME_FILES:
            path = self.root / name
            if path.is_file():
                return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                        if ln.strip()]
        names: set[str] = set()
        for xml in sorted((self.root / "Annotations").glob("*.xml")):
            try:
                root = _parse_xml(xml)
            except (_Malformed, OSError):
                continue  # reported when its split is loaded
            names.update(n for obj in root.iter("object") if (n := _text(obj, "name", False)))
        return sorted(names)

    def _ids(self, split: str) -> tuple[Path, list[tuple[int, str]]]:
        """(the split's list file, [(line number, image id)])."""
        listing = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise ValueError(f"VOC split {split!r} of {self.root}: no {listing} (splits here: "
                             f"{', '.join(self.splits()) or 'none'}); list the image ids of the "
                             "split in it, one a line")
        ids = [(n, ln.split()[0]) for n, ln in
               enumerate(listing.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
        return listing, ids

    def load(self, split: str) -> DatasetSplit:
        listing, ids = self._ids(split)
        names = self.names()
        if not names:
            raise ValueError(f"{self.root / 'Annotations'}: no object names in any xml file")
        cat_of = {n: i + 1 for i, n in enumerate(names)}
        out = DatasetSplit("voc", split, {"images": [], "annotations": [], "categories": [
            {"id": i, "name": n} for n, i in cat_of.items()]}, self.root / "JPEGImages", listing)
        seen: set[str] = set()
        for line, image_key in ids:
            if image_key in seen:
                out.problems.append(Problem("duplicate_id", str(listing), line,
                                            f"image id {image_key!r} is listed again"))
                continue
            seen.add(image_key)
            xml = self.root / "Annotations" / f"{image_key}.xml"
            try:
                if not xml.is_file():
                    raise _Malformed(f"listed in {listing} but the annotation file does not exist")
                self._add_image(out, xml, image_key, cat_of)
            except _Malformed as err:
                out.problems.append(Problem("malformed", str(xml), None, str(err)))
        return out

    def _image_file(self, root: Element, image_key: str) -> str:
        name = _text(root, "filename", required=False)
        folder = self.root / "JPEGImages"
        if name and (folder / name).is_file():
            return name
        for suffix in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
            if (folder / f"{image_key}{suffix}").is_file():
                return f"{image_key}{suffix}"
        return name or f"{image_key}.jpg"  # missing: the check reports it

    def _add_image(self, out: DatasetSplit, xml: Path, image_key: str,
                   cat_of: dict[str, int]) -> None:
        root = _parse_xml(xml)
        size = root.find("size")
        width = height = None
        if size is not None:
            width, height = (int(_number(size, k)) if _text(size, k, False) else None
                             for k in ("width", "height"))
        image_id = len(out.coco["images"]) + 1
        image: dict[str, Any] = {"id": image_id, "file_name": self._image_file(root, image_key)}
        if width and height:  # 0 or missing: the check reads it from the image
            image.update(width=width, height=height)
        objects = []
        for index, obj in enumerate(root.iter("object")):
            name = _text(obj, "name")
            box = obj.find("bndbox")
            if box is None:
                raise _Malformed(f"object {index} ({name}) has no <bndbox>")
            xmin, ymin, xmax, ymax = (_number(box, k) for k in ("xmin", "ymin", "xmax", "ymax"))
            difficult = _text(obj, "difficult", required=False) or "0"
            objects.append((index, name, [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1],
                            difficult.strip() not in ("0", "false", "False")))
        out.coco["images"].append(image)
        out.image_origin[image_id] = str(xml)
        for index, name, bbox, difficult in objects:
            if name not in cat_of:
                out.problems.append(Problem("unknown_class", str(xml), None,
                                            f"object {index}: class {name!r} is not in the class "
                                            "list"))
                continue
            ann_id = len(out.coco["annotations"]) + 1
            out.coco["annotations"].append({"id": ann_id, "image_id": image_id,
                                            "category_id": cat_of[name], "bbox": bbox,
                                            "area": bbox[2] * bbox[3],
                                            "iscrowd": int(difficult)})
            out.ann_origin[ann_id] = (str(xml), None)


# --------------------------------------------------------------------------- writing


def _num(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _xml_for(img: dict[str, Any], annotations: list[dict[str, Any]],
             names: dict[int, str]) -> ElementTree:
    root = Element("annotation")
    SubElement(root, "folder").text = "JPEGImages"
    SubElement(root, "filename").text = Path(img["file_name"]).name
    size = SubElement(root, "size")
    for key, value in (("width", img["width"]), ("height", img["height"]), ("depth", 3)):
        SubElement(size, key).text = str(value)
    for ann in annotations:
        obj = SubElement(root, "object")
        SubElement(obj, "name").text = names[ann["category_id"]]
        SubElement(obj, "truncated").text = "0"
        SubElement(obj, "difficult").text = "1" if ann.get("iscrowd", 0) else "0"
        box = SubElement(obj, "bndbox")
        x, y, w, h = ann["bbox"]
        for key, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
            SubElement(box, key).text = _num(value)
    indent(root)
    return ElementTree(root)


def write_voc(splits: Mapping[str, DatasetSplit], dst: Path) -> list[Path]:
    """Write ``DST/Annotations``, ``DST/JPEGImages``, ``DST/ImageSets/Main/{split}.txt`` and
    ``DST/labels.txt`` (the class list, so class ids survive a class no object uses).

    Image ids are the file names without their suffix (sub-folders joined with ``_``), prefixed
    with ``{split}_`` where another split already has an image of that id. Returns the split
    lists written.
    """
    categories = sorted(next(iter(splits.values())).coco["categories"], key=lambda c: c["id"])
    names = {c["id"]: c["name"] for c in categories}
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    (dst / "labels.txt").write_text("".join(c["name"] + "\n" for c in categories),
                                    encoding="utf-8")
    written, owner = [], {}
    for name, split in splits.items():
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in split.coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        keys = []
        for img in split.coco["images"]:
            file_name = Path(img["file_name"])
            key = "_".join(file_name.with_suffix("").parts)
            source = split.image_root / file_name
            if owner.setdefault(key, source) != source:  # another split's image of that name
                key = f"{name}_{key}"
            if owner.setdefault(key, source) != source:
                raise ValueError(f"two images would share the VOC id {key!r} ({owner[key]} and "
                                 f"{source}); rename one of them")
            shutil.copy2(source, dst / "JPEGImages" / f"{key}{file_name.suffix}")
            img = {**img, "file_name": f"{key}{file_name.suffix}"}
            _xml_for(img, by_image.get(img["id"], []), names).write(
                dst / "Annotations" / f"{key}.xml", encoding="utf-8", xml_declaration=False)
            keys.append(key)
        listing = dst / "ImageSets" / "Main" / f"{name}.txt"
        listing.write_text("".join(k + "\n" for k in keys), encoding="utf-8")
        written.append(listing)
    return written


"""Dataset formats (COCO, YOLO, Pascal VOC): reading, detection, conversion, checks, training."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from _util import tiny_cfg
from PIL import Image
from pycocotools.cocoeval import COCOeval

from dabdetr.cli import main
from dabdetr.data.check import DataProblems, check_dataset, check_split, load_checked
from dabdetr.data.coco import CocoDetection
from dabdetr.data.formats import FORMATS, detect_format, open_dataset, write_dataset
from dabdetr.data.synthetic import generate_dataset
from dabdetr.engine.evaluator import load_coco_gt
from dabdetr.engine.trainer import Trainer


def _sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _ground_truth(root: Path, split: str, fmt: str = "auto") -> dict[str, list]:
    """image content hash -> sorted [(class name, x, y, w, h, crowd)] of a split, read back."""
    clean, report = check_split(open_dataset(root, fmt).load(split))
    assert report.problems == []
    names = clean.category_names
    by_image: dict[int, list] = {img["id"]: [] for img in clean.coco["images"]}
    for ann in clean.coco["annotations"]:
        by_image[ann["image_id"]].append((names[ann["category_id"]], *ann["bbox"],
                                          ann["iscrowd"]))
    return {_sha(clean.image_root / img["file_name"]): sorted(by_image[img["id"]])
            for img in clean.coco["images"]}


def _same(a: dict[str, list], b: dict[str, list]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert [r[0] for r in a[key]] == [r[0] for r in b[key]]
        assert [r[-1] for r in a[key]] == [r[-1] for r in b[key]]
        np.testing.assert_allclose(np.array([r[1:5] for r in a[key]]).reshape(-1, 4),
                                   np.array([r[1:5] for r in b[key]]).reshape(-1, 4), atol=1e-6)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """The same 8 + 4 synthetic images in COCO, YOLO and VOC layouts."""
    base = tmp_path_factory.mktemp("formats")
    coco = base / "coco"
    generate_dataset(coco, num_train=8, num_val=4, seed=2, difficulty="easy", image_size=64,
                     progress=False)
    out = {"coco": coco}
    checked = {clean.split: clean for clean, _ in check_dataset(open_dataset(coco))}
    for fmt in ("yolo", "voc"):
        write_dataset(checked, base / fmt, fmt)
        out[fmt] = base / fmt
    return out


def test_auto_detection_names_each_format(datasets, tmp_path, caplog):
    for fmt, root in datasets.items():
        assert detect_format(root) == fmt
        with caplog.at_level(logging.INFO, logger="dabdetr.data.formats"):
            assert open_dataset(root, "auto").format == fmt
        assert f"{fmt} format (auto-detected)" in caplog.text
    with pytest.raises(ValueError, match="no known dataset layout"):
        detect_format(tmp_path)
    both = tmp_path / "both"
    (both / "labels").mkdir(parents=True)
    (both / "images").mkdir()
    (both / "Annotations").mkdir()
    (both / "JPEGImages").mkdir()
    with pytest.raises(ValueError, match="several formats.*--format"):
        detect_format(both)


def test_every_format_reads_the_same_ground_truth(datasets):
    for split in ("train", "val"):
        reference = _ground_truth(datasets["coco"], split)
        assert sum(len(v) for v in reference.values()) > 0
        for fmt in ("yolo", "voc"):
            _same(reference, _ground_truth(datasets[fmt], split, fmt))


def test_check_counts_agree_across_formats(datasets, tmp_path):
    reports = {}
    for fmt, root in datasets.items():
        path = tmp_path / f"{fmt}.json"
        assert main(["check-data", "--data", str(root), "--json", str(path), "--plot",
                     str(tmp_path / f"{fmt}.png")]) == 0
        reports[fmt] = json.loads(path.read_text())
        assert reports[fmt]["format"] == fmt
        assert set(reports[fmt]) == {"format", "splits"}
        for split in reports[fmt]["splits"].values():
            assert set(split) == {"images", "boxes", "per_class", "problems"}
        assert Image.open(tmp_path / f"{fmt}.png").size[0] > 100
    coco = json.loads((datasets["coco"] / "annotations" / "instances_train.json").read_text())
    train = reports["coco"]["splits"]["train"]
    assert train["images"] == len(coco["images"]) and train["boxes"] == len(coco["annotations"])
    assert reports["yolo"]["splits"] == reports["coco"]["splits"] == reports["voc"]["splits"]


def test_convert_data_round_trips(datasets, tmp_path, capsys):
    for fmt in ("yolo", "voc"):
        assert main(["convert-data", str(datasets[fmt]), str(tmp_path / f"back_{fmt}"),
                     "--to", "coco"]) == 0
        for split in ("train", "val"):
            _same(_ground_truth(datasets["coco"], split),
                  _ground_truth(tmp_path / f"back_{fmt}", split, "coco"))
    # yolo -> voc directly, then back to yolo
    assert main(["convert-data", str(datasets["yolo"]), str(tmp_path / "v"), "--to", "voc"]) == 0
    assert main(["convert-data", str(tmp_path / "v"), str(tmp_path / "y"), "--to", "yolo"]) == 0
    _same(_ground_truth(datasets["yolo"], "val"), _ground_truth(tmp_path / "y", "val"))


def test_convert_data_never_overwrites(datasets, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep")
    assert main(["convert-data", str(datasets["coco"]), str(dst), "--to", "yolo"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (dst / "mine.txt").read_text() == "keep" and len(list(dst.iterdir())) == 1


def test_in_memory_dict_evaluates_like_the_file(datasets):
    """pycocotools on a reader's dict: the COCO file's own boxes as detections score AP 1."""
    ann_file = datasets["coco"] / "annotations" / "instances_val.json"
    truth = json.loads(ann_file.read_text())
    for fmt in FORMATS:
        split = load_checked(open_dataset(datasets[fmt], fmt), "val")
        gt = load_coco_gt(split.coco)
        by_hash = {_sha(split.image_root / i["file_name"]): i["id"] for i in split.coco["images"]}
        names = {c["name"]: c["id"] for c in split.coco["categories"]}
        file_names = {i["id"]: i["file_name"] for i in truth["images"]}
        cat_names = {c["id"]: c["name"] for c in truth["categories"]}
        dets = [{"image_id": by_hash[_sha(datasets["coco"] / "val" / file_names[a["image_id"]])],
                 "category_id": names[cat_names[a["category_id"]]], "bbox": a["bbox"],
                 "score": 1.0} for a in truth["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[1] == pytest.approx(1.0), fmt  # AP50
        dataset = CocoDetection(split.image_root, split.coco, source=split.source)
        assert dataset.num_boxes() == len(truth["annotations"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_two_steps_and_evaluates(datasets, tmp_path, fmt):
    cfg = tiny_cfg(datasets[fmt], tmp_path / "run", format=fmt, max_steps=2, batch_size=4,
                   eval_every=1)
    trainer = Trainer(cfg)
    reference = load_checked(open_dataset(datasets["coco"]), "val").coco
    assert len(trainer.val_gt.getImgIds()) == len(reference["images"])
    assert len(trainer.val_gt.getAnnIds()) == len(reference["annotations"])
    assert [trainer.categories.name(i) for i in range(trainer.categories.num_classes)] == [
        c["name"] for c in sorted(reference["categories"], key=lambda c: c["id"])]
    summary = trainer.fit()
    assert summary["steps"] == 2
    assert summary["last"] is not None and 0.0 <= summary["last"]["AP"] <= 1.0
    code = main(["evaluate", "--weights", str(tmp_path / "run" / "last.pt"), "--data",
                 str(datasets[fmt]), "--eval-size", "64", "--max-size", "64", "--num-workers",
                 "0", "--out", str(tmp_path / "eval")])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["AP"] <= 1.0 and "per_class" in metrics


def test_explicit_coco_json_and_images(datasets, tmp_path):
    coco = datasets["coco"]
    val = json.loads((coco / "annotations" / "instances_val.json").read_text())
    for img in val["images"]:
        img["file_name"] = f"val/{img['file_name']}"
    moved = tmp_path / "elsewhere" / "val.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(val))
    cfg = tiny_cfg("", tmp_path / "run", train_json=str(coco / "annotations" /
                                                         "instances_train.json"),
                   val_json=str(moved), images=str(coco))
    with pytest.raises(ValueError, match=r"coco/000000\.png: missing_image"):
        Trainer(cfg)  # one --images folder for both: train's file names lack 'train/'
    reader = open_dataset("", "auto", {"train": coco / "annotations" / "instances_train.json",
                                       "val": moved}, None)
    assert reader.format == "coco"
    assert reader.load("train").image_root == coco / "train"  # the json's own layout
    split = load_checked(open_dataset(None, "coco", {"val": moved}, coco), "val")
    _same(_ground_truth(coco, "val"), {
        _sha(split.image_root / i["file_name"]): sorted(
            (split.category_names[a["category_id"]], *a["bbox"], a["iscrowd"])
            for a in split.coco["annotations"] if a["image_id"] == i["id"])
        for i in split.coco["images"]})


def test_voc_difficult_is_ignored_in_evaluation_and_training(tmp_path):
    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (50, 40)).save(root / "JPEGImages" / "a.jpg")
    (root / "ImageSets/Main/val.txt").write_text("a\n")
    (root / "Annotations/a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>50</width><height>40</height>"
        "</size><object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin>"
        "<ymin>1</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object><object><name>dog"
        "</name><difficult>0</difficult><bndbox><xmin>21</xmin><ymin>11</ymin><xmax>50</xmax>"
        "<ymax>40</ymax></bndbox></object></annotation>")
    split = load_checked(open_dataset(root), "val")
    crowd = {a["category_id"]: a["iscrowd"] for a in split.coco["annotations"]}
    assert crowd == {1: 1, 2: 0}  # cat (difficult) ignored, dog kept
    dog = next(a for a in split.coco["annotations"] if a["category_id"] == 2)
    assert dog["bbox"] == [20.0, 10.0, 30.0, 30.0]  # 1-based inclusive -> continuous
    dataset = CocoDetection(split.image_root, split.coco, source=split.source)
    assert dataset.num_boxes() == 1
    _, report = check_split(open_dataset(root).load("val"))
    assert report.boxes == 1 and report.per_class == {"dog": 1}


# --------------------------------------------------------------------------- problems


def _png(path: Path, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "white").save(path)


def _problems(root: Path, split: str = "train", fmt: str = "auto") -> list:
    return check_split(open_dataset(root, fmt).load(split))[1].problems


def test_yolo_problems_name_file_and_line(tmp_path):
    root = tmp_path / "yolo"
    _png(root / "images/train/a.png")
    (root / "images/train/broken.png").write_bytes(b"not an image")
    (root / "classes.txt").write_text("cat\ndog\n")
    labels = root / "labels/train/a.txt"
    labels.parent.mkdir(parents=True)
    labels.write_text("0 0.5 0.5 0.2 0.2\n"  # fine
                      "1 0.5 0.5\n"  # malformed
                      "0 0.5 0.5 0 0.1\n"  # degenerate
                      "1 0.95 0.5 0.4 0.2\n"  # outside
                      "7 0.5 0.5 0.1 0.1\n"  # unknown class
                      "x 0.5 0.5 0.1 0.1\n")  # malformed class
    found = {(p.kind, Path(p.file).name, p.line) for p in _problems(root)}
    assert found == {("malformed", "a.txt", 2), ("degenerate_box", "a.txt", 3),
                     ("box_outside_image", "a.txt", 4), ("unknown_class", "a.txt", 5),
                     ("malformed", "a.txt", 6), ("unreadable_image", "broken.png", None)}


def test_yolo_yaml_lists_a_missing_image(tmp_path):
    root = tmp_path / "y"
    _png(root / "images/train/a.png")
    (root / "train.txt").write_text("images/train/a.png\nimages/train/gone.png\n")
    (root / "data.yaml").write_text("train: train.txt\nval: train.txt\nnames: [cat]\n")
    problems = _problems(root)
    assert [(p.kind, Path(p.file).name) for p in problems] == [("missing_image", "gone.png")]


def test_coco_problems_name_the_file(tmp_path):
    root = tmp_path / "coco"
    _png(root / "train/a.png")
    (root / "train/bad.png").write_bytes(b"")
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 2, "file_name": "gone.png", "width": 40, "height": 30},
              {"id": 3, "file_name": "bad.png", "width": 40, "height": 30}]
    box = [1, 1, 5, 5]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box},
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": box},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": box},
            {"id": 3, "image_id": 99, "category_id": 1, "bbox": box},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 5]},
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [30, 1, 20, 5]},
            {"id": 6, "image_id": 1, "category_id": 1, "bbox": "oops"}]
    (root / "annotations").mkdir()
    ann_file = root / "annotations/instances_train.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 1, "name": "cat"}]}))
    found = {(p.kind, Path(p.file).name) for p in _problems(root)}
    name = ann_file.name
    assert found == {("duplicate_id", name), ("missing_image", "gone.png"),
                     ("unreadable_image", "bad.png"), ("unknown_class", name),
                     ("unknown_image", name), ("degenerate_box", name),
                     ("box_outside_image", name), ("malformed", name)}
    kinds = [p.kind for p in _problems(root)]
    assert kinds.count("duplicate_id") == 2  # one image id, one annotation id


def test_voc_problems_name_the_file(tmp_path):
    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    _png(root / "JPEGImages/a.jpg")
    (root / "labels.txt").write_text("cat\n")
    (root / "ImageSets/Main/train.txt").write_text("a\nb\nc\nd\na\n")
    obj = ("<object><name>{}</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax>"
           "<ymax>9</ymax></bndbox></object>")
    (root / "Annotations/a.xml").write_text(f"<annotation>{obj.format('cat')}"
                                            f"{obj.format('zebra')}</annotation>")
    (root / "Annotations/b.xml").write_text("")
    (root / "Annotations/c.xml").write_text(f"<annotation>{obj.format('cat')}</annotation>")
    found = {(p.kind, Path(p.file).name) for p in _problems(root)}
    assert found == {("unknown_class", "a.xml"), ("malformed", "b.xml"),
                     ("missing_image", "c.jpg"), ("malformed", "d.xml"),
                     ("duplicate_id", "train.txt")}
    assert next(p for p in _problems(root) if p.kind == "duplicate_id").line == 5


def test_train_stops_on_bad_data_or_skips_it(tmp_path, capsys, caplog):
    root = tmp_path / "yolo"
    for i in range(4):
        _png(root / f"images/train/{i}.png", (64, 64))
        (root / f"labels/train/{i}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"labels/train/{i}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    (root / "labels/train/2.txt").write_text("0 0.5 0.5 0.4 0.4\n3 0.5 0.5 0.1 0.1\n")
    (root / "classes.txt").write_text("cat\n")
    args = ["train", "--data", str(root), "--val-split", "train", "--out", str(tmp_path / "r"),
            "--model", "cpu-tiny", "--set", "num_queries=10", "--max-steps", "1",
            "--batch-size", "2", "--image-size", "64", "--no-crop", "--num-workers", "0",
            "--no-progress", "--eval-every", "1000"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2.txt:2: unknown_class" in err and "--skip-bad" in err and "Traceback" not in err
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--skip-bad"]) == 0
    assert "left out 1 bad entry (--skip-bad)" in caplog.text


def test_problems_raise_a_clear_error(tmp_path):
    root = tmp_path / "yolo"
    _png(root / "images/train/a.png")
    (root / "labels/train").mkdir(parents=True)
    (root / "labels/train/a.txt").write_text("0 0.5 0.5 nan 0.1\n")
    (root / "classes.txt").write_text("cat\n")
    with pytest.raises(DataProblems, match=r"a\.txt:1: malformed"):
        load_checked(open_dataset(root), "train")
    empty = tmp_path / "coco"
    (empty / "annotations").mkdir(parents=True)
    (empty / "train").mkdir()
    (empty / "annotations/instances_train.json").write_text("")
    with pytest.raises(ValueError, match="instances_train.json: annotation file is empty"):
        open_dataset(empty).load("train")


def test_yolo_yaml_paths_as_exports_write_them(tmp_path, caplog):
    root = tmp_path / "export"
    _png(root / "train/images/a.png", (40, 20))
    _png(root / "valid/images/b.png", (40, 20))
    (root / "train/labels").mkdir()
    (root / "train/labels/a.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text(
        "path: ../datasets/export\ntrain: ../train/images\nval: ../valid/images\n"
        "test: ../test/images\nnc: 2\nnames: {0: cat, 1: dog}\n")
    reader = open_dataset(root / "data.yaml", "yolo")
    with caplog.at_level(logging.WARNING):
        assert reader.splits() == ["train", "val"]
    assert "test path ../test/images does not exist" in caplog.text
    split = load_checked(reader, "train")
    assert split.coco["annotations"][0]["bbox"] == [10.0, 5.0, 20.0, 10.0]
    assert split.category_names[split.coco["annotations"][0]["category_id"]] == "dog"
    assert [i["file_name"] for i in load_checked(reader, "val").coco["images"]] == ["b.png"]

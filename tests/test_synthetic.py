"""Tests of the synthetic COCO-format shape benchmark (tiny images, well under a second each)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from dabdetr.data import synthetic
from dabdetr.data.synthetic import (
    CLASS_NAMES,
    DIFFICULTIES,
    add_cli_arguments,
    dataset_matches,
    generate_dataset,
    run_cli,
)

SMALL = {"num_train": 6, "num_val": 3, "seed": 3, "image_size": 96}


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = generate_dataset(out, progress=False, **SMALL)
    return out, summary


def test_layout_and_coco_json(small_dataset: tuple[Path, dict]) -> None:
    out, summary = small_dataset
    for split, count in (("train", 6), ("val", 3)):
        ann_file = out / "annotations" / f"instances_{split}.json"
        assert summary[split]["annotations"] == str(ann_file)
        assert summary[split]["num_images"] == count
        coco = COCO(str(ann_file))
        assert sorted(coco.getImgIds()) == list(range(1, count + 1))
        cats = coco.loadCats(coco.getCatIds())
        assert [c["id"] for c in cats] == list(range(1, len(CLASS_NAMES) + 1))
        assert tuple(c["name"] for c in cats) == CLASS_NAMES
        anns = coco.dataset["annotations"]
        assert len(anns) == summary[split]["num_annotations"] > 0
        assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
        for img in coco.dataset["images"]:
            path = out / split / img["file_name"]
            assert img["file_name"] == f"{img['id'] - 1:06d}.png"
            with Image.open(path) as im:
                assert im.mode == "RGB"
                assert im.size == (img["width"], img["height"]) == (96, 96)
            # 1 to ~10 objects per standard image.
            assert 1 <= len(coco.getAnnIds(imgIds=img["id"])) <= 10
    assert json.loads((out / "dataset.json").read_text())["seed"] == 3
    assert summary["seconds"] > 0


def test_boxes_inside_image_and_not_degenerate(small_dataset: tuple[Path, dict]) -> None:
    out, _ = small_dataset
    for split in ("train", "val"):
        data = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert w >= 2 and h >= 2, ann
            assert x >= 0 and y >= 0 and x + w <= width + 1e-6 and y + h <= height + 1e-6, ann
            assert 0 < ann["area"] <= w * h + 1e-6
            assert ann["iscrowd"] == 0
            assert 1 <= ann["category_id"] <= len(CLASS_NAMES)


def test_generation_is_deterministic(tmp_path: Path, small_dataset: tuple[Path, dict]) -> None:
    first, _ = small_dataset
    second = tmp_path / "again"
    generate_dataset(second, progress=False, **SMALL)
    assert _all_files(first) == _all_files(second)


def test_worker_processes_write_the_same_files(
    tmp_path: Path, small_dataset: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = small_dataset
    monkeypatch.setattr(synthetic, "PARALLEL_MIN_IMAGES", 1)  # parallel even for 9 images
    parallel = tmp_path / "parallel"
    generate_dataset(parallel, progress=False, workers=2, **SMALL)
    assert _all_files(first) == _all_files(parallel)


def test_images_do_not_depend_on_split_size(
    tmp_path: Path, small_dataset: tuple[Path, dict]
) -> None:
    first, _ = small_dataset
    fewer = tmp_path / "fewer"
    generate_dataset(fewer, progress=False, **{**SMALL, "num_train": 2, "num_val": 1})
    for name in ("train/000000.png", "train/000001.png", "val/000000.png"):
        assert (fewer / name).read_bytes() == (first / name).read_bytes()


def test_train_and_val_and_seeds_differ(tmp_path: Path, small_dataset: tuple[Path, dict]) -> None:
    out, _ = small_dataset
    train = [np.asarray(Image.open(p)) for p in sorted((out / "train").glob("*.png"))]
    val = [np.asarray(Image.open(p)) for p in sorted((out / "val").glob("*.png"))]
    for v in val:
        assert all(not np.array_equal(v, t) for t in train)
    other = tmp_path / "other_seed"
    generate_dataset(other, progress=False, **{**SMALL, "seed": 4, "num_train": 1, "num_val": 0})
    assert (other / "train/000000.png").read_bytes() != (out / "train/000000.png").read_bytes()


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_every_difficulty(tmp_path: Path, difficulty: str) -> None:
    summary = generate_dataset(
        tmp_path, 3, 1, seed=1, difficulty=difficulty, image_size=(64, 80), progress=False
    )
    data = json.loads(Path(summary["train"]["annotations"]).read_text())
    assert {(img["width"], img["height"]) for img in data["images"]} == {(80, 64)}
    with Image.open(tmp_path / "train" / "000000.png") as im:
        assert im.size == (80, 64)
    assert len(data["annotations"]) >= 3  # at least one object per image


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_occlusion_keeps_half_of_every_object_visible(difficulty: str) -> None:
    for index in range(4):
        image, objects, owner = synthetic.render_image(
            synthetic.image_rng(0, "train", index), 128, 128, difficulty
        )
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        counts = np.bincount(owner.ravel(), minlength=len(objects) + 1)
        for k, obj in enumerate(objects, start=1):
            assert counts[k] == obj.visible_area
            assert obj.visible_area >= 0.5 * obj.full_area > 0
            # Visible pixels lie inside the object's box.
            ys, xs = np.nonzero(owner == k)
            x0, y0, x1, y1 = obj.box_xyxy
            assert xs.min() >= np.floor(x0) and xs.max() < np.ceil(x1)
            assert ys.min() >= np.floor(y0) and ys.max() < np.ceil(y1)


def test_boxes_are_tight_around_the_drawn_shape() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        category_id = int(rng.integers(1, len(CLASS_NAMES) + 1))
        shape = synthetic.sample_shape(rng, category_id, rng.uniform(6, 60), (40.3, 39.8))
        x0, y0, x1, y1 = shape.box_xyxy()
        coverage = synthetic.rasterize(shape, 0, 0, 80, 80)  # [80, 80]
        ys, xs = np.nonzero(coverage > 0)
        # The first/last covered pixel rows/columns contain the box edges, up to the 4x4
        # sub-pixel sampling: an edge less than 1/8 px into a pixel may miss its sub-pixel
        # centres, and PIL fills edge sub-pixels inclusively (another 1/4 px outside).
        eps = 0.125
        assert x0 - 1.25 <= xs.min() <= x0 + eps and x1 - eps <= xs.max() + 1 <= x1 + 1.25
        assert y0 - 1.25 <= ys.min() <= y0 + eps and y1 - eps <= ys.max() + 1 <= y1 + 1.25


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train": -1}, "num_train"),
        ({"num_val": -2}, "num_val"),
        ({"num_train": True}, "num_train"),
        ({"num_train": 2.5}, "num_train"),
        ({"seed": -1}, "seed"),
        ({"difficulty": "extreme"}, "difficulty"),
        ({"image_size": 8}, "image height"),
        ({"image_size": (64, 16)}, "image width"),
        ({"image_size": (64, 64, 3)}, "image_size"),
        ({"image_size": 10_000}, "image_size"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"num_train": 1, "num_val": 1, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match="not a folder"):
        generate_dataset(target, 1, 1, progress=False)


def test_dataset_matches(tmp_path: Path, small_dataset: tuple[Path, dict]) -> None:
    out, _ = small_dataset
    assert dataset_matches(out, **SMALL)
    assert dataset_matches(out, **{**SMALL, "image_size": (96, 96)})
    assert not dataset_matches(out, **{**SMALL, "seed": 4})
    assert not dataset_matches(out, **{**SMALL, "num_val": 4})
    assert not dataset_matches(out, **{**SMALL, "difficulty": "easy"})
    assert not dataset_matches(out, **{**SMALL, "image_size": 128})
    assert not dataset_matches(tmp_path / "missing", **SMALL)
    with pytest.raises(ValueError, match="difficulty"):
        dataset_matches(out, **{**SMALL, "difficulty": "extreme"})


def test_dataset_matches_detects_missing_files(tmp_path: Path) -> None:
    generate_dataset(tmp_path, 2, 1, image_size=48, progress=False)
    assert dataset_matches(tmp_path, 2, 1, image_size=48)
    (tmp_path / "train" / "000001.png").unlink()
    assert not dataset_matches(tmp_path, 2, 1, image_size=48)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dabdetr synth")
    add_cli_arguments(parser)
    return parser


def test_run_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = _parser().parse_args(
        ["--out", str(out), "--train", "2", "--val", "1", "--image-size", "48", "--no-progress"]
    )
    assert args.difficulty == "standard" and args.seed == 0 and args.workers is None
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    assert "2 train images" in printed and "1 val images" in printed and str(out) in printed
    assert dataset_matches(out, 2, 1, image_size=48)


def test_run_cli_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:  # refused when parsed
        _parser().parse_args(["--out", str(tmp_path / "x"), "--train", "-3"])
    assert exit_.value.code == 2 and "--train" in capsys.readouterr().err
    args = _parser().parse_args(["--out", str(tmp_path / "x"), "--no-progress"])
    args.train = -3  # and by run_cli, for a namespace made another way
    assert run_cli(args) == 2
    assert "num_train" in capsys.readouterr().err


def test_cli_requires_out_and_known_difficulty() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--train", "2"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--out", "x", "--difficulty", "extreme"])


def test_run_cli_rejects_a_worker_count_below_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):  # refused when parsed
        _parser().parse_args(["--out", str(tmp_path / "x"), "--workers", "0"])
    assert "--workers" in capsys.readouterr().err
    args = _parser().parse_args(["--out", str(tmp_path / "x"), "--no-progress"])
    args.workers = 0
    assert run_cli(args) == 2
    assert "workers must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

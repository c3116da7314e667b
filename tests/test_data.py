"""COCO-format dataset, image loading, category maps, augmentation and collation."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dabdetr.data.categories import COCO_CATEGORY_NAMES, CategoryMap
from dabdetr.data.coco import (
    Batch,
    CocoDetection,
    boxes_to_normalized_cxcywh,
    collate,
    resolve_split,
)
from dabdetr.data.io import load_image_rgb, to_rgb
from dabdetr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFICIAL_SCALES,
    TransformRecipe,
    make_eval_transforms,
    make_train_transforms,
    scaled_recipe,
    shortest_side_size,
)

CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 42, "name": "answer"}]


def _write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def _denormalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image * std + mean


@pytest.fixture
def coco_dir(tmp_path: Path) -> tuple[Path, Path]:
    """Five images (one negative, one corrupt, one missing) and annotations with every flaw."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    Image.new("RGB", (80, 60), (200, 10, 10)).save(images_dir / "a.png")
    Image.new("RGB", (50, 40), (10, 200, 10)).save(images_dir / "b.png")
    Image.new("RGB", (30, 30), (10, 10, 200)).save(images_dir / "neg.png")
    (images_dir / "corrupt.png").write_bytes(b"this is not a png file")
    images = [
        {"id": 1, "file_name": "a.png", "width": 80, "height": 60},
        {"id": 2, "file_name": "b.png", "width": 50, "height": 40},
        {"id": 3, "file_name": "neg.png", "width": 30, "height": 30},
        {"id": 4, "file_name": "corrupt.png", "width": 20, "height": 20},
        {"id": 5, "file_name": "missing.png", "width": 20, "height": 20},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 10], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 42, "bbox": [70, 50, 20, 20], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [5, 5, 10, 10], "iscrowd": 1},
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [10, 10, 0, 5], "iscrowd": 0},
        {"id": 5, "image_id": 2, "category_id": 7, "bbox": [60, 10, 5, 5], "iscrowd": 0},
        {"id": 6, "image_id": 2, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        {"id": 7, "image_id": 999, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        {"id": 8, "image_id": 2, "category_id": 7, "bbox": [0, 0, 25, 20], "iscrowd": 0},
        {"id": 9, "image_id": 4, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
    ]
    ann_file = _write_json(
        tmp_path / "ann.json", {"images": images, "annotations": anns, "categories": CATEGORIES}
    )
    return images_dir, ann_file


# --------------------------------------------------------------------------- categories


def test_contiguous_and_coco91_mapping(coco_dir: tuple[Path, Path]) -> None:
    ds = CocoDetection(*coco_dir)
    cmap = ds.category_map
    assert cmap.layout == "contiguous" and cmap.num_classes == 3
    assert [cmap.class_to_category(i) for i in range(3)] == [3, 7, 42]
    assert cmap.category_to_class(42) == 2 and cmap.name(1) == "cat"
    _, target = ds[0]
    assert target["labels"].tolist() == [0, 2]
    assert target["labels"].dtype == torch.int64

    ds91 = CocoDetection(*coco_dir, layout="coco91")
    cmap91 = ds91.category_map
    assert cmap91.num_classes == 43
    assert cmap91.class_to_category(42) == 42 and cmap91.name(3) == "dog"
    assert cmap91.name(0) is None and not cmap91.has_category(0)
    with pytest.raises(ValueError, match="not used"):
        cmap91.class_to_category(5)
    assert ds91[0][1]["labels"].tolist() == [3, 42]


def test_category_map_json_roundtrip_and_errors() -> None:
    for cmap in (
        CategoryMap.contiguous({5: "a", 2: "b"}),
        CategoryMap.coco91({5: "a", 2: "b"}),
        CategoryMap.coco(),
    ):
        data = json.loads(json.dumps(cmap.to_json()))
        assert CategoryMap.from_json(data) == cmap
        assert pickle.loads(pickle.dumps(cmap)) == cmap  # DataLoader workers may pickle it
    with pytest.raises(ValueError, match="unknown category id 9"):
        CategoryMap.contiguous({1: "a"}).category_to_class(9)
    with pytest.raises(ValueError, match="class index"):
        CategoryMap.contiguous({1: "a"}).name(1)
    with pytest.raises(ValueError, match="duplicate category id 1"):
        CategoryMap.from_coco_json_categories([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(ValueError, match="coco91 layout needs category ids >= 0"):
        CategoryMap.coco91({-1: "a"})
    with pytest.raises(ValueError, match="num_classes"):
        CategoryMap.from_json({"layout": "coco91", "num_classes": 0, "categories": []})


def test_coco_category_names() -> None:
    assert len(COCO_CATEGORY_NAMES) == 80
    missing = sorted(set(range(1, 91)) - set(COCO_CATEGORY_NAMES))
    assert missing == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    cmap = CategoryMap.coco()
    assert cmap.layout == "coco91" and cmap.num_classes == 91
    assert cmap.name(1) == "person" and cmap.name(90) == "toothbrush" and cmap.name(12) is None
    assert cmap.category_to_class(18) == 18


# --------------------------------------------------------------------------- dataset


def test_targets_crowd_clipping_negatives(coco_dir: tuple[Path, Path]) -> None:
    ds = CocoDetection(*coco_dir)
    assert len(ds) == 5 and ds.image_ids == [1, 2, 3, 4, 5]
    image, target = ds[0]
    assert image.shape == (3, 60, 80) and image.dtype == torch.float32
    assert type(image) is torch.Tensor and type(target["boxes"]) is torch.Tensor
    # crowd annotation 3 is not a target; annotation 2 is clipped to [70, 50, 80, 60]
    expected = torch.tensor(
        [[20 / 80, 15 / 60, 20 / 80, 10 / 60], [75 / 80, 55 / 60, 10 / 80, 10 / 60]]
    )
    torch.testing.assert_close(target["boxes"], expected)
    assert target["boxes"].dtype == torch.float32
    assert target["image_id"] == 1
    assert target["orig_size"].tolist() == [60, 80] and target["size"].tolist() == [60, 80]
    # the pixels are the file's, normalized
    torch.testing.assert_close(
        _denormalize(image)[:, 0, 0], torch.tensor([200, 10, 10]) / 255, atol=1e-5, rtol=0
    )

    _, target = ds[1]  # zero-area and outside boxes dropped, unknown category dropped
    torch.testing.assert_close(target["boxes"], torch.tensor([[12.5 / 50, 10 / 40, 0.5, 0.5]]))
    assert target["labels"].tolist() == [1]

    _, target = ds[2]  # negative image kept
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert ds.num_boxes() == 4 and ds.label_counts() == {0: 2, 1: 1, 2: 1}
    assert len(pickle.loads(pickle.dumps(ds))) == 5  # spawn-started workers pickle it


def test_dropped_annotations_are_reported(
    coco_dir: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        CocoDetection(*coco_dir)
    text = caplog.text
    assert "dropped 1 annotations whose category_id is not in 'categories': ids 99" in text
    assert "dropped 1 annotations whose image_id is not in 'images': ids 999" in text
    assert "dropped 2 boxes with zero area" in text and "4, 5" in text
    assert str(coco_dir[1]) in text


def test_fixed_category_map(coco_dir: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    cmap = CategoryMap.contiguous({3: "dog", 7: "cat"})
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(*coco_dir, category_map=cmap)
    assert ds.category_map is cmap
    assert "not in the given category map: ids 42, 99" in caplog.text
    assert ds[0][1]["labels"].tolist() == [0]
    with pytest.raises(ValueError, match="contradicts"):
        CocoDetection(*coco_dir, layout="coco91", category_map=cmap)
    with pytest.raises(ValueError, match="layout must be one of"):
        CocoDetection(*coco_dir, layout="coco80")


def test_transforms_must_produce_a_tensor(coco_dir: tuple[Path, Path]) -> None:
    ds = CocoDetection(*coco_dir, transforms=lambda image, target: (image, target))
    with pytest.raises(TypeError, match="to_normalized_tensor"):
        ds[0]


def _valid_doc() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5]}],
        "categories": [{"id": 3, "name": "dog"}],
    }


def _with(section: str, index: int, **changes: object) -> dict:
    doc = _valid_doc()
    doc[section][index].update(changes)
    return doc


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"images": [], "annotations": [], "categories": []}, "'images' is empty"),
        ({k: v for k, v in _valid_doc().items() if k != "annotations"}, "missing the 'annot"),
        ({**_valid_doc(), "images": {"id": 1}}, "'images' must be a list"),
        (_with("annotations", 0, bbox=[1, 2, 3]), r"annotations\[0\].bbox must be 4"),
        (_with("annotations", 0, bbox=[1, 2, "3", 4]), r"annotations\[0\].bbox must be 4"),
        (_with("annotations", 0, bbox=[1, 2, float("nan"), 4]), "bbox must be 4 finite"),
        (_with("annotations", 0, image_id="1"), r"annotations\[0\].image_id must be an int"),
        (_with("annotations", 0, iscrowd=2), "iscrowd must be 0 or 1"),
        (_with("images", 0, width=-3), r"images\[0\].width must be a positive int"),
        (_with("images", 0, file_name=""), "file_name must be a non-empty string"),
        (_with("categories", 0, id="3"), "categories.*id must be an int"),
        (
            {**_valid_doc(), "images": _valid_doc()["images"] * 2},
            "duplicate image id 1",
        ),
        (
            {**_valid_doc(), "annotations": _valid_doc()["annotations"] * 2},
            "duplicate annotation id 1",
        ),
    ],
)
def test_malformed_annotation_files(tmp_path: Path, content: object, message: str) -> None:
    ann_file = tmp_path / "bad.json"
    if isinstance(content, str):
        ann_file.write_text(content)
    else:
        ann_file.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as info:
        CocoDetection(tmp_path, ann_file)
    assert str(ann_file) in str(info.value)


def test_missing_annotation_file_and_images_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist") as info:
        CocoDetection(tmp_path, tmp_path / "nope.json")
    assert "nope.json" in str(info.value)
    ann_file = _write_json(tmp_path / "ok.json", _valid_doc())
    with pytest.raises(ValueError, match="images folder"):
        CocoDetection(tmp_path / "no_images", ann_file)


def test_unreadable_images_are_skipped(
    coco_dir: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    ds = CocoDetection(*coco_dir)
    with caplog.at_level(logging.WARNING):
        assert ds[3] is None
        assert ds[4] is None
    assert "corrupt.png" in caplog.text and "missing.png" in caplog.text

    batch = collate([ds[i] for i in range(5)])
    assert isinstance(batch, Batch) and len(batch) == 3 and batch.skipped == 2
    assert batch.images.shape == (3, 3, 60, 80) and batch.mask.shape == (3, 60, 80)
    assert not batch.mask[0].any()
    assert batch.mask[1, :40, :50].logical_not().all() and batch.mask[1, 40:].all()
    assert batch.mask[1, :, 50:].all() and batch.mask[2, :30, 30:].all()
    assert [t["image_id"] for t in batch.targets] == [1, 2, 3]

    empty = collate([None, None])
    assert empty.images is None and empty.mask is None and len(empty) == 0
    assert empty.skipped == 2
    moved = batch.to("cpu")
    assert moved.images.shape == batch.images.shape and moved.skipped == 2


def test_collate_size_divisibility(coco_dir: tuple[Path, Path]) -> None:
    ds = CocoDetection(*coco_dir)
    batch = collate([ds[0], ds[2]], size_divisibility=32)
    assert batch.images.shape == (2, 3, 64, 96)


# --------------------------------------------------------------------------- image files


def test_load_grayscale_rgba_palette(tmp_path: Path) -> None:
    Image.new("L", (4, 3), 77).save(tmp_path / "gray.png")
    Image.new("RGBA", (4, 3), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([0, 0, 0, 40, 50, 60] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    for name, pixel in (("gray", (77, 77, 77)), ("rgba", (10, 20, 30)), ("palette", (40, 50, 60))):
        img = load_image_rgb(tmp_path / f"{name}.png")
        assert img.mode == "RGB" and img.size == (4, 3)
        assert img.getpixel((1, 1)) == pixel, name


def test_load_16bit(tmp_path: Path) -> None:
    values = np.array([[0, 32896, 65535], [257, 514, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    img = load_image_rgb(tmp_path / "deep.png")
    assert img.mode == "RGB" and img.size == (3, 2)
    assert np.asarray(img)[..., 0].tolist() == [[0, 128, 255], [1, 2, 255]]
    # the other containers Pillow uses for deep images
    as_int32 = Image.fromarray(values.astype(np.int32))
    assert as_int32.mode == "I"
    assert np.asarray(to_rgb(as_int32))[0, :, 1].tolist() == [0, 128, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(as_float))[0, :, 2].tolist() == [0, 128, 255]


def _write_exif_rotated(path: Path) -> None:
    """Stored 40x20 with a red left half and a blue right half, EXIF: rotate 90 deg clockwise."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: "rotate 90 CW to display"
    img.save(path, exif=exif.tobytes(), quality=95)


def test_load_exif_rotated(tmp_path: Path) -> None:
    _write_exif_rotated(tmp_path / "rot.jpg")
    img = load_image_rgb(tmp_path / "rot.jpg")
    assert img.size == (20, 40)  # (w, h) as displayed
    # rotating clockwise puts the stored left half (red) on top
    top, bottom = np.asarray(img)[5, 10].astype(int), np.asarray(img)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50
    raw = load_image_rgb(tmp_path / "rot.jpg", exif_transpose=False)
    assert raw.size == (40, 20)


def test_dataset_follows_the_annotated_orientation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_exif_rotated(tmp_path / "rot.jpg")
    doc = _valid_doc()
    doc["images"][0].update(file_name="rot.jpg", width=20, height=40)  # annotated upright
    ds = CocoDetection(tmp_path, _write_json(tmp_path / "up.json", doc))
    assert ds[0][1]["orig_size"].tolist() == [40, 20]
    doc["images"][0].update(width=40, height=20)  # annotated on the stored pixels
    ds = CocoDetection(tmp_path, _write_json(tmp_path / "raw.json", doc))
    with caplog.at_level(logging.WARNING):
        assert ds[0][1]["orig_size"].tolist() == [20, 40]
    assert "without its EXIF rotation" in caplog.text


# --------------------------------------------------------------------------- transforms

RECT = (50.0, 40.0, 130.0, 100.0)  # white rectangle on a black 200x150 image, xyxy
CORNER = (8.0, 6.0, 30.0, 24.0)  # a small one that crops often cut off


@pytest.fixture
def rect_dataset(tmp_path: Path) -> tuple[Path, Path]:
    img = Image.new("RGB", (200, 150), (0, 0, 0))
    anns = []
    for ann_id, rect in enumerate((RECT, CORNER), start=1):
        img.paste((255, 255, 255), tuple(int(v) for v in rect))
        x1, y1, x2, y2 = rect
        anns.append(
            {"id": ann_id, "image_id": 1, "category_id": 3, "bbox": [x1, y1, x2 - x1, y2 - y1]}
        )
    img.save(tmp_path / "rect.png")
    doc = {
        "images": [{"id": 1, "file_name": "rect.png", "width": 200, "height": 150}],
        "annotations": anns,
        "categories": [{"id": 3, "name": "box"}],
    }
    return tmp_path, _write_json(tmp_path / "rect.json", doc)


def _absolute_xyxy(target: dict) -> torch.Tensor:
    h, w = target["size"].tolist()
    cx, cy, bw, bh = (target["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def test_train_transforms_keep_boxes_on_the_objects(rect_dataset: tuple[Path, Path]) -> None:
    recipe = scaled_recipe(128)  # small images keep this fast; same code path as 800
    ds = CocoDetection(*rect_dataset, transforms=recipe.train_transforms())
    sizes, box_counts = set(), set()
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = ds[0]
        white = _denormalize(image).mean(0) > 0.5
        h, w = image.shape[-2:]
        sizes.add((h, w))
        box_counts.add(len(target["boxes"]))
        assert target["size"].tolist() == [h, w]
        assert target["labels"].tolist() == [0] * len(target["boxes"])
        covered = torch.zeros_like(white)
        for x1, y1, x2, y2 in _absolute_xyxy(target).tolist():
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, seed
            # inside the box: white; a 2-pixel ring around it (within the image): black
            inner = white[round(y1) + 1 : round(y2) - 1, round(x1) + 1 : round(x2) - 1]
            assert inner.numel() == 0 or inner.float().mean() > 0.95, seed
            outer = (
                slice(max(round(y1) - 3, 0), round(y2) + 3),
                slice(max(round(x1) - 3, 0), round(x2) + 3),
            )
            ring = torch.zeros_like(white)
            ring[outer] = True
            ring[max(round(y1) - 1, 0) : round(y2) + 1, max(round(x1) - 1, 0) : round(x2) + 1] = 0
            assert white[ring].float().mean() < 0.1, seed
            covered[outer] = True
        # every white pixel belongs to a box, except slivers of boxes cropped to < 1 pixel
        assert white[~covered].sum() <= 2 * max(h, w), seed
    assert len(sizes) > 5 and box_counts == {1, 2}  # scales, crops and drops all happened


def test_horizontal_flip_moves_boxes(rect_dataset: tuple[Path, Path]) -> None:
    flip = make_train_transforms(scales=(150,), max_size=None, crop_resize=None, hflip_prob=1.0)
    image, target = CocoDetection(*rect_dataset, transforms=flip)[0]
    assert image.shape == (3, 150, 200)  # short side already 150: no resize
    expected = torch.tensor([[200 - x2, y1, 200 - x1, y2] for x1, y1, x2, y2 in (RECT, CORNER)])
    torch.testing.assert_close(_absolute_xyxy(target), expected)
    white = _denormalize(image).mean(0) > 0.5
    assert white[60, 75] and not white[60, 55]


def test_eval_transforms_sizes_and_boxes(rect_dataset: tuple[Path, Path]) -> None:
    plain = CocoDetection(*rect_dataset)[0][1]
    image, target = CocoDetection(*rect_dataset, transforms=make_eval_transforms(300, 500))[0]
    assert image.shape == (3, 300, 400)
    assert target["orig_size"].tolist() == [150, 200] and target["size"].tolist() == [300, 400]
    torch.testing.assert_close(target["boxes"], plain["boxes"])  # normalized: size-invariant


def test_resize_rounding_matches_upstream() -> None:
    assert shortest_side_size(427, 640, 800, 1333) == (800, 1199)
    assert shortest_side_size(200, 640, 800, 1333) == (417, 1334)  # upstream rounding
    assert shortest_side_size(640, 200, 800, 1333) == (1334, 417)
    assert shortest_side_size(800, 1000, 800, 1333) == (800, 1000)
    assert shortest_side_size(100, 100, 512, None) == (512, 512)


def test_scaled_recipe() -> None:
    assert scaled_recipe(800) == TransformRecipe()
    assert TransformRecipe().scales == OFFICIAL_SCALES == tuple(range(480, 801, 32))
    small = scaled_recipe(512)
    assert small.scales[0] == 307 and small.scales[-1] == 512 and len(small.scales) == 11
    assert small.max_size == 853 and small.eval_max_size == 853 and small.eval_size == 512
    assert small.crop_resize == (256, 320, 384) and small.crop_size == (245, 384)
    with pytest.raises(ValueError, match="max_short_side"):
        scaled_recipe(0)
    with pytest.raises(ValueError, match="scales"):
        make_train_transforms(scales=())


def test_boxes_to_normalized_cxcywh() -> None:
    from torchvision import tv_tensors

    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[10.0, 20.0, 30.0, 60.0]]), format="XYXY", canvas_size=(100, 50)
    )
    torch.testing.assert_close(
        boxes_to_normalized_cxcywh(boxes), torch.tensor([[0.4, 0.4, 0.4, 0.4]])
    )
    with pytest.raises(TypeError):
        boxes_to_normalized_cxcywh(torch.zeros(1, 4))


# --------------------------------------------------------------------------- folder layouts


@pytest.mark.parametrize(
    ("json_name", "images_subdir", "split"),
    [
        ("instances_val2017.json", "val2017", "val"),
        ("instances_val2017.json", "val2017", "val2017"),
        ("instances_train.json", "images/train", "train"),
        ("instances_mysplit.json", "mysplit", "mysplit"),
    ],
)
def test_resolve_split(tmp_path: Path, json_name: str, images_subdir: str, split: str) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / json_name).write_text("{}")
    (tmp_path / images_subdir).mkdir(parents=True)
    images_dir, ann_file = resolve_split(tmp_path, split)
    assert images_dir == tmp_path / images_subdir
    assert ann_file == tmp_path / "annotations" / json_name


def test_resolve_split_lists_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="annotation file") as info:
        resolve_split(tmp_path, "val")
    message = str(info.value)
    assert "instances_val.json" in message and "instances_val2017.json" in message
    assert "images folder" not in message
    with pytest.raises(ValueError, match=r"images folder.*images/test"):
        resolve_split(tmp_path, "test")

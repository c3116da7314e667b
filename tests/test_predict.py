"""`dabdetr predict` (CLI) and `dabdetr.predict` (API) with a tiny random-init model."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _util import tiny_config
from PIL import Image

import dabdetr
from dabdetr.cli import main

NAMES = {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "cross"}
CATEGORY_IDS = [2, 4, 6, 8, 10]  # dataset category ids differ from class indices on purpose
NUM_KEPT = 8 * 5  # threshold 0 keeps num_queries x num_classes (< num_select) detections
SMALL = ["--size", "64", "--max-size", "96", "--device", "cpu"]  # keep CPU runs fast


@pytest.fixture(scope="module")
def model() -> dabdetr.DabDetr:
    torch.manual_seed(0)
    return dabdetr.DabDetr(tiny_config(id2label=NAMES, class_to_category=CATEGORY_IDS)).eval()


@pytest.fixture(scope="module")
def weights(model: dabdetr.DabDetr, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny"
    dabdetr.save_model(model, path)
    return path


def _noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random image of PIL size (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _write_16bit_png(path: Path, size: tuple[int, int] = (48, 32)) -> None:
    width, height = size
    values = np.random.default_rng(1).integers(0, 65536, (height, width), dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    img.save(path)


def _write_exif_rotated(path: Path) -> None:
    """Stored 40 wide x 80 high; EXIF orientation 6 (rotate 90 CW) shows it 80 wide x 40 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _noise((40, 80)).save(path, exif=exif.tobytes(), quality=95)


def _write_truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    _noise((64, 48)).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])  # header intact, data cut


def _predict_cli(inputs: list[Path | str], out: Path, weights: Path, *extra: str) -> int:
    return main(["predict", *map(str, inputs), "--weights", str(weights), "--out", str(out),
                 *SMALL, *extra])


def _read_outputs(out: Path) -> tuple[list[dict], list[dict]]:
    return (json.loads((out / "detections.json").read_text()),
            json.loads((out / "images.json").read_text()))


def _check_coco_results(results: list[dict], images: list[dict]) -> None:
    """Every entry is a valid COCO result for an image listed in images.json."""
    by_id = {img["id"]: img for img in images}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        assert isinstance(r["image_id"], int) and r["image_id"] in by_id
        assert isinstance(r["category_id"], int) and r["category_id"] in CATEGORY_IDS
        assert 0.0 <= r["score"] <= 1.0
        x, y, w, h = r["bbox"]
        assert len(r["bbox"]) == 4 and all(math.isfinite(v) for v in r["bbox"])
        assert w >= 0 and h >= 0
        img = by_id[r["image_id"]]
        # boxes are sigmoid cxcywh scaled to the image: within half an image of its borders
        assert -0.51 * img["width"] <= x and x + w <= 1.51 * img["width"]
        assert -0.51 * img["height"] <= y and y + h <= 1.51 * img["height"]


def test_cli_writes_coco_results_and_drawings(tmp_path: Path, weights: Path) -> None:
    _noise((64, 48)).save(tmp_path / "a.png")
    _noise((50, 70), seed=1).save(tmp_path / "b.jpg")
    out = tmp_path / "out"
    assert _predict_cli([tmp_path / "a.png", tmp_path / "b.jpg"], out, weights,
                        "--threshold", "0") == 0
    results, images = _read_outputs(out)
    assert images == [
        {"id": 1, "file_name": str(tmp_path / "a.png"), "height": 48, "width": 64},
        {"id": 2, "file_name": str(tmp_path / "b.jpg"), "height": 70, "width": 50},
    ]
    assert len(results) == 2 * NUM_KEPT
    assert [sum(r["image_id"] == i for r in results) for i in (1, 2)] == [NUM_KEPT, NUM_KEPT]
    _check_coco_results(results, images)
    assert not (out / "failed.json").exists()
    drawings = sorted(p.name for p in (out / "images").iterdir())
    assert drawings == ["a.jpg", "b.jpg"]
    with Image.open(out / "images" / "b.jpg") as drawn:
        assert drawn.mode == "RGB" and drawn.size == (50, 70)


def _detections_per_mode(tmp_path: Path, weights: Path, *modes: str) -> dict[str, list[dict]]:
    """`dabdetr predict --optimize MODE` on one noise image, all detections kept, per mode."""
    _noise((64, 48)).save(tmp_path / "a.png")
    runs = {}
    for mode in modes:
        out = tmp_path / mode
        assert _predict_cli([tmp_path / "a.png"], out, weights, "--threshold", "0", "--no-draw",
                            "--optimize", mode) == 0
        runs[mode] = _read_outputs(out)[0]
        assert len(runs[mode]) == NUM_KEPT
    return runs


def _sorted_scores(run: list[dict]) -> list[float]:
    return sorted(r["score"] for r in run)


def test_cli_optimize_fused_gives_the_same_detections(tmp_path: Path, weights: Path) -> None:
    runs = _detections_per_mode(tmp_path, weights, "none", "fused")
    # the same detections up to float rounding (near-equal scores may swap places)
    plain, fused = _sorted_scores(runs["none"]), _sorted_scores(runs["fused"])
    assert max(abs(a - b) for a, b in zip(plain, fused, strict=True)) < 1e-4
    assert (sorted(r["category_id"] for r in runs["none"])
            == sorted(r["category_id"] for r in runs["fused"]))


def test_cli_optimize_bf16_scores_close_to_float32(tmp_path: Path, weights: Path) -> None:
    runs = _detections_per_mode(tmp_path, weights, "none", "bf16")
    plain, low = _sorted_scores(runs["none"]), _sorted_scores(runs["bf16"])
    assert low != plain  # bfloat16 arithmetic did happen
    assert max(abs(a - b) for a, b in zip(plain, low, strict=True)) < 2e-2


def test_cli_cudagraph_without_a_gpu_is_a_clear_error(tmp_path: Path, weights: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    _noise((64, 48)).save(tmp_path / "a.png")
    assert _predict_cli([tmp_path / "a.png"], tmp_path / "out", weights,
                        "--optimize", "cudagraph") == 2
    assert "CUDA graphs run on a CUDA GPU only; this model is on cpu" in capsys.readouterr().err
    assert not (tmp_path / "out" / "detections.json").exists()


def test_cli_no_draw(tmp_path: Path, weights: Path) -> None:
    _noise((64, 48)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert _predict_cli([tmp_path / "a.png"], out, weights, "--threshold", "0", "--no-draw") == 0
    assert len(_read_outputs(out)[0]) == NUM_KEPT
    assert not any((out / "images").glob("*"))


def test_cli_threshold_filters(tmp_path: Path, weights: Path) -> None:
    src = tmp_path / "in"  # not tmp_path itself: the outputs' drawings would be found there
    src.mkdir()
    _noise((64, 48)).save(src / "a.png")
    _noise((64, 48), seed=1).save(src / "b.png")
    assert _predict_cli([src], tmp_path / "all", weights, "--threshold", "0") == 0
    everything = _read_outputs(tmp_path / "all")[0]
    scores = sorted(r["score"] for r in everything)
    threshold = scores[len(scores) // 2]
    assert _predict_cli([src], tmp_path / "some", weights,
                        "--threshold", str(threshold)) == 0
    kept = _read_outputs(tmp_path / "some")[0]
    assert 0 < len(kept) < len(everything)
    assert all(r["score"] >= threshold - 1e-5 for r in kept)
    # exactly the high-scoring part of the unfiltered results
    expected = [r for r in everything if r["score"] >= threshold]
    assert len(kept) == pytest.approx(len(expected), abs=2)  # ties at 5-digit rounding
    # threshold 1 (the top of the range, above every sigmoid score) keeps images but no boxes
    assert _predict_cli([src], tmp_path / "none", weights, "--threshold", "1") == 0
    results, images = _read_outputs(tmp_path / "none")
    assert results == [] and len(images) == 2


def test_cli_searches_directories_recursively(tmp_path: Path, weights: Path) -> None:
    root = tmp_path / "photos"
    (root / "2024" / "june").mkdir(parents=True)
    (root / "other").mkdir()
    _noise((32, 32)).save(root / "top.png")
    _noise((32, 40)).save(root / "2024" / "june" / "deep.JPG")
    _noise((40, 32)).save(root / "other" / "top.png")  # same file name in another folder
    (root / "notes.txt").write_text("not an image")
    (root / "2024" / "data.json").write_text("{}")
    out = tmp_path / "out"
    assert _predict_cli([root], out, weights, "--threshold", "0") == 0
    results, images = _read_outputs(out)
    found = sorted(Path(img["file_name"]).relative_to(root).as_posix() for img in images)
    assert found == ["2024/june/deep.JPG", "other/top.png", "top.png"]
    _check_coco_results(results, images)
    drawings = sorted(p.name for p in (out / "images").iterdir())
    assert drawings == ["deep.jpg", "top.jpg", "top_.jpg"]  # no drawing overwrites another


def test_cli_skips_and_reports_unreadable_images(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images_dir = tmp_path / "in"
    images_dir.mkdir()
    _noise((64, 48)).save(images_dir / "good1.png")
    (images_dir / "garbage.png").write_bytes(b"\x00\x01 this is not a png" * 10)
    _write_truncated_jpeg(images_dir / "truncated.jpg")
    _noise((48, 64)).save(images_dir / "good2.jpg")
    missing = tmp_path / "does_not_exist.jpg"
    out = tmp_path / "out"
    code = _predict_cli([images_dir, missing], out, weights, "--threshold", "0")
    assert code == 1
    err = capsys.readouterr().err
    assert "3 image(s) could not be read" in err
    failed = json.loads((out / "failed.json").read_text())
    assert sorted(Path(f["file"]).name for f in failed) == [
        "does_not_exist.jpg", "garbage.png", "truncated.jpg"]
    assert all(f["error"] for f in failed)
    # the readable ones are processed and numbered consecutively
    results, images = _read_outputs(out)
    assert [Path(img["file_name"]).name for img in images] == ["good1.png", "good2.jpg"]
    assert [img["id"] for img in images] == [1, 2]
    assert len(results) == 2 * NUM_KEPT
    _check_coco_results(results, images)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["good1.jpg", "good2.jpg"]


def test_cli_all_unreadable(tmp_path: Path, weights: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"nope")
    out = tmp_path / "out"
    assert _predict_cli([tmp_path / "bad.png"], out, weights) == 1
    results, images = _read_outputs(out)
    assert results == [] and images == []
    assert len(json.loads((out / "failed.json").read_text())) == 1


def test_cli_image_modes_and_exif(tmp_path: Path, weights: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    _noise((64, 48), "L").save(src / "gray.png")
    rgba = _noise((64, 48), "RGBA")
    rgba.putalpha(128)
    rgba.save(src / "rgba.png")
    _noise((64, 48), "P").save(src / "palette.png")
    with_transparency = _noise((64, 48), "P")
    with_transparency.info["transparency"] = 0
    with_transparency.save(src / "palette_t.png", transparency=0)
    _write_16bit_png(src / "deep16.png")
    _write_exif_rotated(src / "rotated.jpg")
    _noise((64, 48), "CMYK").save(src / "cmyk.jpg")
    out = tmp_path / "out"
    assert _predict_cli([src], out, weights, "--threshold", "0") == 0
    results, images = _read_outputs(out)
    sizes = {Path(img["file_name"]).name: (img["height"], img["width"]) for img in images}
    assert sizes == {"gray.png": (48, 64), "rgba.png": (48, 64), "palette.png": (48, 64),
                     "palette_t.png": (48, 64), "deep16.png": (32, 48), "cmyk.jpg": (48, 64),
                     "rotated.jpg": (40, 80)}  # stored 40 x 80, shown (and detected) 80 x 40
    assert len(results) == len(images) * NUM_KEPT
    _check_coco_results(results, images)
    for name in sizes:
        with Image.open(out / "images" / f"{Path(name).stem}.jpg") as drawn:
            assert drawn.mode == "RGB"
            assert drawn.size == sizes[name][::-1], name


def test_cli_no_images_found(tmp_path: Path, weights: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    out = tmp_path / "out"
    assert _predict_cli([empty], out, weights) == 2
    assert "no images found" in capsys.readouterr().err
    assert not (out / "detections.json").exists()


def test_cli_exit_status_from_a_real_process(tmp_path: Path, weights: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dabdetr", "predict", str(tmp_path), "--weights", str(weights),
         "--out", str(tmp_path / "out"), *SMALL],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "no images found" in proc.stderr


def _check_detections(det, size: tuple[int, int]) -> None:
    height, width = size
    assert det.image_size == size
    k = len(det)
    assert k == NUM_KEPT
    assert det.boxes.shape == (k, 4) and det.boxes.dtype == torch.float32
    assert det.scores.shape == (k,) and det.labels.shape == (k,)
    assert det.labels.dtype == torch.int64
    assert torch.isfinite(det.boxes).all()
    assert bool(((det.scores >= 0) & (det.scores <= 1)).all())
    assert bool((det.scores[:-1] >= det.scores[1:]).all())  # sorted by descending score
    x0, y0, x1, y1 = det.boxes.unbind(1)
    assert bool((x1 >= x0).all() and (y1 >= y0).all())
    assert bool((x0 >= -0.5 * width - 1e-3).all() and (x1 <= 1.5 * width + 1e-3).all())
    assert bool((y0 >= -0.5 * height - 1e-3).all() and (y1 <= 1.5 * height + 1e-3).all())
    labels = det.labels.tolist()
    assert det.names == [NAMES[i] for i in labels]
    assert det.category_ids == [CATEGORY_IDS[i] for i in labels]


def test_predict_api_paths_and_pil_images(tmp_path: Path, model: dabdetr.DabDetr) -> None:
    _noise((64, 48)).save(tmp_path / "a.png")
    _write_exif_rotated(tmp_path / "rotated.jpg")
    pil = _noise((50, 70), seed=3)
    kwargs = dict(model=model, threshold=0.0, size=64, max_size=96, device="cpu")
    dets = dabdetr.predict([tmp_path / "a.png", str(tmp_path / "rotated.jpg"), pil], **kwargs)
    assert len(dets) == 3
    for det, size in zip(dets, [(48, 64), (40, 80), (70, 50)], strict=True):
        _check_detections(det, size)
    assert dets[0].source == str(tmp_path / "a.png") and dets[2].source == ""
    # one image (not a list) gives a one-element list, the same as in a list
    single = dabdetr.predict(pil, **kwargs)
    assert len(single) == 1
    torch.testing.assert_close(single[0].boxes, dets[2].boxes)
    torch.testing.assert_close(single[0].scores, dets[2].scores)
    # the default threshold drops low scores
    high = dabdetr.predict(pil, model=model, threshold=0.5, size=64, max_size=96, device="cpu")
    assert bool((high[0].scores >= 0.5).all())
    # the model is left usable and unchanged in mode
    assert not model.training


def test_predict_api_pil_modes_match_files(tmp_path: Path, model: dabdetr.DabDetr) -> None:
    """A PIL image in any mode gives the same detections as the same image read from a file."""
    _write_16bit_png(tmp_path / "deep16.png")
    _noise((64, 48), "L").save(tmp_path / "gray.png")
    _noise((64, 48), "RGBA").save(tmp_path / "rgba.png")
    kwargs = dict(model=model, threshold=0.0, size=64, max_size=96, device="cpu")
    for name in ("deep16.png", "gray.png", "rgba.png"):
        with Image.open(tmp_path / name) as opened:
            opened.load()
            in_memory = opened.copy()
        from_file, from_pil = dabdetr.predict([tmp_path / name, in_memory], **kwargs)
        torch.testing.assert_close(from_pil.boxes, from_file.boxes, msg=name)
        torch.testing.assert_close(from_pil.scores, from_file.scores, msg=name)


def test_predict_api_errors(tmp_path: Path, model: dabdetr.DabDetr) -> None:
    with pytest.raises(ValueError, match="model or a weights"):
        dabdetr.predict([_noise((32, 32))])
    from dabdetr.errors import BadImageError

    with pytest.raises(BadImageError, match="missing.png.*no such file"):
        dabdetr.predict([tmp_path / "missing.png"], model=model, size=64, max_size=96)


def test_unavailable_cuda_device_is_a_clear_error(tmp_path, capsys):
    import torch

    from dabdetr.distributed import resolve_device

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu:7")
    assert resolve_device(None).type == "cpu"


def test_output_folder_inside_input_is_not_reread(tmp_path):
    from PIL import Image

    import dabdetr
    from dabdetr.cli import main
    from dabdetr.models.dab_detr import DabDetr

    dabdetr.save_model(DabDetr(tiny_config()), tmp_path / "w")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48), "gray").save(photos / "a.png")
    args = ["predict", str(photos), "--weights", str(tmp_path / "w"), "--out",
            str(photos / "preds"), "--size", "64", "--device", "cpu"]
    assert main(args) == 0
    # the second run (replacing the first) must not detect on the first run's drawings
    assert main([*args, "--force"]) == 0
    images = json.loads((photos / "preds" / "images.json").read_text())
    assert [Path(i["file_name"]).name for i in images] == ["a.png"]

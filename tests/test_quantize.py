"""Static int8 quantization of an exported ONNX file (`dabdetr.quantize`, `export --int8`)."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _util import perturbed_model, tiny_config
from PIL import Image, ImageDraw

pytest.importorskip("onnxruntime", reason="the export extra (pip install dabdetr[export])")

import onnx  # noqa: E402

from dabdetr.errors import BadWeightsError, OutputExistsError, UserError  # noqa: E402
from dabdetr.export import CONFIG_KEY, NUM_SELECT_KEY, export_onnx  # noqa: E402
from dabdetr.quantize import calibration_inputs, quantize_onnx  # noqa: E402
from dabdetr.runtime import OnnxDetector  # noqa: E402

NUM_SELECT = 10
# the model's own eval resize, which calibration must use (not predict's 800 default)
BASE = {"class_to_category": [2, 4, 6, 8, 10], "eval_size": 64, "eval_max_size": 96}
NUM_CALIBRATION = 6
# measured on this tiny random model, int8 vs fp32 on its calibration images: pred_boxes
# differ by up to 2.1e-3, logits by up to 0.093; bounds with some margin
BOX_TOLERANCE = 1e-2
LOGIT_TOLERANCE = 0.3
# random weights score every class about alike (~0.02), closer than the quantization error,
# so the top detection is compared by its fp32 score rather than by its class
SCORE_TOLERANCE = 1e-2


def _write_images(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` images of a few filled rectangles on a plain background, two sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (90, 60) if i % 2 else (70, 100)
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
            draw.rectangle([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img.save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def calib(folder: Path) -> Path:
    """Calibration images and one file that is not an image (skipped)."""
    path = _write_images(folder / "calib", NUM_CALIBRATION)
    (path / "broken.jpg").write_text("not an image")
    return path


@pytest.fixture(scope="module")
def fp32(folder: Path) -> Path:
    """The one export of this file: a tiny model with post-processing (three graph inputs)."""
    torch.manual_seed(0)
    model = perturbed_model(tiny_config(**BASE))
    return export_onnx(model, folder / "fp32.onnx", postprocess=True, num_select=NUM_SELECT)


@pytest.fixture(scope="module")
def int8(fp32: Path, calib: Path, folder: Path) -> Path:
    return quantize_onnx(fp32, folder / "int8.onnx", calib, num_images=NUM_CALIBRATION + 1)


def test_int8_file_keeps_config_and_metadata(fp32: Path, int8: Path) -> None:
    source, quantized = OnnxDetector(fp32), OnnxDetector(int8)
    assert quantized.config == source.config
    assert quantized.num_select == source.num_select == NUM_SELECT
    assert quantized.input_names == source.input_names == ["images", "mask", "target_sizes"]
    props = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    for p in onnx.load(str(fp32)).metadata_props:
        assert props[p.key] == p.value
    assert {CONFIG_KEY, NUM_SELECT_KEY} <= set(props)


def test_int8_file_is_quantized(int8: Path) -> None:
    graph = onnx.load(str(int8)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8_weights  # conv and linear weights stored as int8


def test_int8_outputs_close_to_fp32(fp32: Path, int8: Path, calib: Path) -> None:
    source, quantized = OnnxDetector(fp32), OnnxDetector(int8)
    for inputs in calibration_inputs(source, calib, NUM_CALIBRATION):
        logits, boxes, scores, _, _ = source.run(inputs)
        q_logits, q_boxes, q_scores, q_labels, _ = quantized.run(inputs)
        assert (q_boxes - boxes).abs().max() < BOX_TOLERANCE
        assert (q_logits - logits).abs().max() < LOGIT_TOLERANCE
        assert not torch.equal(q_logits, logits)  # it does run another graph
        assert (q_scores - scores).abs().max() < SCORE_TOLERANCE  # the top-k scores
        # int8's top detection (query, class) is one that fp32 also scores at the top
        fp32_scores = logits.sigmoid().flatten()
        top = int(q_logits.flatten().argmax())
        assert fp32_scores[top] > fp32_scores.max() - SCORE_TOLERANCE
        assert q_labels[0, 0] == top % logits.shape[-1]


def test_calibration_inputs_follow_predict_preprocessing(fp32: Path, calib: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from dabdetr.inference import Predictor

    detector = OnnxDetector(fp32)
    with caplog.at_level(logging.WARNING, logger="dabdetr.quantize"):
        inputs = calibration_inputs(detector, calib, NUM_CALIBRATION + 1)
    assert len(inputs) == NUM_CALIBRATION  # the broken file skipped, with a warning
    assert "broken.jpg" in caplog.text
    first = Image.open(sorted(calib.glob("*.png"))[0]).convert("RGB")
    expected = Predictor(detector).transform(first)
    assert torch.equal(inputs[0]["images"][0], expected)
    assert max(expected.shape[1:]) <= BASE["eval_max_size"]  # the model's resize, not 800
    assert not inputs[0]["mask"].any()
    assert inputs[0]["target_sizes"].tolist() == [[first.height, first.width]]
    assert len(calibration_inputs(detector, calib, 2)) == 2


def test_unreadable_or_missing_calibration_images(fp32: Path, folder: Path, tmp_path: Path) -> None:
    detector = OnnxDetector(fp32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images found"):
        calibration_inputs(detector, empty, 4)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(UserError, match="could be read"):
        calibration_inputs(detector, broken, 4)
    with pytest.raises(UserError, match="no such calibration"):
        calibration_inputs(detector, tmp_path / "missing", 4)


def test_quantize_refuses_bad_source_and_existing_target(int8: Path, calib: Path,
                                                         tmp_path: Path) -> None:
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("not a model")
    with pytest.raises(BadWeightsError):
        quantize_onnx(not_onnx, tmp_path / "out.onnx", calib)
    foreign = tmp_path / "foreign.onnx"  # valid ONNX, but not written by dabdetr export
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(BadWeightsError, match="not a dabdetr export"):
        quantize_onnx(foreign, tmp_path / "out.onnx", calib)
    before = int8.read_bytes()
    with pytest.raises(OutputExistsError):
        quantize_onnx(foreign, int8, calib)
    assert int8.read_bytes() == before
    with pytest.raises(UserError, match="at least one"):
        quantize_onnx(foreign, tmp_path / "out.onnx", calib, num_images=0)
    assert not (tmp_path / "out.onnx").exists()


def test_quantize_without_onnxruntime(fp32: Path, calib: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # import fails
    with pytest.raises(UserError, match=r"dabdetr\[export\]"):
        quantize_onnx(fp32, tmp_path / "out.onnx", calib)


def _run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from dabdetr.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return code, out.getvalue(), capsys.readouterr().err


def test_cli_int8_refuses_exported_program(calib: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run_cli(["export", "--weights", str(tmp_path / "unused"), "--format",
                             "exported-program", "--int8", str(calib), "--out",
                             str(tmp_path / "m.pt2")], capsys)
    assert code == 2
    assert "--int8" in err and "exported-program" in err
    code, _, err = _run_cli(["export", "--weights", str(tmp_path / "unused"), "--int8",
                             str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and "nowhere" in err
    empty = calib.parent / "empty_for_cli"
    empty.mkdir()
    code, _, err = _run_cli(["export", "--weights", str(tmp_path / "unused"), "--int8",
                             str(empty), "--out", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and "no images found" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # a second export
def test_cli_export_int8(calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import dabdetr

    torch.manual_seed(0)
    dabdetr.save_model(perturbed_model(tiny_config(**BASE)), tmp_path / "w")
    out = tmp_path / "m_int8.onnx"
    code, printed, err = _run_cli(["export", "--weights", str(tmp_path / "w"), "--int8",
                                   str(calib), "--calibration-images", "3", "--out", str(out)],
                                  capsys)
    assert code == 0, err
    assert "for information" in printed
    diffs = [float(v) for line in printed.splitlines() if "int8 onnxruntime vs eager" in line
             for v in line.split(": ", 1)[1].split(" (")[0].replace(",", "").split()[1::2]]
    assert diffs and 0 < max(diffs) < LOGIT_TOLERANCE
    detector = OnnxDetector(out)
    assert detector.config.eval_size == BASE["eval_size"]
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out)).graph.node}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_int8.onnx", "w"]

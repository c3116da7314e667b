"""DAB-Deformable-DETR through ONNX and torch.export: parity with the eager model, the model type
and config carried by the files, `dabdetr export` and `dabdetr predict --backend onnxruntime`."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from _util import perturbed_model, tiny_deformable_config

import dabdetr
from dabdetr.config import DabDeformableDetrConfig, DabDetrConfig
from dabdetr.export import (
    PARITY_TOLERANCE,
    PROGRAM_CONFIG_FILE,
    check_parity,
    export_program,
    load_program,
    max_abs_differences,
    parity_inputs,
    program_to_onnx,
    save_program,
)

pytest.importorskip("onnxruntime", reason="the export extra (pip install dabdetr[export])")

from dabdetr.runtime import OnnxDetector  # noqa: E402

NUM_SELECT = 10
NAMES = {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "cross"}
BASE = {"id2label": NAMES, "class_to_category": [2, 4, 6, 8, 10], "eval_size": 96,
        "eval_max_size": 128}
# a padded batch of two, and one unpadded image of another size (every side above the
# coarsest level's two cells: 65 pixels with 4 levels)
CASES = [(2, 96, 128, [(96, 128), (70, 90)]), (1, 131, 77, [(131, 77)])]
ALL_OUTPUTS = ["pred_logits", "pred_boxes", "scores", "labels", "boxes"]


def _model(**overrides) -> dabdetr.DabDeformableDetr:
    torch.manual_seed(0)
    return perturbed_model(tiny_deformable_config(**BASE, **overrides))


def _eager(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """What the exported graph must give: the model's last layer, then `dabdetr.postprocess`."""
    with torch.no_grad():
        out = model(inputs["images"], inputs["mask"])
    results = [out.pred_logits, out.pred_boxes]
    if "target_sizes" in inputs:
        processed = dabdetr.postprocess(out, inputs["target_sizes"], num_select=NUM_SELECT)
        results += [torch.stack([r[key] for r in processed]) for key in ("scores", "labels", "boxes")]
    return results


def _assert_parity(model: torch.nn.Module, run, postprocess: bool, seed: int) -> None:
    for case in CASES:
        inputs = parity_inputs(*case[:3], case[3], postprocess=postprocess, seed=seed)
        reference, outputs = _eager(model, inputs), run(inputs)
        names = ALL_OUTPUTS[:len(reference)]
        for name, out, ref in zip(names, outputs, reference, strict=True):
            assert out.shape == ref.shape and out.dtype == ref.dtype, (case, name)
        diffs = max_abs_differences(reference, outputs, names, inputs.get("target_sizes"))
        assert max(diffs.values()) <= PARITY_TOLERANCE, (case, diffs)
        if postprocess:  # labels and boxes really are the post-processing of pred_*
            assert torch.equal(outputs[3], reference[3]), case


def _cli(args: list[str]) -> tuple[int, str]:
    from dabdetr.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export_deformable")


@pytest.fixture(scope="module")
def base(folder: Path) -> tuple[dabdetr.DabDeformableDetr, Path]:
    """The base model (4 levels, 2 points) and its saved weights folder."""
    model = _model()
    dabdetr.save_model(model, folder / "w")
    return model, folder / "w"


@pytest.fixture(scope="module")
def program_file(base, folder: Path) -> Path:
    """The base model's ExportedProgram with post-processing, saved with its config."""
    model = base[0].train()
    program = export_program(model, postprocess=True, num_select=NUM_SELECT)
    assert model.training  # exported in eval mode, the model's own mode restored
    model.eval()
    return save_program(program, model.config, folder / "base.pt2")


@pytest.fixture(scope="module")
def onnx_postprocess(program_file: Path, folder: Path) -> Path:
    """The saved program converted to ONNX: what `dabdetr export --postprocess` writes."""
    program, config = load_program(program_file)
    return program_to_onnx(program, config, folder / "base.onnx", num_select=NUM_SELECT)


@pytest.fixture(scope="module")
def cli_onnx(base, folder: Path) -> tuple[int, str, Path]:
    """`dabdetr export --format onnx` of the saved weights: dynamic, no post-processing."""
    path = folder / "raw.onnx"
    code, printed = _cli(["export", "--weights", str(base[1]), "--format", "onnx",
                          "--out", str(path)])
    return code, printed, path


def test_exported_program_round_trip(base, program_file: Path) -> None:
    model = base[0]
    program, config = load_program(program_file)
    assert type(config) is DabDeformableDetrConfig and config == model.config
    module = program.module()

    def run(inputs):
        with torch.no_grad():
            return module(**inputs)

    _assert_parity(model, run, postprocess=True, seed=3)


def test_onnx_parity_with_postprocess(base, onnx_postprocess: Path) -> None:
    model = base[0]
    detector = OnnxDetector(onnx_postprocess)
    assert detector.input_names == ["images", "mask", "target_sizes"]
    assert detector.output_names == ALL_OUTPUTS and detector.num_select == NUM_SELECT
    assert type(detector.config) is DabDeformableDetrConfig and detector.config == model.config
    _assert_parity(model, detector.run, postprocess=True, seed=4)


def test_cli_export_onnx_without_postprocess(base, cli_onnx) -> None:
    model = base[0]
    code, printed, path = cli_onnx
    assert code == 0, printed
    diffs = [float(v) for line in printed.splitlines() if "max abs difference" in line
             for v in line.split(": ", 1)[1].replace(",", "").split()[1::2]]
    assert len(diffs) == 4 and max(diffs) <= PARITY_TOLERANCE, printed
    detector = OnnxDetector(path)
    assert detector.output_names == ALL_OUTPUTS[:2] and detector.num_select is None
    assert type(detector.config) is DabDeformableDetrConfig and detector.config == model.config
    _assert_parity(model, detector.run, postprocess=False, seed=5)
    # called like the model, the mask optional
    image = parity_inputs(1, 80, 112, seed=6)
    out = detector(image["images"])
    torch.testing.assert_close(out.pred_boxes, _eager(model, image)[1], atol=PARITY_TOLERANCE,
                               rtol=0)


def _noise_image(path: Path, size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    Image.fromarray(pixels.numpy()).save(path)


def test_predict_backends_agree(base, onnx_postprocess: Path, tmp_path: Path) -> None:
    """`dabdetr predict` gives the same detections with the PyTorch model and its ONNX file,
    both at the model's stored resize, with its class names and category ids."""
    src = tmp_path / "in"
    src.mkdir()
    for i, size in enumerate([(120, 90), (120, 90), (100, 140)]):
        _noise_image(src / f"{i}.png", size, seed=i)
    common = [str(src), "--threshold", "0", "--num-select", "8", "--batch-size", "2",
              "--workers", "1", "--no-draw"]
    runs = {"torch": ["--weights", str(base[1]), "--device", "cpu"],
            "ort": ["--weights", str(onnx_postprocess), "--backend", "onnxruntime"]}
    records = {}
    for run, args in runs.items():
        code, printed = _cli(["predict", *common, *args, "--out", str(tmp_path / run)])
        assert code == 0 and "at short side 96 " in printed, printed
        lines = (tmp_path / run / "predictions.jsonl").read_text().splitlines()
        records[run] = {r["key"]: r for r in map(json.loads, lines)}
    assert sorted(records["torch"]) == sorted(records["ort"]) and len(records["ort"]) == 3
    for key, ours in records["torch"].items():
        theirs = records["ort"][key]["detections"]
        assert len(ours["detections"]) == len(theirs) == 8, key
        for a, b in zip(ours["detections"], theirs, strict=True):
            assert (a["label"], a["name"], a["category_id"]) == (b["label"], b["name"], b["category_id"])
            assert a["name"] == NAMES[a["label"]] and a["category_id"] == 2 * (a["label"] + 1)
            assert a["score"] == pytest.approx(b["score"], abs=2e-5)
            assert a["bbox"] == pytest.approx(b["bbox"], abs=0.011)  # rounded to 0.01 px


def test_program_without_model_type_reads_as_dab_detr(tmp_path: Path) -> None:
    """A `config.json` holding the bare config dict (no model type) is a DAB-DETR's."""
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    config = DabDetrConfig(num_classes=3)
    path = tmp_path / "bare.pt2"
    torch.export.save(program, path, extra_files={PROGRAM_CONFIG_FILE: json.dumps(config.to_dict())})
    assert load_program(path)[1] == config
    deformable = DabDeformableDetrConfig(num_classes=3)
    copy = save_program(program, deformable, tmp_path / "typed.pt2")
    assert type(load_program(copy)[1]) is DabDeformableDetrConfig


@pytest.mark.slow  # one more export of each variant: about a minute each on 2 cores
@pytest.mark.parametrize("options", [{"two_stage": True}, {"num_feature_levels": 1},
                                     {"num_patterns": 2, "dilation": True}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_option_variants_export(options: dict, tmp_path: Path) -> None:
    model = _model(**options)
    program = export_program(model, postprocess=True, num_select=NUM_SELECT)
    path = program_to_onnx(program, model.config, tmp_path / "m.onnx", num_select=NUM_SELECT)
    reports = check_parity(model, OnnxDetector(path).run, postprocess=True, num_select=NUM_SELECT)
    assert max(max(r.values()) for r in reports) <= PARITY_TOLERANCE, reports
    _assert_parity(model, OnnxDetector(path).run, postprocess=True, seed=8)
    if options.get("two_stage"):  # 4 cells of 8 x 8 pixels, 6 queries: said, as in eager
        with pytest.raises(ValueError, match="num_queries=6 encoder cells"):
            OnnxDetector(path)(torch.randn(1, 3, 8, 8))

"""ONNX and torch.export: parity with the eager model, the `dabdetr export` command."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _util import perturbed_model, tiny_config

import dabdetr
from dabdetr.errors import OutputExistsError
from dabdetr.export import (
    PARITY_TOLERANCE,
    check_parity,
    export_onnx,
    export_program,
    load_program,
    max_abs_differences,
    parity_inputs,
    program_to_onnx,
    save_program,
)

pytest.importorskip("onnxruntime", reason="the export extra (pip install dabdetr[export])")

from dabdetr.inference import Predictor  # noqa: E402
from dabdetr.runtime import OnnxDetector  # noqa: E402

NUM_SELECT = 10
NAMES = {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "cross"}
# the base model also stores a resize of its own, which the ONNX file must carry
BASE = {"id2label": NAMES, "class_to_category": [2, 4, 6, 8, 10], "eval_size": 64,
        "eval_max_size": 96}
# one export per option variant, shared by its tests; each costs about what the base model's
# exports cost, so the variants run with the slow tests (-m slow)
VARIANTS = {
    # denoising queries are training-only: the model exports its inference graph
    "patterns": {"num_patterns": 2, "dn_groups": 2},
    "dc5": {"dilation": True},
    "two_stage": {"two_stage": True},
    "no_modulation": {"modulate_hw_attn": False},
}
# (batch, H, W, valid (h, w) per image): two sizes, batch 1 and 2, padded and unpadded
CASES = [(1, 96, 128, [(96, 128)]), (2, 96, 128, [(96, 128), (70, 90)]),
         (1, 131, 77, [(131, 77)]), (2, 131, 77, [(100, 77), (131, 50)])]


def _eager(model: dabdetr.DabDetr, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(inputs["images"], inputs["mask"])
    results = [out.pred_logits, out.pred_boxes]
    if "target_sizes" in inputs:
        processed = dabdetr.postprocess(out, inputs["target_sizes"], num_select=NUM_SELECT)
        results += [torch.stack([r[key] for r in processed]) for key in ("scores", "labels", "boxes")]
    return results


@dataclass
class CliRun:
    code: int
    printed: str
    path: Path


def _run_cli(args: list[str]) -> CliRun:
    from dabdetr.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return CliRun(code, out.getvalue(), Path(args[args.index("--out") + 1]))


def _printed_diffs(printed: str) -> list[float]:
    return [float(v) for line in printed.splitlines() if "max abs difference" in line
            for v in line.split(": ", 1)[1].replace(",", "").split()[1::2]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def base(folder: Path) -> tuple[dabdetr.DabDetr, Path]:
    """The base model and its saved weights folder."""
    torch.manual_seed(0)
    model = perturbed_model(tiny_config(**BASE))
    dabdetr.save_model(model, folder / "w")
    return model, folder / "w"


@pytest.fixture(scope="module")
def cli_onnx(base, folder: Path) -> CliRun:
    """`dabdetr export --format onnx` of the base weights: dynamic, without post-processing."""
    return _run_cli(["export", "--weights", str(base[1]), "--format", "onnx",
                     "--out", str(folder / "raw.onnx")])


@pytest.fixture(scope="module")
def cli_program(base, folder: Path) -> CliRun:
    """`dabdetr export --format exported-program --postprocess` of the base weights."""
    return _run_cli(["export", "--weights", str(base[1]), "--format", "exported-program",
                     "--postprocess", "--num-select", str(NUM_SELECT),
                     "--out", str(folder / "base.pt2")])


@pytest.fixture(scope="module")
def base_onnx(base, cli_program: CliRun, folder: Path) -> tuple[dabdetr.DabDetr, Path]:
    """The base model with post-processing in ONNX, converted from the saved ExportedProgram."""
    assert cli_program.code == 0, cli_program.printed
    program, config = load_program(cli_program.path)
    return base[0], program_to_onnx(program, config, folder / "base.onnx", num_select=NUM_SELECT)


def _variant_onnx(variant: str, folder: Path) -> tuple[dabdetr.DabDetr, Path]:
    torch.manual_seed(0)
    model = perturbed_model(tiny_config(**VARIANTS[variant])).train()
    program = export_program(model, postprocess=True, num_select=NUM_SELECT)
    assert model.training  # exported in eval mode, the model's own mode restored
    model.eval()
    return model, program_to_onnx(program, model.config, folder / f"{variant}.onnx",
                                  num_select=NUM_SELECT)


@pytest.fixture(scope="module",
                params=["base", *[pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS]])
def exported(request: pytest.FixtureRequest, folder: Path) -> tuple[dabdetr.DabDetr, Path]:
    if request.param == "base":
        return request.getfixturevalue("base_onnx")
    return _variant_onnx(request.param, folder)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}_{c[1]}x{c[2]}")
def test_onnx_parity_with_postprocess(exported, case) -> None:
    model, path = exported
    detector = OnnxDetector(path)
    assert detector.input_names == ["images", "mask", "target_sizes"]
    assert detector.num_select == NUM_SELECT and detector.config == model.config
    inputs = parity_inputs(*case[:3], case[3], postprocess=True, seed=case[0])
    outputs = detector.run(inputs)
    names = detector.output_names
    assert names == ["pred_logits", "pred_boxes", "scores", "labels", "boxes"]
    reference = _eager(model, inputs)
    for name, out, ref in zip(names, outputs, reference, strict=True):
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
    diffs = max_abs_differences(reference, outputs, names, inputs["target_sizes"])
    assert max(diffs.values()) <= PARITY_TOLERANCE, diffs
    # and `labels`/`boxes` really are the postprocess of `pred_*` (not only close to eager)
    torch.testing.assert_close(outputs[3], reference[3], rtol=0, atol=0)


def test_cli_export_onnx(base, cli_onnx: CliRun) -> None:
    """`dabdetr export --format onnx` writes a checked file, prints its parity, keeps it."""
    model, weights = base
    assert cli_onnx.code == 0, cli_onnx.printed
    diffs = _printed_diffs(cli_onnx.printed)
    assert len(diffs) == 4 and max(diffs) <= PARITY_TOLERANCE, cli_onnx.printed
    detector = OnnxDetector(cli_onnx.path)
    assert detector.config == model.config
    assert (detector.config.eval_size, detector.config.eval_max_size) == (64, 96)
    predictor = Predictor(detector)  # the trained resize, not the default
    assert (predictor.size, predictor.max_size) == (64, 96)
    # an existing file is kept unless --force, and refused before any export work
    before = cli_onnx.path.stat().st_mtime_ns
    again = _run_cli(["export", "--weights", str(weights), "--format", "onnx",
                      "--out", str(cli_onnx.path)])
    assert again.code == 2 and cli_onnx.path.stat().st_mtime_ns == before


def test_onnx_without_postprocess_and_padding_properties(base, cli_onnx: CliRun) -> None:
    model = base[0]
    detector = OnnxDetector(cli_onnx.path)
    assert detector.input_names == ["images", "mask"]
    assert detector.output_names == ["pred_logits", "pred_boxes"] and detector.num_select is None
    for case in CASES:
        inputs = parity_inputs(*case[:3], case[3], seed=5)
        diffs = max_abs_differences(_eager(model, inputs), detector.run(inputs), detector.output_names)
        assert max(diffs.values()) <= PARITY_TOLERANCE, (case, diffs)
    # called like the model: DetectionOutput, mask optional
    inputs = parity_inputs(1, 64, 96)
    out = detector(inputs["images"])
    torch.testing.assert_close(out.pred_logits, _eager(model, inputs)[0], atol=1e-4, rtol=0)
    # an existing file is never replaced without overwrite=True, and refused before exporting
    with pytest.raises(OutputExistsError, match="--force"):
        export_onnx(model, cli_onnx.path)


@pytest.mark.slow  # a 256-wide model with 3 decoder layers: minutes to export on 2 cores
def test_golden_official_layout_in_onnxruntime(golden_dir: Path, tmp_path: Path) -> None:
    """The authors' checkpoint layout exports and reproduces their outputs in onnxruntime."""
    io = torch.load(golden_dir / "io.pt", weights_only=True)
    model = dabdetr.load_model(golden_dir / "checkpoint.pth")
    detector = OnnxDetector(export_onnx(model, tmp_path / "golden.onnx"))
    images, mask = dabdetr.batch_images(io["images"])
    out = detector(images, mask)
    torch.testing.assert_close(out.pred_logits, io["pred_logits"], atol=PARITY_TOLERANCE, rtol=0)
    torch.testing.assert_close(out.pred_boxes, io["pred_boxes"], atol=PARITY_TOLERANCE, rtol=0)
    results = dabdetr.postprocess(out, [[480, 640], [375, 500]], num_select=30)
    for ours, theirs in zip(results, io["results"], strict=True):
        torch.testing.assert_close(ours["scores"], theirs["scores"], atol=PARITY_TOLERANCE, rtol=0)
        assert torch.equal(ours["labels"], theirs["labels"])


def test_exported_program_round_trip(base, cli_program: CliRun, tmp_path: Path) -> None:
    """The .pt2 of `dabdetr export --format exported-program` loads with its config and
    reproduces the eager model, post-processing included, at both sizes and batch 1 and 2."""
    model = base[0]
    assert cli_program.code == 0, cli_program.printed
    diffs = _printed_diffs(cli_program.printed)
    assert len(diffs) == 2 * 5 and max(diffs) <= PARITY_TOLERANCE, cli_program.printed
    loaded, config = load_program(cli_program.path)
    assert config == model.config
    module = loaded.module()
    for case in CASES:
        inputs = parity_inputs(*case[:3], case[3], postprocess=True, seed=7)
        with torch.no_grad():
            outputs = module(**inputs)
        diffs = max_abs_differences(_eager(model, inputs), outputs,
                                    ["pred_logits", "pred_boxes", "scores", "labels", "boxes"],
                                    inputs["target_sizes"])
        assert max(diffs.values()) <= PARITY_TOLERANCE, (case, diffs)
    # save_program writes a new file, and never over an existing one without overwrite=True
    copy = save_program(loaded, config, tmp_path / "copy.pt2")
    assert load_program(copy)[1] == config
    with pytest.raises(OutputExistsError):
        save_program(loaded, config, copy)


# together with VARIANTS, every DabDetrConfig option but pad_invariant, in two models
COMBINED_OPTIONS = {
    "learned_pe_layer2": dict(position_embedding="learned", random_refpoints_xy=True,
                              backbone_norm="batch", backbone_return_layer="layer2",
                              activation="relu", pre_norm=True, aux_loss=False,
                              query_scale_type="fix_elewise"),
    "selection_patterns_r34": dict(backbone="resnet34", backbone_return_layer="layer3",
                                   activation="gelu", two_stage=True, num_patterns=2,
                                   keep_query_pos=True, iter_update=False,
                                   bbox_embed_diff_each_layer=True, query_scale_type="cond_scalar"),
}


@pytest.mark.slow  # two more exports: minutes on 2 cores
@pytest.mark.parametrize("options", list(COMBINED_OPTIONS))
def test_every_model_option_exports(options: str, tmp_path: Path) -> None:
    model = perturbed_model(tiny_config(**COMBINED_OPTIONS[options]))
    path = export_onnx(model, tmp_path / "m.onnx", postprocess=True, num_select=NUM_SELECT)
    reports = check_parity(model, OnnxDetector(path).run, postprocess=True, num_select=NUM_SELECT)
    assert max(max(r.values()) for r in reports) <= PARITY_TOLERANCE, reports


def test_unexportable_options_are_refused_by_name() -> None:
    model = dabdetr.DabDetr(tiny_config(pad_invariant=True))
    with pytest.raises(ValueError, match="pad_invariant"):
        export_program(model)
    with pytest.raises(ValueError, match="static_size"):
        export_program(dabdetr.DabDetr(tiny_config()), static_size=(64,))
    with pytest.raises(TypeError, match="DabDetr"):
        export_program(torch.nn.Linear(2, 2))


def test_cli_parity_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    from dabdetr.export_cli import report_parity

    good = [{"pred_logits": 3e-6, "pred_boxes": 1e-7}, {"pred_logits": 2e-6, "pred_boxes": 0.0}]
    assert report_parity(good, "onnxruntime") == 0
    bad = [{"pred_logits": 3e-6, "pred_boxes": 1e-7}, {"pred_logits": 2e-3, "pred_boxes": 0.0}]
    assert report_parity(bad, "onnxruntime") == 1
    assert "2.00e-03" in capsys.readouterr().err


def _noise_image(path: Path, size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    Image.fromarray(pixels.numpy()).save(path)


def test_predict_backends_agree(base, base_onnx, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """`dabdetr predict` gives the same JSONL, COCO results and drawings with either backend,
    both at the resize stored with the model."""
    import json

    from dabdetr.cli import main

    weights, onnx_path = base[1], base_onnx[1]
    src = tmp_path / "in"
    src.mkdir()
    for i, size in enumerate([(64, 48), (64, 48), (50, 70), (64, 48), (96, 40)]):
        _noise_image(src / f"{i}.png", size, seed=i)
    common = [str(src), "--threshold", "0", "--num-select", "12", "--batch-size", "2",
              "--workers", "1"]
    assert main(["predict", *common, "--weights", str(weights), "--device", "cpu",
                 "--out", str(tmp_path / "torch")]) == 0
    assert main(["predict", *common, "--weights", str(onnx_path), "--backend", "onnxruntime",
                 "--out", str(tmp_path / "ort")]) == 0
    assert capsys.readouterr().out.count("at short side 64 ") == 2

    def records(run: str) -> dict[str, dict]:
        lines = (tmp_path / run / "predictions.jsonl").read_text().splitlines()
        return {r["key"]: r for r in map(json.loads, lines)}

    ours, theirs = records("torch"), records("ort")
    assert sorted(ours) == sorted(theirs) == sorted(str(p) for p in src.iterdir())
    total = 0
    for key, record in ours.items():
        other = theirs[key]
        assert (record["height"], record["width"]) == (other["height"], other["width"])
        assert len(record["detections"]) == len(other["detections"]) > 0, key
        for a, b in zip(record["detections"], other["detections"], strict=True):
            assert (a["label"], a["name"], a["category_id"]) == (b["label"], b["name"], b["category_id"])
            assert a["score"] == pytest.approx(b["score"], abs=2e-5)
            assert a["bbox"] == pytest.approx(b["bbox"], abs=0.011)  # rounded to 0.01 px
            total += 1
    assert {d["name"] for r in ours.values() for d in r["detections"]} <= set(NAMES.values())
    coco = [json.loads((tmp_path / run / "detections.json").read_text()) for run in ("torch", "ort")]
    assert len(coco[0]) == len(coco[1]) == total
    drawings = [sorted(p.name for p in (tmp_path / run / "images").iterdir()) for run in ("torch", "ort")]
    assert drawings[0] == drawings[1] == [f"{i}.jpg" for i in range(5)]


def test_evaluate_backends_agree(base, base_onnx, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`dabdetr evaluate --backend onnxruntime` on the exported file gives the PyTorch model's
    detections and COCO metrics, at the resize stored with the model."""
    import json

    from dabdetr.cli import main

    images = tmp_path / "images"
    images.mkdir()
    entries, annotations = [], []
    for i, (w, h) in enumerate([(64, 48), (50, 70), (96, 40), (64, 64)]):
        _noise_image(images / f"{i}.png", (w, h), seed=10 + i)
        entries.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 2 * (i % 5) + 2,
                            "bbox": [4.0, 6.0, 24.0, 18.0], "area": 432.0, "iscrowd": 0})
    categories = [{"id": 2 * (k + 1), "name": name} for k, name in NAMES.items()]
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps({"images": entries, "annotations": annotations,
                               "categories": categories}))
    common = ["--val-json", str(ann), "--images", str(images), "--num-select", "12",
              "--num-workers", "0"]
    assert main(["evaluate", "--weights", str(base[1]), "--device", "cpu", *common,
                 "--out", str(tmp_path / "torch")]) == 0
    assert main(["evaluate", "--weights", str(base_onnx[1]), "--backend", "onnxruntime",
                 *common, "--out", str(tmp_path / "ort")]) == 0
    capsys.readouterr()
    ours, theirs = (json.loads((tmp_path / run / "detections.json").read_text())
                    for run in ("torch", "ort"))
    assert len(ours) == len(theirs) == 4 * 12
    for a, b in zip(ours, theirs, strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=2e-5)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("torch", "ort")]
    assert metrics[0]["AP50"] == pytest.approx(metrics[1]["AP50"], abs=1e-6)
    assert metrics[0]["AP"] == pytest.approx(metrics[1]["AP"], abs=1e-6)
    # PyTorch-only options are refused by name
    code = main(["evaluate", "--weights", str(base_onnx[1]), "--backend", "onnxruntime",
                 "--optimize", "fused", *common])
    assert code == 2 and "--optimize" in capsys.readouterr().err


def test_onnxruntime_backend_refuses_pytorch_options(cli_onnx: CliRun, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from dabdetr.cli import main

    onnx_path = cli_onnx.path
    _noise_image(tmp_path / "a.png", (32, 32), seed=0)
    code = main(["predict", str(tmp_path / "a.png"), "--weights", str(onnx_path), "--backend",
                 "onnxruntime", "--optimize", "fused", "--out", str(tmp_path / "out")])
    assert code == 2 and "--optimize" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # a file that is not an ONNX export is refused by name, as a user's mistake
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    code = main(["predict", str(tmp_path / "a.png"), "--weights", str(tmp_path / "bad.onnx"),
                 "--backend", "onnxruntime", "--out", str(tmp_path / "out")])
    assert code == 2 and "bad.onnx" in capsys.readouterr().err


def test_onnxruntime_backend_without_onnxruntime_names_the_extra(
        cli_onnx: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from dabdetr.cli import main

    _noise_image(tmp_path / "a.png", (32, 32), seed=0)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    code = main(["predict", str(tmp_path / "a.png"), "--weights", str(cli_onnx.path),
                 "--backend", "onnxruntime", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "dabdetr[export]" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

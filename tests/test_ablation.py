"""benchmarks/ablation.py as a smoke test: two variants, one seed, a budget of a few steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from _util import tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_smoke_equal_budget_json_table_plot_and_continuation(tmp_path):
    ablation = _ablation()
    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "report"
    argv = ["--data", str(data), "--variants", "dab", "detr", "--seeds", "0",
            "--eval-every", "4", "--preset", "cpu-tiny", "--set", "batch_size=4",
            "image_size=64", "--device", "cpu", "--out", str(tmp_path / "runs"),
            "--json", str(out.with_suffix(".json")), "--table", str(out.with_suffix(".md")),
            "--plot", str(out.with_suffix(".png"))]
    ablation.main(argv + ["--budget", "8", "--peaks", "3"])
    doc = json.loads(out.with_suffix(".json").read_text())
    peaks = doc["peaks"]
    layers = range(len({p["layer"] for p in peaks}))
    assert sorted((p["variant"], p["reference"], p["layer"]) for p in peaks) == sorted(
        [("dab", ref, i) for ref in ("anchor", "box") for i in layers]
        + [("detr", "box", i) for i in layers])  # a detr model has no anchors
    assert all(p["images"] == 3 and p["top"] == 10
               and 0.9 * p["images_at_least_90"] <= p["share_within"] + 1e-9
               and 0 <= p["share_within"] <= 1 and len(p["per_head_share_within"]) == 4
               and all(0 <= h <= 1 for h in p["per_head_share_within"]) for p in peaks)
    assert "| detr | box |" in out.with_suffix(".md").read_text()
    runs = doc["runs"]
    assert sorted((r["variant"], r["images_seen"]) for r in runs) == [
        ("dab", 4), ("dab", 8), ("detr", 4), ("detr", 8)]
    assert all(0 <= r["AP"] <= 1 and 0 <= r["AP50"] <= 1 and r["seed"] == 0 for r in runs)
    assert doc["setting"]["variants"]["detr"]["query_type"] == "detr"
    assert doc["setting"]["budget_images"] == 8 and "ablation.py" in doc["setting"]["command"]
    table = out.with_suffix(".md").read_text()
    assert "| dab | 1 |" in table and "| detr | 1 |" in table and "AP50 @ 8" in table
    assert out.with_suffix(".png").stat().st_size > 0
    # each run's model is the variant's, trained to the same number of images
    from dabdetr.weights.loading import load_model

    detr = load_model(tmp_path / "runs" / "detr-seed0" / "last.pt")
    assert detr.config.query_type == "detr" and not detr.config.two_stage
    # a larger budget continues a run: earlier evaluations are kept, one more is added
    argv.remove("detr")
    ablation.main(argv + ["--budget", "12"])
    again = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert again[:2] == [r for r in runs if r["variant"] == "dab"]
    assert [(r["variant"], r["images_seen"]) for r in again[2:]] == [("dab", 12)]


def test_backbone_from_starts_every_run_from_a_trained_models_resnet(tmp_path):
    import pytest
    import torch
    from _util import tiny_config

    import dabdetr

    ablation = _ablation()
    torch.manual_seed(0)
    source = dabdetr.DabDetr(tiny_config())
    dabdetr.save_model(source, tmp_path / "trained")
    path = ablation.backbone_from(str(tmp_path / "trained"), tmp_path / "runs")
    written = torch.load(path, weights_only=True)
    expected = source.backbone.body.state_dict()
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    # a missing source stops the benchmark with its name, before any data or training
    with pytest.raises(SystemExit, match="--backbone-from .*absent"):
        ablation.main(["--backbone-from", str(tmp_path / "absent"), "--out",
                       str(tmp_path / "runs2"), "--device", "cpu"])
    assert not (tmp_path / "runs2" / "data").exists()


def test_peak_counts_must_be_sensible(capsys):
    import pytest

    ablation = _ablation()
    for argv, flag in ((["--peaks", "-1"], "--peaks"), (["--peaks", "5", "--peaks-top", "0"],
                                                         "--peaks-top")):
        with pytest.raises(SystemExit) as stop:
            ablation.parse_args(argv)
        assert stop.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert ablation.parse_args(["--peaks", "5"]).peaks_top == 10

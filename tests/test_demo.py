"""`dabdetr demo` end to end at a tiny size, and its handling of output folders."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import dabdetr
from dabdetr.cli import main
from dabdetr.demo import DemoError, run_demo

TINY = dict(preset="cpu-tiny", minutes=5, max_steps=3, num_train=16, num_val=4, progress=False)


def test_demo_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--preset", "cpu-tiny", "--max-steps", "3",
                 "--train-images", "16", "--val-images", "4", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "DAB-DETR demo: AP" in printed and "predictions.png" in printed
    summary = json.loads((out / "demo.json").read_text())
    assert summary["steps"] == 3
    # the AP reported is the last evaluation of the run, as its metrics log recorded it
    log = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in log if r["type"] == "epoch" and "AP" in r]
    assert evaluated and summary["AP"] == evaluated[-1]["AP"]
    assert summary["AP50"] == evaluated[-1]["AP50"]
    assert "from scratch" in summary["started_from"]
    for name in ("predictions.png", "curves.png"):
        with Image.open(out / name) as img:
            img.verify()
    model = dabdetr.load_model(out / "model")
    assert model.config.num_classes == 6 and model.config.label_name(0) == "circle"
    assert (out / "train" / "last.pt").is_file() and (out / "train" / "metrics.jsonl").is_file()


def test_demo_refuses_to_overwrite_a_previous_run(tmp_path):
    out = tmp_path / "demo"
    run_demo(out, **TINY)
    before = (out / "train" / "last.pt").read_bytes()
    with pytest.raises(DemoError, match="previous demo run"):
        run_demo(out, **TINY)
    assert (out / "train" / "last.pt").read_bytes() == before
    # explicit resume continues the same run
    resumed = run_demo(out, resume=True, **{**TINY, "max_steps": 5})
    assert resumed["resumed"] and resumed["steps"] == 5


def test_demo_refuses_foreign_non_empty_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError, match="not empty"):
        run_demo(out, **TINY)
    assert (out / "thesis.tex").read_text() == "precious"


def test_demo_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker / "sub"), "--no-progress"]) == 2
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(DemoError, match="not a directory"):
        run_demo(blocker, **TINY)


def test_every_convergence_recipe_is_a_valid_training_configuration():
    """benchmarks/convergence.py's recipes (the demo's ablations) name real `TrainConfig` fields,
    model presets and model fields; a typo there would only show after minutes of training."""
    import importlib.util
    from dataclasses import fields
    from pathlib import Path

    from dabdetr.config import DabDetrConfig
    from dabdetr.demo import DEMO_RECIPE
    from dabdetr.engine.config import TrainConfig
    from dabdetr.presets import preset_config

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "convergence.py"
    spec = importlib.util.spec_from_file_location("convergence", path)
    convergence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convergence)
    assert convergence.RECIPES["demo"] == DEMO_RECIPE
    train_fields = {f.name for f in fields(TrainConfig)}
    model_fields = {f.name for f in fields(DabDetrConfig)}
    for name, recipe in convergence.RECIPES.items():
        assert set(recipe) <= train_fields, (name, set(recipe) - train_fields)
        assert set(recipe["model_overrides"]) <= model_fields, name
        preset_config(recipe["model"], **recipe["model_overrides"])
        TrainConfig(data="data", out="out", **recipe)


def test_demo_loads_data_in_the_training_process_on_a_small_cpu(monkeypatch):
    from dabdetr.demo import loader_workers

    assert loader_workers("cpu", cpus=2) == 0
    assert loader_workers("cpu", cpus=1) == 0
    assert loader_workers("cpu", cpus=16) == 1
    assert loader_workers("cuda", cpus=2) == 1
    from dabdetr.data import synthetic

    for cpus, expected in ((2, 0), (8, 1)):  # without `cpus`: this machine's count decides
        monkeypatch.setattr(synthetic, "available_cpus", lambda n=cpus: n)
        assert loader_workers("cpu") == expected

"""DAB-Deformable-DETR through the training engine on a tiny generated dataset (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _util import tiny_cfg, tiny_dataset

import dabdetr
from dabdetr.cli import main
from dabdetr.engine.train import Trainer
from dabdetr.models.dab_deformable_detr import DabDeformableDetr
from dabdetr.presets import preset_config

TINY = {"hidden_dim": 64, "nheads": 4, "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 128,
        "num_queries": 10, "enc_n_points": 2, "dec_n_points": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def test_presets_build_the_deformable_model():
    cfg = preset_config("dab-deformable-detr-r50")
    assert (cfg.num_queries, cfg.num_feature_levels, cfg.enc_layers) == (300, 4, 6)
    small = preset_config("dab-deformable-cpu-small", **TINY)
    assert small.hidden_dim == 64 and small.backbone == "resnet18"


@pytest.mark.slow
def test_overfits_small_dataset_through_cli(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    code = main(["train", "--data", str(data_dir), "--out", str(out),
                 "--model", "dab-deformable-cpu-small", *sets, "--val-split", "train",
                 "--epochs", "1000", "--max-steps", "60", "--batch-size", "8", "--lr", "1e-3",
                 "--lr-backbone", "1e-3", "--lr-drop", "--image-size", "64", "--no-crop",
                 "--no-flip", "--num-workers", "0", "--eval-every", "1000", "--seed", "1",
                 "--no-progress"])
    assert code == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [h for h in history if h["type"] == "epoch"][-1]
    assert final["AP50"] > 0.3 and final["AP"] > 0.1, final  # chance is ~0.0
    model = dabdetr.load_model(out / "best.pt")  # a training checkpoint is a weight source
    assert isinstance(model, DabDeformableDetr) and model.config.num_classes == 6


def test_resume_continues_exactly(data_dir, tmp_path):
    def cfg(out, steps):
        return tiny_cfg(data_dir, tmp_path / out, model="dab-deformable-cpu-small",
                        model_overrides=TINY, max_steps=steps, deterministic=True)

    full = Trainer(cfg("full", 3))
    assert full.criterion.enc_class_agnostic  # the family's rule for two-stage proposals
    full.fit()
    Trainer(cfg("split", 1)).fit()
    resumed = Trainer(cfg("split", 3), resume=str(tmp_path / "split" / "last.pt"))
    assert resumed.step == 1 and isinstance(resumed.model, DabDeformableDetr)
    resumed.fit()
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    for key, value in full_state.items():
        assert torch.equal(value, resumed_state[key]), key
    # a training checkpoint records its model type: load_model builds the right class
    assert isinstance(dabdetr.load_model(tmp_path / "split" / "last.pt"), DabDeformableDetr)


def test_convert_and_predict_cli(data_dir, tmp_path):
    from dabdetr.weights import deformable

    torch.manual_seed(0)
    model = DabDeformableDetr(preset_config("dab-deformable-cpu-small", **TINY))
    torch.save({"model": deformable.ours_to_official(model.state_dict())}, tmp_path / "theirs.pth")
    assert main(["convert", str(tmp_path / "theirs.pth"), str(tmp_path / "ours"),
                 "--set", "backbone=resnet18", "nheads=4"]) == 0
    assert isinstance(dabdetr.load_model(tmp_path / "ours"), DabDeformableDetr)
    images = sorted((data_dir / "train").glob("*.*"))[:2] or sorted(data_dir.rglob("*.png"))[:2]
    assert main(["predict", *map(str, images), "--weights", str(tmp_path / "ours"),
                 "--out", str(tmp_path / "pred"), "--device", "cpu", "--size", "64",
                 "--threshold", "0.0", "--num-select", "5", "--no-draw"]) == 0
    assert any((tmp_path / "pred").iterdir())


@pytest.mark.parametrize("family", ["deformable", "dab"])
def test_top_k_defaults_to_the_authors_per_family(family, data_dir, tmp_path):
    """Without --num-select, evaluate and predict keep the authors' top-k (query, class) pairs
    per image: 100 for DAB-Deformable-DETR (their deformable PostProcess), 300 for DAB-DETR."""
    from _util import tiny_config, tiny_deformable_config

    from dabdetr.inference import Predictor
    from dabdetr.model_types import build_model

    # 80 queries x 6 classes (the dataset's contiguous ids): more pairs than either top-k
    size = {"num_queries": 80, "num_classes": 6}
    config, expected = {"deformable": (tiny_deformable_config(**size), 100),
                        "dab": (tiny_config(**size), 300)}[family]
    torch.manual_seed(0)
    dabdetr.save_model(build_model(config).eval(), tmp_path / "w")
    assert main(["evaluate", "--weights", str(tmp_path / "w"), "--data", str(data_dir),
                 "--device", "cpu", "--size", "64", "--num-workers", "0",
                 "--out", str(tmp_path / "eval")]) == 0
    detections = json.loads((tmp_path / "eval" / "detections.json").read_text())
    per_image: dict[int, int] = {}
    for d in detections:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert set(per_image.values()) == {expected}
    predictor = Predictor(dabdetr.load_model(tmp_path / "w"), threshold=0.0, device="cpu")
    image = dabdetr.data.io.load_image_rgb(sorted((data_dir / "val").glob("*.*"))[0])
    assert len(predictor([image])[0]) == expected

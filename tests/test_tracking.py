"""Experiment trackers write what a user opens: TensorBoard events, an MLflow run, a W&B run."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from _util import tiny_cfg

from dabdetr.data.synthetic import generate_dataset
from dabdetr.engine.tracking import open_trackers, parse_trackers
from dabdetr.engine.trainer import Trainer

PICTURE = np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3)


def _log_some(trackers) -> None:
    trackers.log_config({"lr": 1e-4, "model_overrides": {"num_queries": 10}, "lr_drop": [40]})
    for step in (1, 2, 3):
        trackers.log_metrics(step, {"train/loss": 1.0 / step, "lr": 1e-4, "note": "skipped"})
    trackers.log_image(3, "val/predictions", PICTURE)
    trackers.close()


def test_tracker_names_are_checked(tmp_path):
    assert parse_trackers("") == []
    assert parse_trackers("tensorboard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    with pytest.raises(ValueError, match="unknown --log tracker 'comet'"):
        parse_trackers("tensorboard,comet")
    with pytest.raises(ValueError, match="uint8"):
        open_trackers("tensorboard", tmp_path).log_image(0, "x", PICTURE.astype(np.float32))


def test_tensorboard_event_file_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_some(open_trackers("tensorboard", tmp_path))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([1.0, 0.5, 1 / 3])
    assert events.Images("val/predictions")[0].width == 32
    assert "num_queries" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_mlflow_run_in_local_store(tmp_path):
    from mlflow.tracking import MlflowClient

    trackers = open_trackers("mlflow", tmp_path, run_name="tiny")
    uri = trackers.trackers[0].tracking_uri
    _log_some(trackers)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dabdetr").experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([1.0, 0.5, 1 / 3])
    assert run.data.params["model_overrides.num_queries"] == "10"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "val"}
    (picture,) = client.list_artifacts(run.info.run_id, "val/predictions")
    assert picture.path.endswith("step_00000003.png")
    config = json.loads(next((tmp_path / "mlartifacts").rglob("config.json")).read_text())
    assert config["lr_drop"] == [40]


def test_wandb_offline_run_directory(tmp_path):
    _log_some(open_trackers("wandb", tmp_path, run_name="tiny"))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (records,) = run_dir.glob("run-*.wandb")
    # wandb's service process may still be writing the record file when finish() returns
    deadline = time.monotonic() + 20
    while b"train/loss" not in records.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    data = records.read_bytes()
    assert b"train/loss" in data and b"num_queries" in data
    (image,) = (run_dir / "files" / "media" / "images").rglob("*.png")
    from PIL import Image

    assert Image.open(image).size == (32, 24)


def test_training_logs_losses_ap_and_a_picture(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = generate_dataset(tmp_path / "data", num_train=4, num_val=2, seed=1,
                            difficulty="easy", image_size=64, progress=False)["out_dir"]
    cfg = tiny_cfg(data, tmp_path / "run", max_steps=2, batch_size=2, log_every=1,
                   eval_every=1, log="tensorboard")
    Trainer(cfg).fit()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "lr", "val/AP", "val/AP50"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert events.Images("val/predictions")
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # the JSONL log stays
    assert (tmp_path / "run" / "curves.png").is_file()

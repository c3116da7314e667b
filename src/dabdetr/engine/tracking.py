"""Experiment trackers behind one small interface: TensorBoard, MLflow, Weights & Biases.

`open_trackers("tensorboard,mlflow", out_dir)` returns a `Trackers` that forwards
``log_config``, ``log_metrics``, ``log_image`` and ``close`` to each one asked for. All three
write locally and never reach the network:

- tensorboard: event files in ``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``);
- mlflow: a run of experiment "dabdetr" in a local store: the SQLite file ``OUT/mlflow.db``
  with artifacts in ``OUT/mlartifacts`` (``mlflow ui --backend-store-uri
  sqlite:///OUT/mlflow.db``). MLflow 3 refuses its plain-folder store unless an environment
  variable allows it, and recommends SQLite for local use; a library must not set the
  variable for its users, so the SQLite store it is;
- wandb: an offline run in ``OUT/wandb/offline-run-*`` (``wandb sync OUT/wandb/offline-run-*``
  uploads it later, if wanted).

Each needs its package (``pip install 'dabdetr[tensorboard]'``, ``[mlflow]``, ``[wandb]``);
asking for one that is not installed is a ValueError that says so, before training starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["TRACKERS", "Tracker", "Trackers", "open_trackers", "parse_trackers"]

TRACKERS: tuple[str, ...] = ("tensorboard", "mlflow", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
_EXTRA_MODULES = {"mlflow": ("sqlalchemy", "alembic")}  # its SQLite store's


class Tracker(Protocol):
    """What the training loop logs to."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The run's configuration (plain JSON-able data), once at the start."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars (losses, lr, AP ...) at an optimizer step."""

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        """An image, uint8 [H, W, 3] RGB, at a step."""

    def close(self) -> None:
        """Flush and finish the run."""


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Event files via torch.utils.tensorboard in ``OUT/tensorboard``."""

    def __init__(self, out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = out_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = "```\n" + json.dumps(dict(config), indent=2, default=str) + "\n```"
        self.writer.add_text("config", text, 0)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """A run of experiment "dabdetr" in the local MLflow store ``OUT/mlflow.db`` (SQLite),
    artifacts in ``OUT/mlartifacts``."""

    def __init__(self, out_dir: Path, run_name: str | None) -> None:
        from mlflow.tracking import MlflowClient

        out_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = f"sqlite:///{(out_dir / 'mlflow.db').resolve().as_posix()}"
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name("dabdetr")
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(
                             "dabdetr", artifact_location=(out_dir / "mlartifacts").resolve()
                             .as_uri()))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in _flatten(config).items()]
        for start in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_dict(self.run_id, dict(config), "config.json")

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, v, now, step) for k, v in _scalars(metrics).items()]
        if entries:
            self.client.log_batch(self.run_id, metrics=entries)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"{name}/step_{step:08d}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """An offline Weights & Biases run in ``OUT/wandb`` (never contacts a server)."""

    def __init__(self, out_dir: Path, run_name: str | None) -> None:
        import wandb

        self._wandb = wandb
        out_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project="dabdetr", name=run_name, dir=str(out_dir),
                              mode="offline", reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(_scalars(metrics), step=step)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.run.log({name: self._wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Several trackers as one (none: every call does nothing)."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_config(config)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for t in self.trackers:
            t.log_metrics(step, metrics)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"log_image takes uint8 [H, W, 3] RGB, got {image.dtype} "
                             f"{list(image.shape)}")
        for t in self.trackers:
            t.log_image(step, name, image)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []


def parse_trackers(value: str | Sequence[str] | None) -> list[str]:
    """``"tensorboard,mlflow"`` (or a list) -> checked, de-duplicated names; "" -> []."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names = []
    for item in (i.strip().lower() for i in items):
        if not item or item in names:
            continue
        if item not in TRACKERS:
            raise ValueError(f"unknown --log tracker {item!r}; use any of {', '.join(TRACKERS)} "
                             "separated by commas")
        needed = (_PACKAGES[item], *_EXTRA_MODULES.get(item, ()))
        if any(importlib.util.find_spec(m) is None for m in needed):
            raise ValueError(f"--log {item} needs the packages {', '.join(needed)}: pip "
                             f"install 'dabdetr[{item}]'")
        names.append(item)
    return names


def open_trackers(value: str | Sequence[str] | None, out_dir: str | os.PathLike[str],
                  run_name: str | None = None) -> Trackers:
    """Open the trackers named in ``value`` (see `parse_trackers`), writing under ``out_dir``."""
    out = Path(out_dir)
    opened: list[Tracker] = []
    for name in parse_trackers(value):
        if name == "tensorboard":
            opened.append(TensorBoardTracker(out))
        elif name == "mlflow":
            opened.append(MlflowTracker(out, run_name))
        else:
            opened.append(WandbTracker(out, run_name))
    return Trackers(opened)

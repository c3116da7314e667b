"""What a `train` command continues from and with: `--resume auto|PATH` resolved to a
checkpoint, the settings stored in it (model, recipe, data) restored, a flag that contradicts
them refused, and a fresh run kept from writing over another run's folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dabdetr.engine.checkpoint import read_checkpoint
from dabdetr.engine.config import TrainConfig
from dabdetr.errors import BadWeightsError, OutputExistsError, UserError

# the fields a resumed run may change: how long it goes on, where it writes, how it evaluates
# and logs; every other field (model, recipe, data) is the checkpoint's
RUN_FIELDS = frozenset({"out", "epochs", "max_steps", "time_limit", "eval_every",
                        "eval_batch_size", "num_select", "num_workers", "log_every", "progress",
                        "weights", "backbone_weights"})
# what marks a folder as holding a run
RUN_FILES = ("last.pt", "metrics.jsonl")


def resume_path(resume: str | None, out: str) -> Path | None:
    """The checkpoint `--resume` names: None for no resume; for "auto", OUT/last.pt when it
    exists (None otherwise: a fresh start); else the path, which must exist."""
    if resume is None:
        return None
    if resume == "auto":
        last = Path(out) / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"--resume {resume}: no such checkpoint; give a run's last.pt, or "
                        "--resume auto to continue OUT/last.pt when it exists")
    return path


def differences(saved: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint value, given value) for each given flag that contradicts `saved`
    (a checkpoint's train_config); a model override only where it is given."""
    found = []
    for name, value in given.items():
        if name in RUN_FIELDS:
            continue
        if name == "model_overrides":
            stored = saved.get(name) or {}
            found += [(f"model_overrides.{k}", stored.get(k, "(not set)"), v)
                      for k, v in value.items() if stored.get(k, object()) != v]
        elif name in saved and saved[name] != value:
            found.append((name, saved[name], value))
    return found


def resumed_config(path: Path, given: dict[str, Any], out_given: bool) -> TrainConfig:
    """The TrainConfig a run resumed from checkpoint `path` trains with: the checkpoint's
    settings, the given run fields (RUN_FIELDS) over them, OUT the checkpoint's folder unless
    given. UserError listing the differences when a given flag contradicts the checkpoint."""
    try:
        saved = read_checkpoint(path).get("train_config")
    except ValueError as err:
        raise BadWeightsError(f"--resume {path}: {err}") from None
    if not isinstance(saved, dict):  # a checkpoint without its settings: the flags say all
        if "data" not in given:
            raise UserError(f"{path} does not hold its training settings; repeat the run's "
                            "flags (--data ...) to resume it")
        return TrainConfig(**given)
    found = differences(saved, given)
    if found:
        listed = "; ".join(f"{name}: checkpoint {old!r}, given {new!r}" for name, old, new in found)
        raise UserError(f"--resume {path}: the given flags contradict the checkpoint's settings "
                        f"({listed}); leave them out to continue the run as it was trained, or "
                        "start a new run with another --out")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in fields}
    values.update({k: v for k, v in given.items() if k in RUN_FIELDS})
    if not out_given:
        values["out"] = str(path.parent)
    return TrainConfig(**values)


def check_fresh_out(out: str, force: bool) -> None:
    """OutputExistsError when `out` holds another run and not `force`: resuming is the way to
    go on with it."""
    found = [name for name in RUN_FILES if (Path(out) / name).exists()]
    if found and not force:
        raise OutputExistsError(
            f"{out} holds another run ({', '.join(found)}); continue it with --resume auto "
            f"(or --resume {Path(out) / 'last.pt'}), choose another --out, or pass --force to "
            "train a new run there")

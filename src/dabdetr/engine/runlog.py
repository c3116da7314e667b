"""A run's metrics log (metrics.jsonl: one JSON record a line) and its curves plot."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class RunLog:
    """The metrics.jsonl of a run in `folder`: one JSON record a line, appended to (a resumed
    run goes on writing the same file); only the main process writes, and a record that
    cannot be written (full disk, read-only folder) is a warning, not the end of the run."""

    def __init__(self, folder: Path, write: bool = True):
        self.path, self.write = Path(folder) / "metrics.jsonl", write

    def append(self, record: dict[str, Any]) -> None:
        if not self.write:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk or read-only folder: the run goes on without it
            logger.warning("metrics record not written to %s: %s", self.path,
                           err.strerror or err)


def read_log(path: Path, record_type: str = "step",
             keep: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
    """The records of one type ("step" or "epoch") of a run's metrics.jsonl, in step order:
    empty if there is none. The file is appended to, so it may also hold the records a resumed
    run repeated after its checkpoint, or an earlier run's in the same folder: read from the
    end, only records whose step comes before the one after them are kept. `keep` selects
    records before that (e.g. only evaluated ones). A line that does not parse (a run killed
    mid-write, or one still writing) is skipped with a warning."""
    if not path.exists():
        return []
    records, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            bad += 1
            continue
        if (isinstance(record, dict) and record.get("type") == record_type
                and isinstance(record.get("step"), int) and (keep is None or keep(record))):
            records.append(record)
    if bad:
        logger.warning("%s: skipped %d unreadable line(s)", path, bad)
    kept: list[dict[str, Any]] = []
    for record in reversed(records):
        if not kept or record["step"] < kept[-1]["step"]:
            kept.append(record)
    return kept[::-1]


def plot_history(history: list[dict[str, Any]], path: Path,
                 steps: Sequence[dict[str, Any]] = ()) -> None:
    """Training losses and validation AP against images seen, as a PNG.

    `history`: the epoch records (their mean losses, and AP where evaluated); `steps`: the step
    records of metrics.jsonl, logged every `log_every` steps, which draw the losses densely
    where given. A run stopped by its time limit ends with a partial epoch: on the images-seen
    axis it is a point of its own rather than a second point at the same epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history and not steps:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = (("loss", "total (weighted, every layer)"), ("loss_ce", "class (focal)"),
             ("loss_bbox", "L1"), ("loss_giou", "GIoU"))
    for key, label in names:
        if steps:
            pts = [(r["images_seen"] / 1000, r[key]) for r in steps if key in r]
            style = {"linewidth": 1}
        else:
            pts = [(h["images_seen"] / 1000, h[f"train_{key}"]) for h in history
                   if f"train_{key}" in h]
            style = {"marker": "o"}
        if pts:
            ax1.plot(*zip(*pts, strict=True), label=label, **style)
    ax1.set_xlabel("thousand images seen")
    ax1.set_ylabel("training loss (parts: last decoder layer)")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3)
    ax1.legend()
    for key in ("AP", "AP50"):
        pts = [(h["images_seen"] / 1000, h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker="o", label=key)
            x, y = pts[-1]
            ax2.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax2.set_xlabel("thousand images seen")
    ax2.set_ylabel("validation COCO")
    ax2.set_xlim(left=0)
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

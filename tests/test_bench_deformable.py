"""benchmarks/bench_deformable.py runs each mode in its --tiny smoke form (no timing assertions)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_deformable.py"
RATIO = re.compile(r"^ratio transformers/ours: [\d.]+x \(best\)", re.MULTILINE)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=600)


def _row_sides(stdout: str, header: str) -> list[str]:
    """The side names of the rows under the table header line that starts with `header`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(header))
    sides = []
    for line in lines[start + 1:]:
        if not line.startswith("  ") or line.startswith("  ("):
            break
        sides.append(line.split()[0])
    return sides


def test_tiny_inference_times_ours_and_transformers_with_memory():
    result = _run("--memory")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("# ") and "torch" in out.splitlines()[0]  # the machine line first
    assert "inference at 128x160, batch 1" in out
    assert _row_sides(out, "side ") == ["ours", "transformers"]
    assert RATIO.search(out), out
    memory = out.split("peak memory of one forward")[1]
    assert _row_sides(memory, "side") == ["ours", "transformers"], memory


def test_tiny_training_step_of_both_sides_with_memory():
    result = _run("--train", "--memory")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "training step, batch 2 at 128x128" in out
    losses = dict(re.findall(r"(ours|transformers) ([-\d.naninf]+)",
                             out.split("# first-step loss: ")[1].splitlines()[0]))
    assert set(losses) == {"ours", "transformers"}
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in losses.values()), losses
    counts = dict(re.findall(r"(ours|transformers) ([\d,]+)",
                             out.split("# trainable parameters: ")[1].splitlines()[0]))
    assert all(int(v.replace(",", "")) > 0 for v in counts.values()), counts
    assert RATIO.search(out), out
    memory = out.split("peak memory of one step")[1]
    assert _row_sides(memory, "side") == ["ours", "transformers"], memory


def test_tiny_presets_time_both_presets_at_both_sizes():
    result = _run("--presets")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^  (dab-deformable-\S+) (\d+) +[\d.]+ +[\d.]+ +([\d.]+) +([\d.]+)$",
                      result.stdout, re.MULTILINE)
    assert [(preset, side) for preset, side, *_ in rows] == [
        ("dab-deformable-detr-r50", "64"), ("dab-deformable-detr-r50", "96"),
        ("dab-deformable-cpu-small", "64"), ("dab-deformable-cpu-small", "96")], result.stdout
    assert all(float(best) >= float(median) > 0 for *_, best, median in rows)


def test_authors_repo_that_is_not_a_checkout_is_refused(tmp_path):
    result = _run("--authors-repo", str(tmp_path))
    assert result.returncode != 0
    assert "expected a checkout of https://github.com/IDEA-Research/DAB-DETR" in result.stderr

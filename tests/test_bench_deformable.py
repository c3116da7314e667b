"""benchmarks/bench_deformable.py runs each mode in its --tiny smoke form (no timing assertions)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_deformable.py"
RATIO = re.compile(r"^ratio transformers/ours: [\d.]+x \(best\)", re.MULTILINE)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


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


def test_tiny_inference_times_ours_and_transformers():
    result = _run()
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("# ") and "torch" in out.splitlines()[0]  # the machine line first
    assert "inference at 128x160, batch 1" in out
    assert _row_sides(out, "side") == ["ours", "transformers"]
    assert RATIO.search(out), out
    assert re.search(r"^# matmul peak .*\d+ GFLOP/s before the rounds, \d+ after", out,
                     re.MULTILINE), out
    assert "peak memory" not in out  # --tiny measures no memory unless asked


def test_tiny_training_step_of_both_sides():
    result = _run("--train")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "training step, batch 2 at 128x128" in out
    losses = dict(re.findall(r"(ours|transformers) ([-\d.naninf]+)",
                             out.split("# first-step loss: ")[1].splitlines()[0]))
    assert set(losses) == {"ours", "transformers"}
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in losses.values()), losses
    counts = dict(re.findall(r"(ours|transformers) ([\d,]+)",
                             out.split("# trainable parameters: ")[1].splitlines()[0]))
    assert set(counts) == {"ours", "transformers"}
    assert all(int(v.replace(",", "")) > 0 for v in counts.values()), counts
    assert _row_sides(out, "side") == ["ours", "transformers"]
    assert RATIO.search(out), out


@pytest.mark.slow
def test_tiny_peak_memory_per_side():
    """Inference and training each measure every side once more in a child process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {mode: subprocess.Popen(
        [sys.executable, str(SCRIPT), "--tiny", "--threads", "1", "--memory", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for mode, extra in {"forward": [], "step": ["--train"]}.items()}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        memory = out.split(f"peak memory of one {mode}")[1]
        assert "peak growth MiB" in memory.splitlines()[1], memory
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

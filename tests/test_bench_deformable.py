"""benchmarks/bench_deformable.py runs in its --tiny smoke mode (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_deformable.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--reps", "1",
                           "--warmup", "0", *args], capture_output=True, text=True, timeout=600)


def test_tiny_run_prints_our_timing():
    result = _run()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "inference at 128x160" in result.stdout
    assert any(line.strip().startswith("ours") for line in result.stdout.splitlines())


def test_authors_repo_that_is_not_a_checkout_is_refused(tmp_path):
    result = _run("--authors-repo", str(tmp_path))
    assert result.returncode != 0
    assert "expected a checkout of https://github.com/IDEA-Research/DAB-DETR" in result.stderr

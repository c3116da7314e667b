"""The benchmark scripts run end to end in their --tiny smoke mode (no timing assertions)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ("bench_inference.py", "bench_train.py", "bench_matcher.py")
RATIO = re.compile(r"^ratio .*\d+(\.\d+)?x", re.MULTILINE)


def _run_all(extra: list[str]) -> dict[str, subprocess.CompletedProcess]:
    """Start the scripts together (their time is mostly interpreter start-up and imports)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {
        script: subprocess.Popen(
            [sys.executable, str(BENCHMARKS / script), "--tiny", "--threads", "1", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for script in SCRIPTS
        if script != "bench_matcher.py" or not extra
    }
    done = {}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        done[script] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def _check(results: dict[str, subprocess.CompletedProcess]) -> None:
    for script, result in results.items():
        assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"
        assert RATIO.search(result.stdout), f"{script} printed no ratio line:\n{result.stdout}"


def test_benchmarks_tiny():
    _check(_run_all([]))


@pytest.mark.slow
def test_benchmarks_tiny_with_memory():
    results = _run_all(["--memory"])
    _check(results)
    for script, result in results.items():
        assert "peak" in result.stdout, script


def test_authors_repo_that_is_not_a_checkout_is_refused(tmp_path):
    """--authors-repo must point at a DAB-DETR checkout; anything else is named, not imported."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_train.py"), "--tiny", "--threads", "1",
         "--authors-repo", str(tmp_path)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert result.returncode != 0
    assert "models/DAB_DETR/DABDETR.py" in result.stderr and str(tmp_path) in result.stderr

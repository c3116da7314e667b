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
NO_MEMORY_OPTION = ("bench_matcher.py",)
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
        if script not in NO_MEMORY_OPTION or not extra
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
    results = _run_all([])
    _check(results)
    # the host's speed in the same run, which the timings are read against
    assert re.search(r"^# matmul peak .*\d+ GFLOP/s before the steps, \d+ after",
                     results["bench_train.py"].stdout, re.MULTILINE), results["bench_train.py"].stdout
    assert re.search(r"^# matmul peak after these rounds: \d+ GFLOP/s",
                     results["bench_inference.py"].stdout, re.MULTILINE)


@pytest.mark.slow
def test_benchmarks_tiny_with_memory():
    results = _run_all(["--memory"])
    _check(results)
    for script, result in results.items():
        assert "peak" in result.stdout, script
    # what the warm-up forward leaves resident is reported too
    assert "kept MiB" in results["bench_inference.py"].stdout


def test_inexact_modes_tiny():
    """The optional faster modes: int8 and bf16 inference sides, a bf16-autocast training step."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {"bench_inference.py": ["--int8", "--bf16"], "bench_train.py": ["--amp"]}
    procs = {script: subprocess.Popen(
        [sys.executable, str(BENCHMARKS / script), "--tiny", "--threads", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for script, extra in runs.items()}
    outputs = {}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{script} failed:\n{err[-3000:]}"
        outputs[script] = out
    inference = outputs["bench_inference.py"]
    for side in ("ours-int8", "ours-bf16"):
        assert re.search(rf"^ratio transformers/{side}: .*x", inference, re.MULTILINE), inference
        assert f"max abs diff {side} vs transformers" in inference
    assert "bf16 autocast" in outputs["bench_train.py"]
    assert RATIO.search(outputs["bench_train.py"]), outputs["bench_train.py"]


def test_authors_repo_that_is_not_a_checkout_is_refused(tmp_path):
    """--authors-repo must point at a DAB-DETR checkout; anything else is named, not imported."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_train.py"), "--tiny", "--threads", "1",
         "--authors-repo", str(tmp_path)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert result.returncode != 0
    assert "models/DAB_DETR/DABDETR.py" in result.stderr and str(tmp_path) in result.stderr


def _benchmark_module(name: str):
    import importlib

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def test_authors_args_describe_the_config_or_name_what_they_cannot():
    """The authors' main.py options for a config (no checkout needed); a config their code
    has no option for is refused with the field's name."""
    from dabdetr import DabDetrConfig

    authors = _benchmark_module("_authors")
    args = authors.authors_args(DabDetrConfig(dilation=True, num_patterns=3), "cpu")
    assert (args.backbone, args.dilation, args.num_patterns) == ("resnet50", True, 3)
    assert (args.pe_temperatureH, args.transformer_activation, args.dec_layers) == (20, "prelu", 6)
    with pytest.raises(SystemExit, match="two_stage"):
        authors.authors_args(DabDetrConfig(two_stage=True), "cpu")


def test_peer_adamw_kernel_and_backbone_lr():
    """The peers' AdamW: the backbone group gets its lr; fused only when asked (the authors'
    main.py leaves the kernel to torch, --authors-fused-adamw asks for the fused one)."""
    import torch

    bench_train = _benchmark_module("bench_train")
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 1)})
    for fused, expected in ((True, True), (False, None)):
        opt = bench_train._recipe_adamw(model, lambda n: n.startswith("backbone."), fused)
        assert opt.defaults["fused"] is expected
        lrs = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
        assert lrs[bench_train.BACKBONE_LR] == {id(p) for p in model["backbone"].parameters()}
        assert lrs[bench_train.LR] == {id(p) for p in model["head"].parameters()}


def test_ratio_line_reports_best_median_paired_and_the_spread_of_rounds():
    common = _benchmark_module("_common")
    line = common.ratio_line("a/b", [2.0, 4.0, 9.0], [1.0, 2.0, 3.0])  # rounds: 2x, 2x, 3x
    assert line == ("ratio a/b: 2.00x (best), 2.00x (median), "
                    "2.00x (paired; rounds 2.00x-3.00x)")
    assert common.ratio_line("a/b", [2.0], [1.0]) == "ratio a/b: 2.00x (best), 2.00x (median)"


def test_child_options_switch_tf32_off_and_reach_the_children():
    """--no-tf32 turns TF32 off for CUDA convolutions and matmuls (a no-op for CPU runs) and is
    handed on to the memory children."""
    import argparse

    import torch

    common = _benchmark_module("_common")
    parser = argparse.ArgumentParser()
    common.add_child_arguments(parser, tiny_size="128x128")
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True
        assert common.apply_child_options(parser.parse_args([])) == []
        assert cudnn.allow_tf32 and matmul.allow_tf32
        off = common.apply_child_options(parser.parse_args(["--no-tf32"]))
        assert off == ["--no-tf32"]
        assert not cudnn.allow_tf32 and not matmul.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_convergence_report_reads_runs_and_titles_the_plot(tmp_path, monkeypatch, capsys):
    """`convergence.py --report-only --title`: the table at fixed images seen from each run's
    evaluated epochs (a half-written last line, as in a run still going, is skipped), and the
    title drawn on the plot; a run without a log gets a row of dashes."""
    import json

    from PIL import Image, ImageChops

    convergence = _benchmark_module("convergence")
    run = tmp_path / "b8-seed0"
    run.mkdir()
    records = [{"type": "epoch", "epoch": e, "step": 500 * e, "images_seen": 4000 * e,
                "minutes": 4.5 * e, "AP": 0.1 * e, "AP50": 0.2 * e} for e in (1, 2)]
    (run / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records) + '\n{"type": "ep')
    (tmp_path / "absent").mkdir()
    monkeypatch.setattr(sys, "argv", ["convergence.py", "--report-only", "--out", str(tmp_path),
                                      "--recipes", "b8-seed0", "absent", "--title", "machine X"])
    convergence.main()
    table = capsys.readouterr().out
    assert "| b8-seed0 | 0.200 / 0.400 | - | 9.0 | 8,000 | 0.200 | 0.400 |" in table
    assert "| absent | - |" in table
    titled = Image.open(tmp_path / "convergence.png").convert("RGB")
    untitled = Image.open(convergence.plot(tmp_path, ["b8-seed0", "absent"])).convert("RGB")
    assert titled.size == untitled.size
    top = (0, 0, titled.width, 40)  # the title's band, above the axes
    assert ImageChops.difference(titled.crop(top), untitled.crop(top)).getbbox() is not None

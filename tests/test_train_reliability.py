"""Training survives the cluster and a user's mistakes (issue 35): out-of-range flags refused
while parsing, a failed checkpoint write that training survives, SIGTERM/SIGINT that write
last.pt and exit 128 + signal, `--resume PATH` alone and `--resume auto`, a restart under
torchrun's elastic agent, a run's folder kept from a new run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _util import tiny_dataset
from test_resume import EXACT, assert_identical

from dabdetr.cli import main
from dabdetr.data.categories import CategoryMap
from dabdetr.engine.evaluate import category_mismatch
from dabdetr.engine.trainer import Trainer
from dabdetr.weights.official import safe_torch_load

TESTS = Path(__file__).resolve().parent
# the tiny run of _util.tiny_cfg, as `dabdetr train` flags (an epoch is 4 steps of 4 images)
TINY = ["--model", "cpu-tiny", "--set", "num_queries=10", "--epochs", "1000", "--batch-size",
        "4", "--lr", "1e-3", "--lr-backbone", "1e-3", "--lr-drop", "--image-size", "64",
        "--no-crop", "--num-workers", "0", "--eval-every", "1000", "--no-progress", "--seed",
        "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("dabdetr ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- defects 3 and 9: counts and times checked while parsing


@pytest.mark.parametrize(("flag", "value"), [
    ("--batch-size", "0"), ("--accumulate", "0"), ("--eval-every", "0"), ("--epochs", "0"),
    ("--time-limit", "-5"), ("--max-steps", "0"), ("--eval-batch-size", "0")])
def test_zero_or_negative_counts_and_times_are_refused_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "d", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be > 0, got {value}" in err and "Traceback" not in err


# -- defect 1: a checkpoint write that fails


def test_failed_checkpoint_write_warns_keeps_the_previous_and_retries(
        data_dir, tmp_path, monkeypatch, caplog):
    """The second last.pt write fails as torch.save fails on a read-only folder: a warning
    names the path, the first last.pt stays, the third write succeeds, training finishes."""
    out, real_save, writes = tmp_path / "run", torch.save, []

    def save(obj, name, *args, **kwargs):
        if ".last.pt." in Path(name).name:
            writes.append(safe_torch_load(out / "last.pt")["step"] if writes else None)
            if len(writes) == 2:
                raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos "
                                   "64 vs 0 open file failed")
        return real_save(obj, name, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", "--data", str(data_dir), "--out", str(out), *TINY,
                 "--epochs", "3"]) == 0
    assert writes == [None, 4, 4]  # before the third write, last.pt was still epoch 1's
    assert f"cannot write {out / 'last.pt'}" in caplog.text
    assert "training goes on" in caplog.text.lower()
    assert safe_torch_load(out / "last.pt")["step"] == 12
    assert not list(out.glob(".*.tmp"))


# -- deliver 4 and defect 10: signals, --resume PATH alone, --resume auto


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(out), *TINY,
                 "--max-steps", "6"]) == 0
    return out / "last.pt"


def _signal_at(monkeypatch, signum: int, step: int) -> None:
    """The process signals itself as it starts optimizer step `step` + 1."""
    take_step = Trainer.train_step

    def train_step(self, batches):
        if self.step == step:
            os.kill(os.getpid(), signum)
        return take_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize(("signum", "resume"), [(signal.SIGTERM, "path"),
                                                (signal.SIGINT, "auto")],
                         ids=["SIGTERM-resume-path", "SIGINT-resume-auto"])
def test_signal_writes_last_pt_exits_128_plus_signal_and_resumes_exactly(
        data_dir, tmp_path, monkeypatch, capsys, uninterrupted, signum, resume):
    out = tmp_path / "run"
    _signal_at(monkeypatch, signum, 2)
    assert main(["train", "--data", str(data_dir), "--out", str(out), *TINY,
                 "--max-steps", "6"]) == 128 + signum
    _one_line_error(capsys.readouterr().err, "last.pt", "--resume")
    stopped = safe_torch_load(out / "last.pt")
    assert (stopped["step"], stopped["batch_in_epoch"]) == (3, 3)  # the step was finished
    monkeypatch.undo()
    torch.manual_seed(12345)
    # PATH alone: the model, recipe and data settings and --out come from the checkpoint
    argv = (["--resume", str(out / "last.pt")] if resume == "path"
            else ["--resume", "auto", "--out", str(out)])
    assert main(["train", *argv]) == 0
    full, resumed = safe_torch_load(uninterrupted), safe_torch_load(out / "last.pt")
    for key in EXACT:
        assert_identical(full[key], resumed[key], key)


def test_resume_refuses_contradicting_flags_listing_them(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(out), *TINY,
                 "--max-steps", "1", "--epochs", "1"]) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "last.pt"), "--lr", "0.5", "--image-size",
                 "128", "--set", "num_queries=20", "--epochs", "5"]) == 2
    _one_line_error(capsys.readouterr().err, "lr: checkpoint 0.001, given 0.5",
                    "image_size: checkpoint 64, given 128",
                    "model_overrides.num_queries: checkpoint 10, given 20")
    assert (out / "last.pt").read_bytes() == before
    # a run's folder is not a new run's: --resume is the way to go on
    assert main(["train", "--data", str(data_dir), "--out", str(out), *TINY]) == 2
    _one_line_error(capsys.readouterr().err, str(out), "--resume auto", "--force")
    assert (out / "last.pt").read_bytes() == before
    assert main(["train", "--resume", str(tmp_path / "nope.pt")]) == 2
    _one_line_error(capsys.readouterr().err, "nope.pt")
    assert main(["train", "--epochs", "2"]) == 2
    _one_line_error(capsys.readouterr().err, "--data")


# -- defect 10: evaluate names classes the model cannot predict


def test_category_mismatch_names_unpredictable_and_renamed_classes():
    model = CategoryMap.contiguous({1: "circle", 2: "square"})
    assert category_mismatch(model, {1: "circle", 2: "square"}) == []
    unknown, renamed = category_mismatch(model, {1: "circle", 2: "box", 7: "star"})
    assert "1 of 3 categories the model cannot predict (7 'star')" in unknown
    assert "2 'square' in the model, 'box' in the dataset" in renamed


def test_evaluate_warns_when_the_dataset_has_other_classes(data_dir, tmp_path, uninterrupted,
                                                           caplog):
    """The trained checkpoint on a copy of its dataset where one category is renamed and one
    added: one warning line for each."""
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    ann = other / "annotations" / "instances_val.json"
    coco = json.loads(ann.read_text())
    coco["categories"][0]["name"] = "renamed"
    coco["categories"].append({"id": 99, "name": "unseen"})
    ann.write_text(json.dumps(coco))
    assert main(["evaluate", "--weights", str(uninterrupted), "--data", str(other),
                 "--num-workers", "0", "--device", "cpu"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cannot predict (99 'unseen')" in w for w in warnings), warnings
    assert any("'renamed' in the dataset" in w for w in warnings), warnings


# -- deliver 4: a rank killed mid-epoch under torchrun's elastic agent


@pytest.mark.slow  # two processes started twice by torchrun: over a minute here
def test_elastic_restart_continues_from_last_pt(data_dir, tmp_path):
    """Rank 1 dies (SIGKILL) at step 6, mid-way through epoch 2 (4 steps an epoch: 2
    processes x 2 images); the agent restarts both, `--resume auto` continues from epoch 1's
    last.pt, and the job completes its 3 epochs."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", "--max-restarts", "1", "--monitor-interval", "0.5",
           str(TESTS / "elastic_train.py"), "6",
           "train", "--data", str(data_dir), "--out", str(out), "--resume", "auto", *TINY,
           "--batch-size", "2", "--epochs", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "resumed from" in log and "at epoch 1, step 4" in log, log[-4000:]
    final = safe_torch_load(out / "last.pt")
    assert (final["epoch"], final["step"], len(final["rng"])) == (3, 12, 2)

"""`--resume` continues a run bit for bit: with loader workers, dropout, denoising queries, an
EMA and bf16 autocast, stopped mid-epoch or at an epoch boundary, in one process and in two
(gloo, CPU)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from _util import tiny_cfg, tiny_dataset

import dabdetr
from dabdetr.engine.trainer import Trainer
from dabdetr.weights.official import safe_torch_load

# every source of randomness a training step has: a loader worker, dropout, denoising queries
# (label flips and box noise), an EMA, bf16 autocast
RANDOM_RUN = dict(num_workers=1, deterministic=True, ema_decay=0.9, amp="bf16",
                  model_overrides={"num_queries": 10, "dropout": 0.1, "dn_groups": 2})
# the state a resumed run must reproduce exactly (not its log or its wall-clock time)
EXACT = ("model", "optimizer", "scheduler", "ema", "scaler", "rng", "epoch", "step",
         "batch_in_epoch", "images_seen")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists/tuples of tensors and plain values: equal bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


STEPS = 6  # an epoch is 4 steps (16 images, batch 4): the runs cross an epoch boundary


def _uninterrupted(data_dir: Path, out: Path, **kw: Any) -> Path:
    Trainer(tiny_cfg(data_dir, out, max_steps=STEPS, **kw)).fit()
    return out / "last.pt"


def _interrupted(data_dir: Path, out: Path, first_stop: dict[str, int], **kw: Any) -> Path:
    """A run stopped by `first_stop`, then resumed to STEPS steps after the global generator
    was reseeded."""
    Trainer(tiny_cfg(data_dir, out, **{**kw, **first_stop})).fit()
    torch.manual_seed(12345)
    resumed = Trainer(tiny_cfg(data_dir, out, max_steps=STEPS, **kw),
                      resume=str(out / "last.pt"))
    assert resumed.step > 0
    resumed.fit()
    return out / "last.pt"


def _compare_checkpoints(full_path: Path, resumed_path: Path) -> None:
    full, resumed = safe_torch_load(full_path), safe_torch_load(resumed_path)
    assert full["step"] == resumed["step"] == STEPS
    for key in EXACT:
        assert_identical(full[key], resumed[key], key)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    return _uninterrupted(data_dir, tmp_path_factory.mktemp("full"), **RANDOM_RUN)


# mid-epoch: the first run stops after 2 of an epoch's 4 steps; epoch boundary: it ends with
# its first epoch (and evaluates there, which the uninterrupted run does not)
STOPS = {"mid-epoch": {"max_steps": 2}, "epoch-boundary": {"epochs": 1},
         "budget-at-epoch-end": {"max_steps": 4}}


@pytest.mark.parametrize("stop", STOPS.values(), ids=STOPS.keys())
def test_resume_is_exact_with_workers_dropout_denoising_ema_amp(data_dir, tmp_path, stop,
                                                                 uninterrupted):
    _compare_checkpoints(uninterrupted, _interrupted(data_dir, tmp_path, stop, **RANDOM_RUN))


def test_a_budget_ending_an_epoch_counts_it_and_resuming_logs_no_empty_epoch(data_dir, tmp_path):
    from dabdetr.engine.runlog import read_log

    _interrupted(data_dir, tmp_path, {"max_steps": 4})  # 4 steps: exactly one epoch
    records = read_log(tmp_path / "metrics.jsonl", "epoch")
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 4), (1, 6)]
    assert all(r.get("AP") is not None for r in records)  # both stops evaluated


def _ddp_worker(rank: int, world: int, rendezvous: str, data_dir: str, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a file rendezvous: no port to pick (and race for) before the processes start
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}",
                                         rank=rank, world_size=world)
    root, kw = Path(root), dict(batch_size=2, **RANDOM_RUN)
    _uninterrupted(Path(data_dir), root / "full", **kw)
    _interrupted(Path(data_dir), root / "split", {"max_steps": 2}, **kw)
    dabdetr.distributed.destroy()


@pytest.mark.slow  # two spawned processes, each with a loader worker: over a minute here
def test_resume_is_exact_under_two_processes(data_dir, tmp_path):
    """Two gloo processes (as torchrun starts them), each with its own loader worker: the
    resumed run's weights, optimizer and every process's random states equal the
    uninterrupted run's."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(data_dir), str(tmp_path)),
             nprocs=2, join=True)
    _compare_checkpoints(tmp_path / "full" / "last.pt", tmp_path / "split" / "last.pt")
    assert len(safe_torch_load(tmp_path / "full" / "last.pt")["rng"]) == 2


def test_rng_state_round_trip_restores_every_global_generator():
    """set_rng_state(rng_state()) puts Python's, NumPy's and torch's generators back exactly,
    so whatever a user's transform or hook draws after a resume is what it would have drawn."""
    import random

    import numpy as np

    from dabdetr.engine.checkpoint import rng_state, set_rng_state

    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    random.gauss(0, 1)  # leaves a cached second normal in Python's state
    state = rng_state(torch.device("cpu"), {"loader": torch.Generator().manual_seed(3).get_state()})

    def draws():
        return (random.random(), random.gauss(0, 1), float(np.random.rand()),
                float(torch.rand(1)))

    expected = draws()
    draws()
    generators = set_rng_state(state, torch.device("cpu"))
    assert draws() == expected
    assert torch.equal(generators["loader"], torch.Generator().manual_seed(3).get_state())

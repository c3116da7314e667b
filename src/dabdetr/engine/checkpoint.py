"""Training checkpoints (written atomically, checked when read) and the random state a resumed
run needs to continue bit for bit."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

# what every training checkpoint holds (it holds more: see Trainer.checkpoint)
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "config")


def rng_state(device: torch.device | None = None,
              generators: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The random states a resumed run needs: torch's CPU generator, Python's and NumPy's, on a
    CUDA `device` that GPU's generator (dropout draws from it there), and the states of the
    run's own generators (`generators`: name -> `torch.Generator.get_state()`, e.g. a data
    loader's)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       *np_state[2:]],
             "generators": dict(generators or {})}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None
                  ) -> dict[str, torch.Tensor]:
    """Restore `rng_state`'s global states (the CUDA one only onto a CUDA `device`: a run saved
    on a GPU and resumed on the CPU continues with fresh dropout draws); returns the states of
    the run's own generators, for their owners to restore."""
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    return dict(state.get("generators", {}))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python's, NumPy's and torch's global generators; with `deterministic`, make torch
    use deterministic algorithms (warning where one has none)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file then rename: a kill never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint (weights_only load); ValueError if `path` is not one."""
    from dabdetr.weights.official import safe_torch_load

    ckpt = safe_torch_load(path)
    for key in REQUIRED_KEYS:
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise ValueError(f"{path} is not a dabdetr training checkpoint (no {key!r})")
    return ckpt


def rank_rng(ckpt: dict[str, Any], rank: int) -> dict[str, Any] | None:
    """The random state process `rank` saved in `ckpt` (one per process); None where the run
    that saved it had fewer processes."""
    states = ckpt.get("rng")
    if isinstance(states, list):
        return states[rank] if rank < len(states) else None
    return states

"""Everything that knows about multiple processes lives here.

Training and evaluation read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) through
these helpers; model code never asks for the rank. Every helper is a no-op in a single process,
so nothing needs torchrun to run.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(device: str | None = None) -> torch.device:
    """The requested device, or CUDA when available, else the CPU; a clear error for a CUDA
    device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA GPU is available; "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only "
                             f"{torch.cuda.device_count()} GPU(s) exist")
    return dev


def init_from_env(device: str | None = None) -> torch.device:
    """Initialize the default process group from torchrun's environment, if present.

    Uses nccl when the run is on CUDA, gloo otherwise. Returns the device this process should
    use (cuda:LOCAL_RANK under torchrun on GPUs, else the requested or CPU device).
    """
    resolved = resolve_device(device)
    want_cuda = resolved.type == "cuda"
    if not launched_by_torchrun():
        return resolved
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
    if not is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return torch.device(f"cuda:{local_rank}") if want_cuda else torch.device("cpu")


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over processes (a copy; the input is not modified)."""
    if not is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / get_world_size()


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather a picklable object from every process; a one-element list in a single process.

    Only used for our own in-memory results (detections), never for data read from disk.
    """
    if not is_initialized():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered

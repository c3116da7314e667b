"""Stopping a training run when a scheduler or the user asks (SIGTERM, SIGINT / Ctrl-C): the
current optimizer step is finished, last.pt is written, and the command exits with 128 + the
signal's number (143, 130) so a scheduler can requeue the job and `--resume auto` continue it."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

import torch

from dabdetr import distributed as dist

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """A run stopped by a signal after writing its last.pt; `exit_code` is 128 + the signal."""

    def __init__(self, signum: int, checkpoint: str):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after writing {checkpoint}; "
                         "continue with --resume auto (or --resume PATH)")


def ignore_ctrl_c(worker_id: int) -> None:
    """A data-loader worker's `worker_init_fn`: Ctrl-C reaches every process of the terminal's
    group; the training process finishes its step with the workers' batches and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """While entered, SIGTERM and SIGINT only note that the run should stop (a second SIGINT
    stops at once, as Ctrl-C does); the previous handlers come back on exit. Outside the main
    thread, where Python cannot set handlers, it changes nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: finishing the current step, then writing last.pt",
                       signal.Signals(signum).name)

    def agreed(self, device: torch.device) -> int | None:
        """The signal to stop for, agreed by every process (all of them call this at the same
        step, so they stop together); None to go on."""
        if dist.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        if float(dist.all_reduce_mean(flag)) == 0:
            return None
        return self.signum if self.signum is not None else int(signal.SIGTERM)

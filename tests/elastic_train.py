"""`dabdetr train` under torchrun, for tests/test_train_reliability.py: in the job's first
attempt the process of rank 1 kills itself (SIGKILL) when it is about to take step KILL_AT.

    torchrun ... tests/elastic_train.py KILL_AT TRAIN_ARGS...
"""

from __future__ import annotations

import os
import signal
import sys

from dabdetr.cli import main
from dabdetr.engine.trainer import Trainer


def die_at(step: int) -> None:
    take_step = Trainer.train_step

    def train_step(self: Trainer, batches: list) -> dict[str, float]:
        if self.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return take_step(self, batches)

    Trainer.train_step = train_step


if __name__ == "__main__":
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ["RANK"] == "1":
        die_at(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))

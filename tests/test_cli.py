"""Process-level settings of the `dabdetr` command."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# A training step in miniature: four large tensors (84 MiB in all) allocated, written, held
# together and freed; the page faults of steps 7-9, after the heap has settled.
_FAULTS = """
import json, resource, sys, torch
from dabdetr.cli import keep_freed_memory
kept = keep_freed_memory()
torch.set_num_threads(1)
def step():
    held = [torch.empty(n).fill_(1.0) for n in (12 << 20, 6 << 20, 3 << 20, 12 << 20)]
    return len(held)
for _ in range(6):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"kept": kept, "faults": after - before}))
"""


def _faults(**env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True,
                            env={**os.environ, **env}, check=True, timeout=120)
    return json.loads(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_kept_for_reuse():
    """The setting is applied by default and switched off by DABDETR_KEEP_FREED_MEMORY=0. How
    many page faults it saves depends on the kernel (its page size and transparent huge pages),
    so no count is asserted."""
    kept = _faults()
    default = _faults(DABDETR_KEEP_FREED_MEMORY="0")
    assert kept["kept"] and not default["kept"]

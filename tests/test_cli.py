"""The `dabdetr` command leaves the process as it found it."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from dabdetr import cli


def test_command_changes_no_environment_or_thread_setting(tmp_path):
    env_before = dict(os.environ)
    threads = torch.get_num_threads()
    code = cli.main(["synth", "--out", str(tmp_path / "shapes"), "--train", "2", "--val", "1",
                     "--image-size", "64", "--no-progress", "--workers", "1"])
    assert code == 0
    assert (tmp_path / "shapes" / "annotations" / "instances_train.json").is_file()
    # torch's inductor records its cache folder when torch loads it: not ours
    changed = {k for k in set(os.environ) ^ set(env_before) if not k.startswith("TORCHINDUCTOR_")}
    changed |= {k for k in set(os.environ) & set(env_before) if os.environ[k] != env_before[k]}
    assert not changed
    assert torch.get_num_threads() == threads


def test_module_entry_point_sets_no_openmp_policy():
    """Nothing in the library sets OMP_WAIT_POLICY (or any other variable) for the user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    code = ("import os, dabdetr.cli as c; p = c.build_parser(); "
            "print(sorted(k for k in os.environ if k.startswith('OMP_')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"

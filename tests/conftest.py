from __future__ import annotations

from pathlib import Path

import pytest
import torch

# CI clones the repo next to `shared/`: it is a sibling of the repository root.
SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "golden" / "tiny_r18"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "checkpoint.pth").is_file():
        pytest.skip(f"golden vectors not found at {GOLDEN} (shared/ must sit next to the repo)")
    return GOLDEN


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

"""Small helpers shared by the tests."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dabdetr.config import DabDetrConfig
from dabdetr.engine.config import TrainConfig
from dabdetr.model_types import ModelConfig, build_model


def in_ci() -> bool:
    """True where the CI environment variable says so (GitHub Actions and others set CI=true)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def import_oracle(name: str) -> ModuleType:
    """Import a reference implementation a parity test compares with. In CI a missing one is an
    error (the `test` extra installs it), so parity cannot pass by skipping; elsewhere the
    test module skips with the reason."""
    if in_ci():
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install -e '.[test]')")


def tiny_config(**overrides) -> DabDetrConfig:
    """A small random-init model config for fast tests."""
    values = dict(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2,
                  dim_feedforward=64, num_queries=8, num_classes=5)
    values.update(overrides)
    return DabDetrConfig(**values)


def perturbed_model(config: ModelConfig) -> torch.nn.Module:
    """A model of the config's family (DabDetr or DabDeformableDetr) in eval mode whose every
    weight is perturbed (no zero-initialized layer hides a difference) and whose frozen
    batch-norm statistics are non-trivial."""
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif buf.is_floating_point():
                buf.add_(torch.randn_like(buf) * 0.1)
    return model


def tiny_dataset(out: Path) -> Path:
    """16 training and 8 validation images of easy synthetic shapes, 64 px, in `out`."""
    from dabdetr.data.synthetic import generate_dataset

    generate_dataset(out, num_train=16, num_val=8, seed=1, difficulty="easy", image_size=64,
                     progress=False)
    return out


def tiny_cfg(data_dir: Path, out: Path, **kw) -> TrainConfig:
    """A few-second training run of the `cpu-tiny` preset (10 queries) on `tiny_dataset`."""
    values = dict(data=str(data_dir), out=str(out), model="cpu-tiny",
                  model_overrides={"num_queries": 10}, epochs=1000, batch_size=4, lr=1e-3,
                  lr_backbone=1e-3, lr_drop=[], image_size=64, no_crop=True, num_workers=0,
                  eval_every=1000, progress=False, seed=3)
    values.update(kw)
    return TrainConfig(**values)


def tiny_deformable_config(**overrides):
    """A small random-init DAB-Deformable-DETR config for fast tests."""
    from dabdetr.config import DabDeformableDetrConfig

    values = dict(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2,
                  dim_feedforward=64, num_queries=6, num_classes=5, num_feature_levels=4,
                  enc_n_points=2, dec_n_points=2)
    values.update(overrides)
    return DabDeformableDetrConfig(**values)

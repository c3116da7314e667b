"""Small helpers shared by the tests."""

from __future__ import annotations

from dabdetr.config import DabDetrConfig


def tiny_config(**overrides) -> DabDetrConfig:
    """A small random-init model config for fast tests."""
    values = dict(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2,
                  dim_feedforward=64, num_queries=8, num_classes=5)
    values.update(overrides)
    return DabDetrConfig(**values)

"""The training loop's numbers: the EMA's decay, the epoch-based learning-rate drop and
gradient clipping, each checked by value through TrainConfig and Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _util import tiny_cfg, tiny_dataset

from dabdetr.engine.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("synth"))  # 16 training images: 4 steps/epoch


def _record_after_each_step(trainer: Trainer, record) -> None:
    """Call record() after every optimizer step of trainer.fit()."""
    original = trainer.train_step

    def step(batches):
        out = original(batches)
        record(out)
        return out

    trainer.train_step = step


def test_ema_is_the_exponential_average_of_the_weights_after_each_step(data_dir, tmp_path):
    """ema_1 = w_1, then ema_t = decay * ema_(t-1) + (1 - decay) * w_t (torch's AveragedModel
    starts from the first weights it sees)."""
    decay = 0.9
    trainer = Trainer(tiny_cfg(data_dir, tmp_path / "ema", max_steps=3, ema_decay=decay))
    weights: list[dict[str, torch.Tensor]] = []
    _record_after_each_step(trainer, lambda _: weights.append(
        {k: p.detach().clone() for k, p in trainer.model.named_parameters()}))
    trainer.fit()
    assert len(weights) == 3
    expected = weights[0]
    for w in weights[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * w[k] for k in w}
    averaged = dict(trainer.eval_model().named_parameters())
    assert trainer.eval_model() is not trainer.model
    moved = max(float((weights[2][k] - weights[0][k]).abs().max()) for k in expected)
    assert moved > 1e-4  # the weights moved, so the average differs from the last weights
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_epoch_lr_drop_multiplies_the_lr_by_gamma_at_the_epoch(data_dir, tmp_path):
    """lr_drop=[1] with 4 steps per epoch: the 5th step (the first of epoch 2) uses lr * 0.1, in
    both parameter groups; the steps before use the base lr."""
    trainer = Trainer(tiny_cfg(data_dir, tmp_path / "drop", max_steps=6, lr_drop=[1],
                               lr_gamma=0.1, warmup_steps=0, lr=1e-3, lr_backbone=2e-4))
    used: list[list[float]] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append([g["lr"] for g in opt.param_groups]))
    trainer.fit()
    assert used == [pytest.approx([1e-3, 2e-4])] * 4 + [pytest.approx([1e-4, 2e-5])] * 2


def test_gradients_are_clipped_to_clip_max_norm(data_dir, tmp_path):
    """The optimizer steps with a gradient of global norm clip_max_norm where the raw gradient
    is longer (the logged grad_norm is the norm before clipping)."""
    max_norm = 0.05
    trainer = Trainer(tiny_cfg(data_dir, tmp_path / "clip", max_steps=2, clip_max_norm=max_norm))
    norms: list[float] = []

    def global_norm(opt, args, kwargs) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))

    trainer.optimizer.register_step_pre_hook(global_norm)
    raw: list[float] = []
    _record_after_each_step(trainer, lambda out: raw.append(out["grad_norm"]))
    trainer.fit()
    assert len(norms) == len(raw) == 2
    for before, after in zip(raw, norms, strict=True):
        assert before > 2 * max_norm  # clipping had something to do
        assert after == pytest.approx(max_norm, rel=1e-4)


def test_accumulated_micro_batches_average_their_gradients(data_dir, tmp_path):
    """With accumulate=2, one micro-batch given twice steps with that micro-batch's own gradient
    (the mean over micro-batches), not twice it: the gradient norm before clipping equals that
    of accumulate=1 on the same batch."""

    def first_step(accumulate: int, name: str) -> tuple[torch.Tensor, float]:
        trainer = Trainer(tiny_cfg(data_dir, tmp_path / name, max_steps=1, accumulate=accumulate,
                                   model_overrides={"num_queries": 10, "dn_groups": 0},
                                   clip_max_norm=1e6))
        original = trainer.train_step
        seen: list = []

        def step(batches):
            seen.append(batches[0].images.clone())
            out = original([batches[0]] * accumulate)
            seen.append(out["grad_norm"])
            return out

        trainer.train_step = step
        trainer.fit()
        return seen[0], seen[1]

    images_1, norm_1 = first_step(1, "one")
    images_2, norm_2 = first_step(2, "two")
    assert torch.equal(images_1, images_2)  # same seed: the same first micro-batch
    assert norm_1 > 0
    assert norm_2 == pytest.approx(norm_1, rel=1e-5)

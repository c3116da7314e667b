"""Training and evaluation end to end on a tiny generated dataset (CPU)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _util import tiny_cfg, tiny_dataset

import dabdetr
from dabdetr.cli import main
from dabdetr.data.check import DataProblems
from dabdetr.engine.config import TrainConfig
from dabdetr.engine.train import train
from dabdetr.engine.trainer import Trainer, TrainingDiverged
from dabdetr.weights.official import safe_torch_load

TINY = {"num_queries": 10}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def test_overfits_small_dataset_through_cli(data_dir, tmp_path, capsys):
    """A few hundred steps on 16 easy images: AP on those images far above chance."""
    out = tmp_path / "run"
    code = main(["train", "--data", str(data_dir), "--out", str(out), "--model", "cpu-tiny",
                 "--set", "num_queries=10", "--val-split", "train", "--epochs", "1000",
                 "--max-steps", "200", "--batch-size", "8", "--lr", "1e-3", "--lr-backbone",
                 "1e-3", "--lr-drop", "--image-size", "64", "--no-crop", "--no-flip",
                 "--num-workers", "0", "--eval-every", "1000", "--seed", "1", "--no-progress"])
    assert code == 0
    assert "final: AP" in capsys.readouterr().out
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [h for h in history if h["type"] == "epoch"][-1]
    assert final["AP50"] > 0.3 and final["AP"] > 0.1, final  # chance is ~0.0
    assert (out / "curves.png").stat().st_size > 1000
    ckpt = safe_torch_load(out / "last.pt")
    assert ckpt["step"] == 200 and ckpt["categories"]["layout"] == "contiguous"
    model = dabdetr.load_model(out / "best.pt")  # a training checkpoint is a weight source
    assert model.config.num_classes == 6 and model.config.label_name(0) == "circle"


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly(data_dir, tmp_path):
    full = Trainer(tiny_cfg(data_dir, tmp_path / "full", max_steps=7, deterministic=True))
    full.fit()
    first = Trainer(tiny_cfg(data_dir, tmp_path / "split", max_steps=3, deterministic=True))
    first.fit()
    resumed = Trainer(tiny_cfg(data_dir, tmp_path / "split", max_steps=7, deterministic=True),
                      resume=str(tmp_path / "split" / "last.pt"))
    assert resumed.step == 3
    resumed.fit()
    a, b = _state(full.model), _state(resumed.model)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a, opt_b = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    for idx, st in opt_a["state"].items():
        assert torch.equal(st["exp_avg"], opt_b["state"][idx]["exp_avg"])


def test_resume_uses_this_machines_optimizer_kernel(data_dir, tmp_path):
    """A checkpoint saved with the per-parameter AdamW (older runs, or a device without the
    fused kernel) resumes with the kernel this machine supports."""
    first = Trainer(tiny_cfg(data_dir, tmp_path / "run", max_steps=2))
    first.fit()
    ckpt = safe_torch_load(tmp_path / "run" / "last.pt")
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = None, None
    torch.save(ckpt, tmp_path / "old.pt")
    resumed = Trainer(tiny_cfg(data_dir, tmp_path / "run", max_steps=3),
                      resume=str(tmp_path / "old.pt"))
    assert [g["fused"] for g in resumed.optimizer.param_groups] == [True] * len(
        resumed.optimizer.param_groups)
    resumed.fit()
    assert resumed.step == 3


def _ddp_worker(rank: int, world: int, cfg: TrainConfig, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # rendezvous through a file: no port chosen in advance (gloo's own sockets take free ports)
    torch.distributed.init_process_group("gloo", init_method=f"file://{result_dir}/rendezvous",
                                         rank=rank, world_size=world)
    trainer = Trainer(cfg, device="cpu")
    trainer.fit()
    if rank == 0:
        torch.save({"state": trainer.model.state_dict(), "history": trainer.history},
                   Path(result_dir) / "ddp.pt")
    dabdetr.distributed.destroy()


def test_ddp_two_processes_match_one_process(data_dir, tmp_path):
    # pad_invariant: padding must not depend on how the global batch is split; frozen BN:
    # batch statistics would differ per process (as in any DDP run without SyncBatchNorm)
    overrides = dict(TINY, pad_invariant=True, backbone_norm="frozen")
    common = dict(max_steps=3, epochs=1000, deterministic=True, eval_every=1,
                  model_overrides=overrides, eval_batch_size=3, no_multi_scale=True)
    single = Trainer(tiny_cfg(data_dir, tmp_path / "one", batch_size=4, **common))
    initial = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.fit()
    ddp_cfg = tiny_cfg(data_dir, tmp_path / "two", batch_size=2, **common)
    mp.spawn(_ddp_worker, args=(2, ddp_cfg, str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "ddp.pt", weights_only=True)
    # The two runs sum the same gradients in different orders. Adam divides each gradient by
    # its own running RMS, so a component that nearly cancels (or is pure rounding noise, as for
    # key-projection biases, which shift every attention logit of a query equally and get an
    # exactly zero gradient from softmax) carries its relative rounding error into an lr-sized
    # step, and how far depends on the CPU's instruction set. So no single element is held to
    # a bound: a tenth of one step (lr 1e-3) is allowed to be exceeded by at most 0.1% of the
    # weights, while a gradient that DDP failed to average or synchronize moves whole tensors
    # by about a step.
    lr, moved, off, total = ddp_cfg.lr, 0.0, 0, 0
    for key, value in single.model.state_dict().items():
        if not value.is_floating_point():
            assert torch.equal(result["state"][key], value), key
            continue
        off += int(((result["state"][key] - value).abs() > 0.1 * lr).sum())
        total += value.numel()
        moved = max(moved, float((value - initial[key]).abs().max()))
    assert off <= 1e-3 * total, f"{off} of {total} weights differ by more than 0.1 * lr"
    assert moved > 2 * lr  # the comparison means something: three steps moved the weights
    one, two = single.history, result["history"]
    assert len(one) == len(two)
    for h1, h2 in zip(one, two, strict=True):
        assert abs(h1["train_loss"] - h2["train_loss"]) < 1e-4 * max(1.0, abs(h1["train_loss"]))
        if "AP" in h1:  # distributed evaluation (gathered to rank 0) == single process
            for k in ("AP", "AP50", "AR100"):
                assert abs(h1[k] - h2[k]) < 1e-6, k


def test_evaluate_cli_matches_training_evaluation(data_dir, tmp_path, capsys):
    cfg = tiny_cfg(data_dir, tmp_path / "run", max_steps=4, eval_every=1)
    summary = train(cfg)
    capsys.readouterr()
    code = main(["evaluate", "--weights", str(tmp_path / "run" / "last.pt"), "--data",
                 str(data_dir), "--eval-size", "64", "--max-size", "1333", "--num-workers", "0",
                 "--out", str(tmp_path / "eval")])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert abs(metrics["AP"] - summary["last"]["AP"]) < 1e-9
    assert "AP50" in capsys.readouterr().out
    # the same detections as the training run's own evaluation of that model
    detections = json.loads((tmp_path / "eval" / "detections.json").read_text())
    during = json.loads((tmp_path / "run" / "val_detections.json").read_text())
    assert len(detections) == len(during) > 0
    for a, b in zip(detections, during, strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
    # the optimized model scores the same detections (float rounding apart)
    code = main(["evaluate", "--weights", str(tmp_path / "run" / "last.pt"), "--data",
                 str(data_dir), "--eval-size", "64", "--max-size", "1333", "--num-workers", "0",
                 "--out", str(tmp_path / "eval-fused"), "--optimize", "fused"])
    assert code == 0
    fused = json.loads((tmp_path / "eval-fused" / "metrics.json").read_text())
    assert abs(fused["AP"] - metrics["AP"]) < 1e-3
    with pytest.raises(SystemExit):  # argparse names the valid choices
        main(["evaluate", "--weights", str(tmp_path / "run" / "last.pt"), "--data",
              str(data_dir), "--optimize", "int4"])


def test_fine_tune_from_other_class_count(data_dir, tmp_path, caplog):
    from dabdetr.models.dab_detr import DabDetr
    from dabdetr.presets import preset_config

    coco_like = DabDetr(preset_config("cpu-tiny", num_classes=91, **TINY))
    dabdetr.save_model(coco_like, tmp_path / "coco")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(tiny_cfg(data_dir, tmp_path / "ft", max_steps=1,
                                   weights=str(tmp_path / "coco")))
    assert "class_embed.weight" in caplog.text
    assert torch.equal(trainer.model.input_proj.weight, coco_like.input_proj.weight)
    assert trainer.model.class_embed.weight.shape[0] == 6


def test_options_ema_accumulate_warmup(data_dir, tmp_path):
    cfg = tiny_cfg(data_dir, tmp_path / "opts", max_steps=2, ema_decay=0.9, accumulate=2,
                   warmup_steps=5, match_repeat=2, eval_every=1)
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["images_seen"] == 16
    ckpt = safe_torch_load(tmp_path / "opts" / "last.pt")
    ema = ckpt["ema"]
    assert int(ema["n_averaged"]) == 2  # one update per optimizer step, not per micro-batch
    assert any(not torch.equal(ema[f"module.{k}"], v) for k, v in ckpt["model"].items()
               if v.is_floating_point())  # averaged over both steps' weights: not the last


def test_fp16_amp_needs_cuda(data_dir, tmp_path):
    with pytest.raises(ValueError, match="amp='fp16' runs on CUDA only; this run is on cpu"):
        Trainer(tiny_cfg(data_dir, tmp_path / "amp", amp="fp16"), device="cpu")


def test_check_amp_names_what_a_device_cannot_run():
    from dabdetr.precision import check_amp

    assert check_amp("none", "cpu") is None
    assert check_amp("fp16", "cuda") == torch.float16  # decided from the device type alone
    assert check_amp("bf16", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown amp mode 'fp8'; choose none, bf16 or fp16"):
        check_amp("fp8", "cpu")
    with pytest.raises(ValueError, match="amp='bf16' runs on CUDA or the CPU only; this run is "
                                         "on meta"):
        check_amp("bf16", "meta")
    with pytest.raises(ValueError, match="unknown amp mode"):
        Trainer(TrainConfig(data="unused", amp="fp8"), device="cpu")


def test_bf16_amp_trains_on_cpu(data_dir, tmp_path, monkeypatch, caplog):
    """bf16 autocast on the CPU: the same first loss as float32 up to bfloat16 rounding, float32
    outputs and weights, and a warning where the CPU would emulate bfloat16."""
    losses = {}
    for amp in ("none", "bf16"):
        trainer = Trainer(tiny_cfg(data_dir, tmp_path / amp, amp=amp), device="cpu")
        batch = next(iter(trainer._loader()))
        losses[amp] = trainer.train_step([batch])["loss"]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert losses["bf16"] == pytest.approx(losses["none"], rel=0.05)
    assert losses["bf16"] != losses["none"]  # autocast did change the arithmetic

    import dabdetr.precision

    monkeypatch.setattr(dabdetr.precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="dabdetr.precision"):
        Trainer(tiny_cfg(data_dir, tmp_path / "emulated", amp="bf16"), device="cpu")
    assert "slower than float32" in caplog.text


def test_non_finite_loss_stops_with_checkpoint_intact(data_dir, tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg(data_dir, tmp_path / "nan", max_steps=8, eval_every=1000))
    original = trainer.criterion.forward
    calls = {"n": 0}

    def poisoned(outputs, targets):
        calls["n"] += 1
        losses = original(outputs, targets)
        if calls["n"] > 5:  # after the first epoch (4 steps) wrote last.pt
            losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        return losses

    monkeypatch.setattr(trainer.criterion, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        trainer.fit()
    ckpt = safe_torch_load(tmp_path / "nan" / "last.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_bad_images_are_skipped_and_counted(data_dir, tmp_path, caplog):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    (broken / "train" / "000000.png").write_bytes(b"not a png")
    (broken / "train" / "000001.png").unlink()
    with pytest.raises(DataProblems, match=r"(?s)000000\.png: unreadable_image.*"
                                           r"000001\.png: missing_image"):
        train(tiny_cfg(broken, tmp_path / "stopped", max_steps=4, epochs=1))
    with caplog.at_level(logging.WARNING):
        summary = train(tiny_cfg(broken, tmp_path / "run", max_steps=4, epochs=1, skip_bad=True))
    assert "left out 2 bad entries (--skip-bad)" in caplog.text
    assert summary["steps"] == 4 and summary["skipped_images"] == 0  # left out before training


def test_malformed_annotations_fail_before_training(data_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    (bad / "annotations" / "instances_train.json").write_text('{"images": [}')
    with pytest.raises(ValueError, match="instances_train.json"):
        Trainer(tiny_cfg(bad, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unknown_category_ids_are_reported(data_dir, tmp_path, caplog):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(data_dir, odd)
    ann_file = odd / "annotations" / "instances_train.json"
    ann = json.loads(ann_file.read_text())
    ann["annotations"][0]["category_id"] = 77
    ann_file.write_text(json.dumps(ann))
    with pytest.raises(DataProblems, match="category_id 77 is not in 'categories'"):
        Trainer(tiny_cfg(odd, tmp_path / "run"))
    with caplog.at_level(logging.WARNING):
        Trainer(tiny_cfg(odd, tmp_path / "run", skip_bad=True))
    assert "left out 1 bad entry" in caplog.text


def test_killed_training_leaves_loadable_checkpoint(data_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dabdetr", "train", "--data", str(data_dir), "--out", str(out),
           "--model", "cpu-tiny", "--set", "num_queries=10", "--epochs", "1000",
           "--batch-size", "8", "--image-size", "64", "--no-crop", "--num-workers", "0",
           "--eval-every", "1000", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # kill it once two epochs (2 steps each) ended, each with its checkpoint: then it is
        # training, or writing last.pt again
        log = out / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (
                log.exists() and log.read_text().count('"type": "epoch"') >= 2):
            time.sleep(0.05)
        assert proc.poll() is None, "the training run ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = safe_torch_load(out / "last.pt")
    assert ckpt["step"] >= 2
    assert dabdetr.load_model(out / "last.pt").config.num_classes == 6


def test_cli_switches_reach_the_config():
    from dabdetr.cli import build_parser
    from dabdetr.engine.config import config_from_args

    args = build_parser().parse_args([
        "train", "--data", "d", "--dn-groups", "3", "--dn-box-noise", "0.3", "--match-repeat",
        "2", "--no-multi-scale", "--ema-decay", "0.99", "--accumulate", "2", "--two-stage",
        "--enc-match-repeat", "3", "--lr-drop-time", "0.8", "--set", "num_queries=50",
        "dilation=true"])
    cfg = config_from_args(args)
    assert cfg.model_overrides == {"num_queries": 50, "dilation": True, "dn_groups": 3,
                                   "dn_box_noise": 0.3, "two_stage": True}
    assert cfg.match_repeat == 2 and cfg.no_multi_scale and cfg.recipe().scales == (800,)
    assert (cfg.ema_decay, cfg.accumulate) == (0.99, 2)
    assert (cfg.enc_match_repeat, cfg.lr_drop_time) == (3, 0.8)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        config_from_args(build_parser().parse_args(["train", "--data", "d", "--set", "oops"]))
    defaults = config_from_args(build_parser().parse_args(["train", "--data", "d"]))
    assert defaults == TrainConfig(data="d")  # every default is TrainConfig's own
    assert not config_from_args(build_parser().parse_args(
        ["train", "--data", "d", "--no-progress"])).progress


def _train_parser():
    import argparse

    from dabdetr.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["train"]


def test_every_train_config_field_has_a_switch_with_help():
    import dataclasses

    actions = {a.dest: a for a in _train_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in actions, f"TrainConfig.{f.name} has no `dabdetr train` switch"
        assert actions[f.name].option_strings, f.name
    for action in actions.values():
        assert action.help and action.help.strip() and action.help != "==SUPPRESS==", action.dest
    entries: list[list[str]] = []  # [switch, help text] as `dabdetr train --help` prints them
    for line in _train_parser().format_help().split("options:")[1].splitlines():
        if line.startswith("  -"):
            switch, _, text = line.strip().partition("  ")
            entries.append([switch, text.strip()])
        elif line.strip():
            entries[-1][1] += line.strip()
    assert len(entries) == len(actions)
    assert all(text for _, text in entries), [switch for switch, text in entries if not text]


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch-size", "0"], "argument --batch-size: must be > 0, got 0"),
    (["--accumulate", "-1"], "argument --accumulate: must be > 0, got -1"),
    (["--eval-every", "0"], "argument --eval-every: must be > 0"),
    (["--epochs", "0"], "argument --epochs: must be > 0"),
    (["--time-limit", "-5"], "argument --time-limit: must be > 0"),
    (["--focal-alpha", "1.5"], "argument --focal-alpha: must be in [0, 1], got 1.5"),
    (["--dn-label-noise", "2"], "argument --dn-label-noise: must be in [0, 1]"),
    (["--lr-drop-time", "0"], "argument --lr-drop-time: must be in (0, 1]"),
    (["--ema-decay", "1"], "argument --ema-decay: must be in [0, 1)"),
    (["--lr-drop", "10", "-2"], "argument --lr-drop: must be >= 0, got -2"),
    (["--num-workers", "x"], "argument --num-workers: invalid int value: 'x'"),
])
def test_out_of_range_switches_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "d", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_config_refuses_out_of_range_values():
    with pytest.raises(ValueError, match=r"batch_size=0: must be > 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"lr_drop=\[10, -1\]: must be >= 0"):
        TrainConfig(lr_drop=[10, -1])


def test_time_based_lr_drop(data_dir, tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg(data_dir, tmp_path / "run", max_steps=4, time_limit=10.0,
                               lr_drop_time=0.5, warmup_steps=0))
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    lrs = []
    original = trainer.train_step

    def step(batches):
        out = original(batches)
        clock[0] += 100.0  # 100 s per step: the drop is due after 3 steps (5 of 10 minutes)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return out

    trainer.train_step = step
    trainer.fit()
    assert trainer.scheduler.dropped
    # lr after each step: the drop comes once 300 s of the 600 s limit have passed
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-4, 1e-4])
    ckpt = safe_torch_load(tmp_path / "run" / "last.pt")
    assert ckpt["scheduler"] == {"step": 4, "dropped": True}  # survives --resume
    resumed = Trainer(tiny_cfg(data_dir, tmp_path / "run", max_steps=5, time_limit=10.0,
                               lr_drop_time=0.5), resume=str(tmp_path / "run" / "last.pt"))
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([1e-4, 1e-4])


def test_schedule_warms_up_and_drops_by_epoch_and_by_time():
    """The lr of each group: a linear warm-up from 0.1%, x gamma at each drop step, x gamma
    once more after a time-based drop; its state round-trips through state_dict."""
    from dabdetr.engine.schedule import LrSchedule

    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "lr": 1.0},
                                   {"params": params[1:], "lr": 0.5}])
    schedule = LrSchedule(optimizer, warmup_steps=4, drop_steps=[6], gamma=0.1)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[1]["lr"])
        schedule.step()
    expected = [0.5 * (0.001 + 0.999 * s / 4) for s in range(4)] + [0.5, 0.5, 0.05, 0.05]
    assert lrs == pytest.approx(expected)
    assert schedule.drop() and not schedule.drop()  # once only
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.005])
    state = schedule.state_dict()
    again = LrSchedule(optimizer, warmup_steps=4, drop_steps=[6], gamma=0.1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)  # step 0 of the warm-up
    again.load_state_dict(state)
    assert (again.step_count, again.dropped) == (8, True)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.005])


def test_bad_recipe_switches_are_refused_clearly(data_dir, tmp_path):
    with pytest.raises(ValueError, match="lr_drop_time"):
        Trainer(tiny_cfg(data_dir, tmp_path / "a", lr_drop_time=1.5, time_limit=1.0))
    with pytest.raises(ValueError, match="needs a time limit"):
        Trainer(tiny_cfg(data_dir, tmp_path / "b", lr_drop_time=0.8))
    with pytest.raises(ValueError, match="enc_match_repeat"):
        Trainer(tiny_cfg(data_dir, tmp_path / "c", enc_match_repeat=0))


def test_optimizer_is_fused_adamw_with_the_same_update():
    """`build_optimizer` uses torch's fused AdamW on CPU; one step moves every parameter as the
    per-parameter AdamW does (up to float rounding), with the backbone's own learning rate."""
    from dabdetr.engine.schedule import build_optimizer

    torch.manual_seed(0)
    model = dabdetr.DabDetr(dabdetr.DabDetrConfig(
        backbone="resnet18", enc_layers=1, dec_layers=1, dim_feedforward=64, hidden_dim=32,
        num_queries=5))
    reference = dabdetr.DabDetr(model.config)
    reference.load_state_dict(model.state_dict())
    cfg = TrainConfig(lr=1e-3, lr_backbone=1e-4, weight_decay=1e-2)
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    assert [g["lr"] for g in fused.param_groups] == [1e-3, 1e-4]
    plain = torch.optim.AdamW(
        [{"params": [p for n, p in reference.named_parameters()
                     if p.requires_grad and not n.startswith("backbone.")]},
         {"params": [p for n, p in reference.named_parameters()
                     if p.requires_grad and n.startswith("backbone.")], "lr": 1e-4}],
        lr=1e-3, weight_decay=1e-2, foreach=False)
    for net, opt in ((model, fused), (reference, plain)):
        for step in range(2):
            torch.manual_seed(step)
            for p in net.parameters():
                if p.requires_grad:
                    p.grad = torch.randn_like(p)
            opt.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_curves_read_this_runs_steps_and_skip_a_torn_line(tmp_path, caplog):
    """curves.png draws the losses from metrics.jsonl's step records, against images seen: this
    run's, without an earlier run's in the same folder or the steps a resume repeated; a line
    cut short by a killed run is skipped with a warning instead of failing the run's end."""
    from PIL import Image

    from dabdetr.engine.runlog import plot_history, read_log

    log = tmp_path / "metrics.jsonl"
    steps = [{"type": "step", "step": s, "images_seen": 16 * s, "loss": 10.0 / s,
              "loss_ce": 1.0 / s, "loss_bbox": 0.5 / s, "loss_giou": 0.8 / s} for s in (20, 40, 60)]
    epochs = [{"type": "epoch", "epoch": 1, "step": 50, "images_seen": 800, "train_loss": 3.0,
               "AP": 0.1, "AP50": 0.2},
              {"type": "epoch", "epoch": 1, "step": 60, "images_seen": 960,  # partial
               "train_loss": 2.0,
               "AP": 0.15, "AP50": 0.3}]
    earlier_run = [dict(r, step=r["step"] * 9, loss=99.0) for r in steps]
    repeated_after_resume = [dict(steps[2], loss=98.0)]
    lines = ([json.dumps(r) for r in earlier_run] + [json.dumps(r) for r in steps[:2]]
             + [json.dumps(r) for r in repeated_after_resume]  # logged, then resumed before it
             + [json.dumps(epochs[0]), json.dumps(steps[2]), '{"type": "st'])
    log.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="dabdetr.engine.runlog"):
        read = read_log(log)
    assert read == steps  # neither the earlier run's records nor the repeated step
    assert "skipped 1 unreadable line" in caplog.text
    assert read_log(log, "epoch") == epochs[:1]
    # an unevaluated record at an evaluated one's step shadows it, unless `keep` selects first
    log.write_text("\n".join(lines + [json.dumps({"type": "epoch", "epoch": 2, "step": 50})]))
    assert read_log(log, "epoch") == [{"type": "epoch", "epoch": 2, "step": 50}]
    assert read_log(log, "epoch", keep=lambda r: "AP" in r) == epochs[:1]
    assert read_log(tmp_path / "absent.jsonl") == []
    for name, kwargs in (("dense.png", {"steps": read}), ("epochs.png", {})):
        plot_history(epochs, tmp_path / name, **kwargs)
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 500


def test_augmentation_depends_only_on_seed_epoch_and_index(data_dir, tmp_path):
    """SeededAugmentation seeds the CPU generator per sample: the same sample in the training
    process and in a loader worker, whatever the global RNG state, and another one next epoch;
    loading leaves the global generators as they were."""
    trainer = Trainer(tiny_cfg(data_dir, tmp_path / "run", image_size=48, no_crop=False,
                               no_multi_scale=False))

    def samples(workers: int, epoch: int) -> list[torch.Tensor]:
        trainer.seeded.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(trainer.seeded, batch_size=None, num_workers=workers,
                                             collate_fn=lambda sample: sample,
                                             generator=torch.Generator())
        return [image for image, _ in loader]

    torch.manual_seed(123)
    random.seed(7)
    expected_torch, expected_python = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(7)
    here = samples(0, epoch=0)
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_python
    torch.manual_seed(456)
    assert all(torch.equal(a, b) for a, b in zip(here, samples(0, epoch=0), strict=True))
    in_worker = samples(1, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(here, in_worker, strict=True))
    next_epoch = samples(0, epoch=1)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(here, next_epoch, strict=True))

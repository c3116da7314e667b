"""The CUDA paths: the same outputs and training as on the CPU, AMP, the commands on a GPU.

Every test here needs a CUDA GPU and is skipped without one (CI has none). On a GPU machine:
`pytest tests/test_cuda.py`. TF32 is switched off in these tests, so CPU and GPU compute in
float32 alike and are compared at the model's parity tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _util import import_oracle, perturbed_model, tiny_cfg, tiny_config, tiny_dataset
from PIL import Image

import dabdetr
from dabdetr.cli import main
from dabdetr.engine.config import TrainConfig
from dabdetr.engine.trainer import Trainer
from dabdetr.optimize import CUDAGraphed, optimize_for_inference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = 1e-4


@pytest.fixture(autouse=True)
def _float32_matmuls():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def _cfg(data_dir: Path, out: Path, dropout: float = 0.0, **kw) -> TrainConfig:
    return tiny_cfg(data_dir, out, model_overrides={"num_queries": 10, "dropout": dropout}, **kw)


def _model(**overrides) -> dabdetr.DabDetr:
    torch.manual_seed(0)
    return perturbed_model(tiny_config(**overrides))


def _batch(device: str = "cpu"):
    torch.manual_seed(1)
    images, mask = dabdetr.batch_images([torch.randn(3, 96, 128), torch.randn(3, 64, 100)])
    return images.to(device), mask.to(device)


def _close(out, ref, atol: float = TOL) -> None:
    torch.testing.assert_close(out.pred_logits.float().cpu(), ref.pred_logits, atol=atol, rtol=0)
    torch.testing.assert_close(out.pred_boxes.float().cpu(), ref.pred_boxes, atol=atol, rtol=0)
    for a, b in zip(out.aux_outputs, ref.aux_outputs, strict=True):
        torch.testing.assert_close(a.pred_logits.float().cpu(), b.pred_logits, atol=atol, rtol=0)


@pytest.mark.parametrize("variant", [{}, {"num_patterns": 2, "dilation": True}],
                         ids=["base", "patterns-dc5"])
def test_forward_on_cuda_matches_cpu(variant):
    model = _model(**variant)
    images, mask = _batch()
    with torch.inference_mode():
        ref = model(images, mask)
        model.cuda()
        out = model(*_batch("cuda"))
        fused = optimize_for_inference(model)(*_batch("cuda"))
    assert out.pred_logits.device.type == "cuda"
    _close(out, ref)
    _close(fused, ref)


def test_bf16_inference_on_cuda_is_close_not_equal():
    model = _model()
    images, mask = _batch()
    with torch.inference_mode():
        ref = model(images, mask)
        low = optimize_for_inference(model.cuda(), bf16=True)(*_batch("cuda"))
    assert low.pred_logits.dtype == torch.float32 and low.pred_boxes.dtype == torch.float32
    assert not torch.equal(low.pred_logits.cpu(), ref.pred_logits)  # bfloat16 did happen
    _close(low, ref, atol=0.1)
    assert (low.pred_boxes.cpu() - ref.pred_boxes).abs().max() < 1e-2


def test_cuda_graphs_replay_the_fused_model():
    """The same outputs as the fused model, per input shape, in fresh tensors that the next
    replay leaves alone; a graph per shape, recaptured once evicted."""
    fused = optimize_for_inference(_model().cuda())
    graphed = CUDAGraphed(fused, max_shapes=2)
    torch.manual_seed(2)
    inputs = [dabdetr.batch_images([torch.randn(3, h, w) for h, w in sizes])
              for sizes in ([(96, 128)], [(96, 128)], [(64, 100), (80, 90)])]
    inputs = [(images.cuda(), mask.cuda()) for images, mask in inputs]
    with torch.inference_mode():
        expected = [fused(*x) for x in inputs]
    outputs = [graphed(*x) for x in inputs]
    assert graphed.captures == 2  # the first two inputs share a shape
    for out, ref in zip(outputs, expected, strict=True):
        for a, b in ((out, ref), *zip(out.aux_outputs, ref.aux_outputs, strict=True)):
            torch.testing.assert_close(a.pred_logits, b.pred_logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(a.pred_boxes, b.pred_boxes, atol=1e-5, rtol=0)
    assert not torch.equal(outputs[0].pred_logits, outputs[1].pred_logits)
    graphed(*_batch("cuda"))  # a third shape evicts the least recently used (the first)
    again = graphed(*inputs[0])
    assert graphed.captures == 4
    torch.testing.assert_close(again.pred_logits, expected[0].pred_logits, atol=1e-5, rtol=0)
    assert graphed.config is fused.config


def test_cuda_matches_transformers(tmp_path):
    transformers = import_oracle("transformers")
    dabdetr.export_huggingface(_model(num_classes=91, inverse_sigmoid_eps=1e-5), tmp_path / "hf")
    hf = transformers.DabDetrForObjectDetection.from_pretrained(tmp_path / "hf").cuda().eval()
    ours = dabdetr.load_model(tmp_path / "hf", device="cuda")
    images, mask = _batch("cuda")
    with torch.inference_mode():
        out = ours(images, mask)
        ref = hf(pixel_values=images, pixel_mask=(~mask).long())
    torch.testing.assert_close(out.pred_logits, ref.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=TOL, rtol=0)


def test_training_on_cuda_follows_the_cpu(data_dir, tmp_path):
    """The same first loss as on the CPU, and after two AdamW steps the same third loss up to
    how float rounding moves an lr-sized Adam step (see test_train's DDP test)."""
    losses = {}
    for device in ("cpu", "cuda"):
        trainer = Trainer(_cfg(data_dir, tmp_path / device), device=device)
        loader = iter(trainer._loader())
        batches = [next(loader) for _ in range(3)]
        losses[device] = [trainer.train_step([b])["loss"] for b in batches]
        assert next(trainer.model.parameters()).device.type == device
    assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], rel=1e-5)
    assert losses["cuda"][2] == pytest.approx(losses["cpu"][2], rel=1e-2)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_on_cuda(data_dir, tmp_path, amp):
    first = {}
    for mode in ("none", amp):
        trainer = Trainer(_cfg(data_dir, tmp_path / mode, amp=mode, max_steps=4, log_every=1),
                          device="cuda")
        first[mode] = trainer.train_step([next(iter(trainer._loader()))])["loss"]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    assert first[amp] == pytest.approx(first["none"], rel=0.05)
    assert first[amp] != first["none"]  # autocast did change the arithmetic
    trainer.fit()
    losses = [h["loss"] for h in map(json.loads, trainer.log.path.read_text().splitlines())
              if h.get("type") == "step" and "loss" in h]
    assert trainer.step == 4 and all(torch.isfinite(torch.tensor(losses)))
    ckpt = torch.load(tmp_path / amp / "last.pt", map_location="cpu", weights_only=True)
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    model = dabdetr.load_model(tmp_path / amp / "last.pt")  # a GPU run's checkpoint, on the CPU
    assert next(model.parameters()).device.type == "cpu"


def test_resume_on_cuda_continues_exactly(data_dir, tmp_path):
    """With dropout on, so the saved CUDA generator matters."""
    kw = dict(deterministic=True, dropout=0.1)
    full = Trainer(_cfg(data_dir, tmp_path / "full", max_steps=5, **kw), device="cuda")
    full.fit()
    first = Trainer(_cfg(data_dir, tmp_path / "split", max_steps=2, **kw), device="cuda")
    first.fit()
    torch.cuda.manual_seed(12345)  # what the resumed run draws must come from the checkpoint
    resumed = Trainer(_cfg(data_dir, tmp_path / "split", max_steps=5, **kw), device="cuda",
                      resume=str(tmp_path / "split" / "last.pt"))
    resumed.fit()
    for (key, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(),
                           strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=key)


def test_commands_on_cuda(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--model", "cpu-tiny",
                 "--set", "num_queries=10", "--max-steps", "6", "--batch-size", "4",
                 "--image-size", "64", "--no-crop", "--num-workers", "1", "--eval-every", "1",
                 "--device", "cuda", "--amp", "bf16", "--no-progress"]) == 0
    assert "final: AP" in capsys.readouterr().out
    assert main(["evaluate", "--weights", str(run / "last.pt"), "--data", str(data_dir),
                 "--eval-size", "64", "--num-workers", "0", "--device", "cuda",
                 "--optimize", "fused", "--out", str(tmp_path / "eval")]) == 0
    assert "AP" in json.loads((tmp_path / "eval" / "metrics.json").read_text())
    Image.new("RGB", (80, 60), (120, 30, 200)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--weights", str(run / "last.pt"),
                 "--out", str(tmp_path / "pred"), "--size", "64", "--device", "cuda",
                 "--threshold", "0", "--no-draw"]) == 0
    plain = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert len(plain) > 0
    assert main(["predict", str(tmp_path / "a.png"), "--weights", str(run / "last.pt"),
                 "--out", str(tmp_path / "graph"), "--size", "64", "--device", "cuda",
                 "--threshold", "0", "--optimize", "cudagraph", "--explain", "2"]) == 0
    assert (tmp_path / "graph" / "images" / "a_attention.jpg").is_file()
    graphed = json.loads((tmp_path / "graph" / "detections.json").read_text())
    assert len(graphed) == len(plain)
    assert max(abs(a["score"] - b["score"]) for a, b in zip(
        sorted(plain, key=lambda d: d["score"]), sorted(graphed, key=lambda d: d["score"]),
        strict=True)) < 1e-4


def test_torchrun_nccl_one_process(data_dir, tmp_path):
    """`torchrun -m dabdetr train` on a GPU: the NCCL process group, DDP and the gathered
    evaluation, in one process (a single-GPU machine cannot run two)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(dabdetr.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
         "-m", "dabdetr", "train", "--data", str(data_dir), "--out", str(tmp_path / "ddp"),
         "--model", "cpu-tiny", "--set", "num_queries=10", "--max-steps", "3",
         "--batch-size", "4", "--image-size", "64", "--no-crop", "--num-workers", "0",
         "--eval-every", "1", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3 and "cuda" in ckpt["rng"][0]

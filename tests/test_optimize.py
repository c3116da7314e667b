"""optimize_for_inference and the folded backbone compute what the plain modules compute."""

from __future__ import annotations

import pytest
import torch
from _util import perturbed_model, tiny_config
from torch import nn

import dabdetr
from dabdetr import optimize
from dabdetr.models.backbone import Backbone
from dabdetr.optimize import FusedBackbone, FusedResNet, optimize_for_inference

TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second thread only adds synchronization (and stalls on a busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _padded_batch():
    return dabdetr.batch_images([torch.randn(3, 96, 128), torch.randn(3, 64, 100)])


def _assert_same(a, b, tol=TOL):
    torch.testing.assert_close(a.pred_logits, b.pred_logits, atol=tol, rtol=0)
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes, atol=tol, rtol=0)
    for x, y in zip(a.aux_outputs, b.aux_outputs, strict=True):
        torch.testing.assert_close(x.pred_logits, y.pred_logits, atol=tol, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"backbone": "resnet50"}, {"dilation": True}, {"pad_invariant": True},
     {"backbone_norm": "batch"}],
    ids=["r18", "r50", "dc5", "pad_invariant", "batchnorm"],
)
def test_optimized_equals_plain(overrides):
    model = perturbed_model(tiny_config(**overrides))
    fast = optimize_for_inference(model)
    assert isinstance(fast.backbone, FusedBackbone)
    images, mask = _padded_batch()
    with torch.inference_mode():
        _assert_same(fast(images, mask), model(images, mask))
        _assert_same(fast(images[:1], mask[:1]), model(images[:1], mask[:1]))
        _assert_same(fast(images, None), model(images, None))


def test_fallback_convolutions_match(monkeypatch):
    """The F.conv2d path (CUDA, CPU builds without oneDNN) gives the same outputs."""
    model = perturbed_model(tiny_config(backbone="resnet50"))
    fast = optimize_for_inference(model)
    images, mask = _padded_batch()
    with torch.inference_mode():
        expected = fast(images, mask)
        monkeypatch.setattr(optimize, "onednn_fusion", lambda dtype=None: False)
        _assert_same(fast(images, mask), expected)


@pytest.mark.skipif(not optimize.onednn_fusion(torch.bfloat16),
                    reason="oneDNN takes no bfloat16 on this CPU (needs AVX512 or AVX-NE-CONVERT)")
def test_bf16_off_onednn_is_close_to_the_onednn_kernels(monkeypatch):
    """bf16=True on the F.conv2d path (CUDA, CPU builds without oneDNN) as on oneDNN's."""
    fast = optimize_for_inference(perturbed_model(tiny_config()), bf16=True)
    images, mask = _padded_batch()
    with torch.inference_mode():
        onednn = fast(images, mask)
        monkeypatch.setattr(optimize, "onednn_fusion", lambda dtype=None: False)
        plain = fast(images, mask)
    assert plain.pred_boxes.dtype == torch.float32
    torch.testing.assert_close(plain.pred_boxes, onednn.pred_boxes, atol=1e-2, rtol=0)
    torch.testing.assert_close(plain.pred_logits, onednn.pred_logits, atol=0.05, rtol=0.05)


def test_tiny_feature_map():
    """A 32x32 image gives a 1x1 feature map, where NCHW and NHWC strides coincide."""
    model = perturbed_model(tiny_config())
    fast = optimize_for_inference(model)
    images = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        _assert_same(fast(images), model(images))


@pytest.mark.parametrize("mode", ["fused", "int8", "bf16"])
def test_original_not_mutated(mode):
    model = perturbed_model(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backbone, transformer = model.backbone, model.transformer
    fast = optimize.optimized(model, mode)
    assert fast is not model
    assert model.backbone is backbone and model.transformer is transformer
    assert type(model.backbone) is Backbone
    assert all(type(m) is not nn.Linear or "quantized" not in type(m).__module__
               for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.requires_grad for p in model.transformer.parameters())
    assert not any(p.requires_grad for p in fast.parameters())


def test_input_not_mutated():
    fast = optimize_for_inference(perturbed_model(tiny_config()))
    images, mask = _padded_batch()
    copy = images.clone()
    with torch.inference_mode():
        fast(images, mask)
    assert torch.equal(images, copy)


def test_int8_runs_and_stays_close():
    model = perturbed_model(tiny_config())
    quantized = optimize_for_inference(model, quantize="int8")
    images, mask = _padded_batch()
    with torch.inference_mode():
        ref, out = model(images, mask), quantized(images, mask)
    # dynamic int8 is approximate: documented as ~1e-2 on logits
    assert (out.pred_logits - ref.pred_logits).abs().max() < 0.2
    assert (out.pred_boxes - ref.pred_boxes).abs().max() < 0.05


def test_bad_arguments():
    with pytest.raises(TypeError, match="DabDetr"):
        optimize_for_inference(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="quantize"):
        optimize_for_inference(dabdetr.DabDetr(tiny_config()), quantize="int4")
    with pytest.raises(TypeError, match="ResNet body"):
        FusedResNet(nn.Sequential(nn.Conv2d(3, 3, 1)))


@pytest.mark.parametrize("overrides", [{}, {"backbone_norm": "batch",
                                             "backbone_trainable_layers": 5}],
                         ids=["frozen_bn", "trainable_bn"])
def test_evaluation_after_training_steps_sees_the_new_weights(overrides):
    """Evaluating between training steps, as the trainer does, must use the current weights
    and batch-norm statistics. Fused AdamW and BatchNorm's running-statistics update change
    tensors without bumping their version counters, so nothing may be cached on those."""
    from dabdetr.engine.config import TrainConfig
    from dabdetr.engine.schedule import build_optimizer

    model = perturbed_model(tiny_config(**overrides))
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, lr_backbone=1e-2))
    images, mask = _padded_batch()
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            evaluated = model(images, mask)
        fresh = dabdetr.DabDetr(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            _assert_same(evaluated, fresh(images, mask), tol=1e-6)
        model.train()
        out = model(images, mask)
        (out.pred_logits.sum() + out.pred_boxes.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_optimized_modes_of_the_command_line():
    model = perturbed_model(tiny_config())
    assert optimize.optimized(model, "none") is model
    images, mask = _padded_batch()
    with torch.inference_mode():
        expected = model(images, mask)
        fused = optimize.optimized(model, "fused")
        assert isinstance(fused.backbone, FusedBackbone)
        _assert_same(fused(images, mask), expected)
        int8 = optimize.optimized(model, "int8")
        linears = [m for m in int8.transformer.modules() if "quantized" in type(m).__module__]
        assert linears and not any(type(m) is nn.Linear for m in int8.transformer.modules())
        assert torch.isfinite(int8(images, mask).pred_logits).all()
        bf16 = optimize.optimized(model, "bf16")
        assert isinstance(bf16, optimize.AutocastModel) and bf16.dtype == torch.bfloat16
        assert isinstance(bf16.model.backbone, FusedBackbone) and bf16.config == model.config
        seen = []
        for module in (bf16.model.backbone.body.stem, bf16.model.input_proj,
                       bf16.model.class_embed):
            module.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        low = bf16(images, mask)
        assert seen == [torch.bfloat16] * 3  # backbone, projection and transformer in bfloat16
        assert low.pred_logits.dtype == low.pred_boxes.dtype == torch.float32
        torch.testing.assert_close(low.pred_boxes, expected.pred_boxes, atol=2e-2, rtol=0)
        torch.testing.assert_close(low.pred_logits, expected.pred_logits, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="cannot be combined"):
        optimize_for_inference(model, quantize="int8", bf16=True)
    with pytest.raises(ValueError, match="unknown optimization 'int4'"):
        optimize.optimized(model, "int4")
    # CUDA graphs (tests/test_cuda.py) are refused on the CPU, before the model changes
    with pytest.raises(ValueError, match="CUDA graphs run on a CUDA GPU only; this model is on cpu"):
        optimize.optimized(model, "cudagraph")
    assert isinstance(model.backbone, Backbone)
    with pytest.raises(ValueError, match="CUDA GPU only"):
        optimize.CUDAGraphed(model)


def test_onednn_feature_test_is_lazy_and_cached():
    """The private-op check runs on first use (not at import) and once per dtype."""
    optimize.onednn_fusion.cache_clear()
    assert optimize.onednn_fusion.cache_info().currsize == 0
    first = optimize.onednn_fusion(torch.float32)
    assert optimize.onednn_fusion(torch.float32) is first
    assert optimize.onednn_fusion.cache_info().hits >= 1

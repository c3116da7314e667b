"""optimize_for_inference and the folded backbone compute what the plain modules compute."""

from __future__ import annotations

import copy

import pytest
import torch
from _util import perturbed_model, tiny_config
from torch import nn

import dabdetr
from dabdetr import optimize
from dabdetr.models import backbone as backbone_module
from dabdetr.optimize import FusedResNet, optimize_for_inference

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


def _unfolded(model: dabdetr.DabDetr, images, mask, monkeypatch):
    """The reference: the backbone body's own modules (no folding), then the rest."""
    with monkeypatch.context() as patch:
        patch.setattr(backbone_module, "_foldable", lambda body: False)
        return model(images, mask)


def _assert_close_scaled(a, b, tol):
    """max |a - b| <= tol * max |b|: feature maps of random ResNets reach large values."""
    assert (a - b).abs().max() <= tol * b.abs().max()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"backbone": "resnet50"}, {"dilation": True}, {"pad_invariant": True},
     {"backbone_norm": "batch"}],
    ids=["r18", "r50", "dc5", "pad_invariant", "batchnorm"],
)
def test_optimized_equals_plain(overrides, monkeypatch):
    model = perturbed_model(tiny_config(**overrides))
    fast = optimize_for_inference(model)
    assert isinstance(fast.backbone.body, FusedResNet)
    images, mask = _padded_batch()
    with torch.inference_mode():
        _assert_same(fast(images, mask), model(images, mask))
        _assert_same(fast(images[:1], mask[:1]), model(images[:1], mask[:1]))
        _assert_same(fast(images, None), _unfolded(model, images, None, monkeypatch))


def test_fallback_convolutions_match(monkeypatch):
    """The F.conv2d path (CUDA, CPU builds without oneDNN) gives the same outputs."""
    model = perturbed_model(tiny_config(backbone="resnet50"))
    fast = optimize_for_inference(model)
    images, mask = _padded_batch()
    with torch.inference_mode():
        expected = fast(images, mask)
        monkeypatch.setattr(backbone_module, "ONEDNN_FUSION", False)
        _assert_same(fast(images, mask), expected)


@pytest.mark.skipif(not backbone_module.ONEDNN_BF16,
                    reason="oneDNN takes no bfloat16 on this CPU (needs AVX512 or AVX-NE-CONVERT)")
def test_bf16_off_onednn_is_close_to_the_onednn_kernels(monkeypatch):
    """bf16=True on the F.conv2d path (CUDA, CPU builds without oneDNN) as on oneDNN's."""
    fast = optimize_for_inference(perturbed_model(tiny_config()), bf16=True)
    images, mask = _padded_batch()
    with torch.inference_mode():
        onednn = fast(images, mask)
        monkeypatch.setattr(backbone_module, "ONEDNN_FUSION", False)
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


def test_original_not_mutated_unless_inplace():
    model = perturbed_model(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    body = model.backbone.body
    fast = optimize_for_inference(model)
    assert fast is not model and model.backbone.body is body
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.requires_grad for p in model.transformer.parameters())
    assert not any(p.requires_grad for p in fast.parameters())

    same = optimize_for_inference(model, inplace=True)
    assert same is model and isinstance(model.backbone.body, FusedResNet)


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


def _assert_matches_modules_in_training(backbone, images, folded):
    """`folded` (run_body's output for `images`) and the parameter gradients it gives equal
    those of the body's own modules."""
    folded.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad}
    assert grads
    backbone.zero_grad(set_to_none=True)
    plain = backbone.body(images)
    plain.square().mean().backward()
    _assert_close_scaled(folded, plain, 1e-5)
    for name, param in backbone.named_parameters():
        if param.requires_grad:
            _assert_close_scaled(grads[name], param.grad, 1e-4)


def test_folded_backbone_matches_modules_in_training(monkeypatch):
    """Backbone.run_body, made to fold the frozen norms: same features and same gradients as
    the body's own modules, in channels_last memory."""
    monkeypatch.setattr(backbone_module, "FOLD_MIN_MACS_PER_WEIGHT", 0)
    # A ReLU whose input lies within float32 rounding of 0 can open in one computation and not
    # in the other; the one weight gradient it feeds then moves by percents (seen for seeds 0-2
    # of this model, one such ReLU each). The seed is fixed to one without such a tie.
    torch.manual_seed(3)
    model = perturbed_model(tiny_config(backbone="resnet50")).train()
    backbone = model.backbone
    images = torch.randn(2, 3, 64, 96)
    folded = backbone.run_body(images)
    assert folded.is_contiguous(memory_format=torch.channels_last)
    assert not folded.is_contiguous()  # the folded path ran, not the modules
    _assert_matches_modules_in_training(backbone, images, folded)


def _count_fused_kernels(monkeypatch) -> list[bool]:
    """Spy on the folded path's fused convolutions: one entry per call, whether it ran as a
    oneDNN kernel."""
    calls: list[bool] = []
    real = backbone_module.fused_conv2d

    def spy(x, weight, *args, **kwargs):
        calls.append(backbone_module.can_fuse(x, weight))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(backbone_module, "fused_conv2d", spy)
    return calls


@pytest.mark.skipif(not backbone_module.ONEDNN_FUSION, reason="needs oneDNN's fused kernels")
@pytest.mark.parametrize("overrides", [{"backbone": "resnet50"},
                                       {"backbone": "resnet50", "dilation": True}, {}],
                         ids=["r50", "dc5", "r18"])  # r18: layer1.0 adds in place into the pool output
def test_frozen_units_of_the_folded_path_run_fused(monkeypatch, overrides):
    """What autograd need not record runs as fused oneDNN kernels: the whole body without
    grad, the frozen stem and layer1 in training. Same features and gradients as the modules;
    the caller's images are left as they were."""
    monkeypatch.setattr(backbone_module, "FOLD_MIN_MACS_PER_WEIGHT", 0)
    calls = _count_fused_kernels(monkeypatch)
    torch.manual_seed(3)  # no ReLU ties, see test_folded_backbone_matches_modules_in_training
    backbone = perturbed_model(tiny_config(**overrides)).train().backbone
    images = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    given = images.clone()
    convs = [m for m in backbone.body.modules() if isinstance(m, nn.Conv2d)]
    frozen = [m for m in convs if not m.weight.requires_grad]
    assert 0 < len(frozen) < len(convs)  # the stem and layer1 (recipe: layers 2-4 trained)
    with torch.no_grad():
        _assert_close_scaled(backbone.run_body(images), backbone.body(images), 1e-5)
    assert calls == [True] * len(convs)
    calls.clear()
    folded = backbone.run_body(images)
    assert calls == [True] * len(frozen)
    _assert_matches_modules_in_training(backbone, images, folded)
    assert torch.equal(images, given)
    # a trained stem: nothing is fused; input that needs its gradient: likewise
    calls.clear()
    backbone.body.conv1.weight.requires_grad_(True)
    backbone.run_body(images)
    backbone.body.conv1.weight.requires_grad_(False)
    backbone.run_body(images.clone().requires_grad_(True))
    assert calls == []


def test_folded_path_without_onednn_kernels_and_under_autocast(monkeypatch):
    """Where oneDNN's fused kernels are missing (other builds) the frozen units run as the
    trained ones do (F.conv2d), to the same result; under CPU autocast likewise, since
    autocast casts F.conv2d to bfloat16."""
    monkeypatch.setattr(backbone_module, "FOLD_MIN_MACS_PER_WEIGHT", 0)
    torch.manual_seed(0)
    backbone = perturbed_model(tiny_config(backbone="resnet50")).backbone
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = backbone.body(images)
        calls = _count_fused_kernels(monkeypatch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = backbone.run_body(images)
        assert calls == [] and low.dtype == torch.bfloat16
        _assert_close_scaled(low.float(), expected, 5e-2)
        monkeypatch.setattr(backbone_module, "ONEDNN_FUSION", False)
        folded = backbone.run_body(images)
        assert folded.is_contiguous(memory_format=torch.channels_last)  # folded, unfused
        _assert_close_scaled(folded, expected, 1e-5)
        assert calls == []


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [(1, 1, 0, 1), (1, 2, 0, 1), (1, 1, 1, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2),
     (7, 2, 3, 1)],
    ids=["1x1", "1x1-s2", "1x1-padded", "3x3", "3x3-s2", "3x3-dilated", "7x7-s2"])
@pytest.mark.parametrize(("input_grad", "weight_grad"), [(True, True), (False, True), (True, False)],
                         ids=["x-and-weight-grad", "weight-grad", "x-grad"])
@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "onednn"])
def test_folded_convolution_equals_the_convolution_of_the_scaled_kernel(
        kernel, stride, padding, dilation, input_grad, weight_grad, gemm):
    """_FoldedConv2d: the output of F.conv2d with the kernel scaled per output channel, and
    autograd's gradients through it for the input and the weight parameter, the weight's
    gradient in the parameter's own layout; its weight gradient as a GEMM over the patches
    or by the convolution's backward (float64, so float rounding cannot hide a wrong patch
    order)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 11, 9, generator=gen, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(input_grad)
    weight = torch.randn(4, 5, kernel, kernel, generator=gen, dtype=torch.float64,
                         requires_grad=weight_grad)
    scale = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    shift = torch.randn(4, generator=gen, dtype=torch.float64)
    geometry = ((stride, stride), (padding, padding), (dilation, dilation))
    out = backbone_module._FoldedConv2d.apply(x, weight, scale, shift, *geometry, gemm)
    ref = torch.nn.functional.conv2d(x, weight * scale[:, None, None, None], shift, *geometry)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    inputs = [t for t in (x, weight) if t.requires_grad]
    got = torch.autograd.grad(out, inputs, grad)
    expected = torch.autograd.grad(ref, inputs, grad)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert torch.allclose(g, e, rtol=0, atol=1e-10)
    if weight_grad:
        assert got[-1].stride() == weight.stride()  # taken by AccumulateGrad as it is


@pytest.mark.parametrize("strided_gemm", [False, True], ids=["avx512", "avx2"])
def test_folded_training_takes_the_gemm_weight_gradient_where_it_pays(monkeypatch, strided_gemm):
    """In training, the trained convolutions run as _FoldedConv2d: the 1x1 ones and the 3x3
    ones with many weights per output pixel with their weight gradient as a GEMM (and on CPUs
    without AVX-512 the strided ones too), the others by oneDNN; none without grad, nor under
    CPU autocast."""
    monkeypatch.setattr(backbone_module, "FOLD_MIN_MACS_PER_WEIGHT", 0)
    monkeypatch.setattr(backbone_module, "STRIDED_GEMM_WEIGHT_GRAD", strided_gemm)
    taken: dict[tuple[int, ...], list[bool]] = {}
    real = backbone_module._FoldedConv2d.apply

    def spy(x, weight, *args):
        taken.setdefault(tuple(weight.shape), []).append(args[-1])
        return real(x, weight, *args)

    monkeypatch.setattr(backbone_module._FoldedConv2d, "apply", spy)
    torch.manual_seed(0)
    backbone = perturbed_model(tiny_config(backbone="resnet50")).train().backbone
    images = torch.randn(1, 3, 128, 128)
    backbone.run_body(images)
    trained = [m for m in backbone.body.modules()
               if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    assert sum(map(len, taken.values())) == len(trained)
    pointwise = [gemm for shape, calls in taken.items() if shape[-1] == 1 for gemm in calls]
    assert len(pointwise) == sum(m.kernel_size == (1, 1) for m in trained) and all(pointwise)
    # at 128x128 layer4's 3x3 kernels (2.4M weights) have 4x4 output pixels, above the
    # factor; layer2's (147k weights) have 16x16, under it: only its first (strided) one
    # takes the GEMM, and only without AVX-512
    assert all(taken[(512, 512, 3, 3)])
    assert taken[(128, 128, 3, 3)] == [strided_gemm] + [False] * 3
    taken.clear()
    with torch.no_grad():
        backbone.run_body(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        backbone.run_body(images)
    assert taken == {}


@pytest.mark.skipif(not backbone_module.ONEDNN_FUSION, reason="needs oneDNN's fused kernels")
def test_flop_counter_counts_the_fused_kernels(monkeypatch):
    """torch's FlopCounterMode gives the same count whether the backbone runs its modules, the
    fused oneDNN kernels of the folded path, or optimize_for_inference's (as
    `python -m dabdetr.presets` prints it)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = perturbed_model(tiny_config(backbone="resnet50")).requires_grad_(False)
    images = torch.randn(1, 3, 64, 96)

    def count(m) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(images)
        return counter.get_total_flops()

    monkeypatch.setattr(backbone_module, "_foldable", lambda body: False)
    modules = count(model)
    monkeypatch.undo()
    monkeypatch.setattr(backbone_module, "FOLD_MIN_MACS_PER_WEIGHT", 0)
    calls = _count_fused_kernels(monkeypatch)
    folded = count(model)
    assert calls and all(calls)  # the fused kernels ran
    assert folded == modules > 0
    assert count(optimize_for_inference(model)) == modules


def test_trainable_batch_norm_is_not_folded():
    model = dabdetr.DabDetr(tiny_config(backbone_norm="batch")).train()
    images = torch.randn(2, 3, 64, 64)
    stats = model.backbone.body.bn1.running_mean.clone()
    model.backbone.run_body(images)
    # batch statistics were used and the running mean updated, as nn.BatchNorm2d does
    assert not torch.equal(stats, model.backbone.body.bn1.running_mean)



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
        fused = optimize.optimized(copy.deepcopy(model), "fused")
        assert isinstance(fused.backbone.body, FusedResNet)
        _assert_same(fused(images, mask), expected)
        int8 = optimize.optimized(copy.deepcopy(model), "int8")
        linears = [m for m in int8.transformer.modules() if "quantized" in type(m).__module__]
        assert linears and not any(type(m) is nn.Linear for m in int8.transformer.modules())
        assert torch.isfinite(int8(images, mask).pred_logits).all()
        bf16 = optimize.optimized(copy.deepcopy(model), "bf16")
        assert isinstance(bf16.backbone.body, FusedResNet) and bf16.autocast_dtype == torch.bfloat16
        seen = []
        for module in (bf16.backbone.body.stem, bf16.input_proj, bf16.class_embed):
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
    assert not isinstance(model.backbone.body, FusedResNet)
    with pytest.raises(ValueError, match="CUDA GPU only"):
        optimize.CUDAGraphed(model)


@pytest.mark.parametrize("name,dilation", [("resnet18", False), ("resnet50", False),
                                           ("resnet50", True), ("resnet101", False)])
def test_fold_cost_model_counts_what_the_flop_counter_counts(name, dilation):
    from torch.utils.flop_counter import FlopCounterMode

    body = backbone_module.Backbone(name, dilation=dilation).body.requires_grad_(False)
    macs_per_pixel, kernels = backbone_module._cost_model(body)
    with FlopCounterMode(display=False) as counter:
        body(torch.zeros(1, 3, 128, 96))
    assert macs_per_pixel * 128 * 96 == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    assert kernels == sum(m.weight.numel() for m in body.modules()
                          if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))


def test_fold_choice():
    """Folded in channels_last for large inputs; the modules as they are where rebuilding and
    transposing the folded weights would cost more than folding saves (small images), in
    inference and training alike."""
    r50 = backbone_module.Backbone("resnet50")
    r18 = backbone_module.Backbone("resnet18")

    def pays(body, images):
        return backbone_module._folding_pays(images, backbone_module._cost_model(body))
    with torch.no_grad():
        assert pays(r50.body, torch.empty(1, 3, 800, 1088))
        assert pays(r50.body, torch.empty(1, 3, 384, 384))
        assert pays(r50.body, torch.empty(1, 3, 256, 256))
        assert not pays(r50.body, torch.empty(1, 3, 192, 192))
        assert not pays(r18.body, torch.empty(1, 3, 128, 160))
    assert pays(r50.body, torch.empty(2, 3, 512, 512))  # training: its layers 2-4 are trained
    assert pays(r50.body, torch.empty(2, 3, 224, 224))
    assert pays(r18.body, torch.empty(2, 3, 256, 256))
    assert not pays(r50.body, torch.empty(2, 3, 160, 160))
    assert not pays(r18.body, torch.empty(2, 3, 160, 160))
    # measured on CPUs only: other devices always fold
    assert pays(r18.body, torch.empty(1, 3, 128, 160, device="meta"))


def test_small_inputs_run_the_modules_as_they_are():
    """Below the folding threshold run_body is exactly the body's own forward, and nothing of
    the folded path is kept for the backward pass (no folded weight copies)."""
    torch.manual_seed(0)
    model = perturbed_model(tiny_config()).train()
    backbone = model.backbone
    images = torch.randn(2, 3, 64, 64)
    assert not backbone_module._folding_pays(images, backbone_module._cost_model(backbone.body))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        features = backbone.run_body(images)
    assert features.is_contiguous()
    assert torch.equal(features, backbone.body(images))
    params = {p.data_ptr() for p in backbone.parameters()}
    weights = [t for t in saved if t.dim() == 4 and t.shape[0] > 2 and t.data_ptr() not in params]
    assert not weights, [tuple(t.shape) for t in weights]

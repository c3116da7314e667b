"""Winograd 3x3 convolutions (models/winograd.py): exact in float64, within the stated float32
error, and taken by the backbone only where it was measured to pay."""

import pytest
import torch
import torch.nn.functional as F
from _util import tiny_config
from torch import nn

import dabdetr
from dabdetr.models import backbone as backbone_module
from dabdetr.models import winograd
from dabdetr.models.winograd import winograd_conv3x3, winograd_tile


def _case(n, c, k, h, w, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight = (torch.randn(k, c, 3, 3, generator=gen, dtype=dtype) / (9 * c) ** 0.5).requires_grad_(True)
    scale = torch.rand(k, generator=gen, dtype=dtype) + 0.5
    shift = torch.randn(k, generator=gen, dtype=dtype)
    grad = torch.randn(n, k, h, w, generator=gen, dtype=dtype)
    return x, weight, scale, shift, grad


def _reference(x, weight, scale, shift, grad):
    """conv2d of the scaled kernel, its output and autograd's input and weight gradients."""
    out = F.conv2d(x, weight * scale[:, None, None, None], shift, padding=1)
    return (out, *torch.autograd.grad(out, (x, weight), grad))


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize(("n", "c", "k", "h", "w"),
                         [(2, 6, 4, 8, 8), (1, 5, 7, 7, 9), (3, 4, 4, 13, 5), (1, 3, 2, 1, 1),
                          (2, 4, 3, 2, 6)],
                         ids=["whole-blocks", "partial-blocks", "tall", "one-pixel", "short"])
def test_winograd_equals_the_direct_convolution_in_float64(m, n, c, k, h, w):
    """Output, input gradient and weight gradient equal the direct convolution's to float64
    rounding, whether or not the image is a whole number of blocks; the output and the input
    gradient are channels_last, the weight gradient has the parameter's layout."""
    x, weight, scale, shift, grad = _case(n, c, k, h, w, torch.float64)
    out = winograd_conv3x3(x, weight, scale, shift, m)
    got = (out, *torch.autograd.grad(out, (x, weight), grad))
    for g, e in zip(got, _reference(x, weight, scale, shift, grad), strict=True):
        assert g.shape == e.shape
        assert torch.allclose(g, e, rtol=0, atol=1e-11)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    assert got[2].stride() == weight.stride()


@pytest.mark.parametrize("trained", ["input", "weight"])
def test_winograd_gives_only_the_gradients_asked_for(trained):
    """A frozen kernel on a trained input (or the reverse) gets no gradient, and the other
    gradient is still right."""
    x, weight, scale, shift, grad = _case(2, 4, 3, 6, 5, torch.float64)
    (x if trained == "weight" else weight).requires_grad_(False)
    wanted = x if trained == "input" else weight
    ref = F.conv2d(x, weight * scale[:, None, None, None], shift, padding=1)
    (expected,) = torch.autograd.grad(ref, wanted, grad)
    winograd_conv3x3(x, weight, scale, shift, 4).backward(grad)
    assert torch.allclose(wanted.grad, expected, rtol=0, atol=1e-11)
    assert (x.grad if trained == "weight" else weight.grad) is None


@pytest.mark.parametrize(("m", "bound"), [(2, 2e-6), (4, 2e-5)])
def test_winograd_float32_error_is_as_documented(m, bound):
    """In float32, F(2x2) is about as exact as the direct convolution (~1e-6 relative to the
    largest value, against float64) and F(4x4) less (~5e-6), both far inside 1e-4."""
    x, weight, scale, shift, grad = _case(2, 128, 128, 16, 16, torch.float32)
    exact = _reference(*(t.detach().double().requires_grad_(t.requires_grad)
                         for t in (x, weight, scale, shift, grad)))
    out = winograd_conv3x3(x, weight, scale, shift, m)
    got = (out, *torch.autograd.grad(out, (x, weight), grad))
    for g, e in zip(got, exact, strict=True):
        assert ((g.double() - e).abs().max() / e.abs().max()).item() < bound


def test_winograd_only_where_it_pays():
    """F(4x4) with 256+ channels and 64+ tiles, or 128+ channels and 64-1024 tiles; else
    F(2x2) with 256+ channels and 32+ tiles; never for strided, dilated, grouped, non-3x3
    kernels, other dtypes."""
    conv = nn.Conv2d(256, 256, 3, padding=1)
    assert winograd_tile(conv, torch.empty(2, 256, 32, 32)) == 4  # 2 x 8 x 8 tiles of 4x4
    assert winograd_tile(conv, torch.empty(2, 256, 128, 128)) == 4  # 2048 tiles
    assert winograd_tile(conv, torch.empty(2, 256, 16, 16)) == 2  # 32 tiles of 4x4, 128 of 2x2
    assert winograd_tile(conv, torch.empty(1, 256, 8, 8)) == 0  # 16 tiles of 2x2
    assert winograd_tile(conv, torch.empty(2, 256, 32, 32, dtype=torch.float64)) == 0
    narrow = nn.Conv2d(128, 128, 3, padding=1)
    assert winograd_tile(narrow, torch.empty(2, 128, 32, 32)) == 4
    assert winograd_tile(narrow, torch.empty(1, 128, 128, 128)) == 4  # 1024 tiles
    assert winograd_tile(narrow, torch.empty(2, 128, 96, 96)) == 0  # 1152 tiles
    assert winograd_tile(narrow, torch.empty(2, 128, 16, 16)) == 0  # F(2x2) does not pay there
    assert winograd_tile(nn.Conv2d(64, 64, 3, padding=1), torch.empty(2, 64, 128, 128)) == 0
    for other in (nn.Conv2d(256, 256, 3, padding=1, stride=2),
                  nn.Conv2d(256, 256, 3, padding=2, dilation=2),
                  nn.Conv2d(256, 256, 3, padding=1, groups=2),
                  nn.Conv2d(256, 256, 1), nn.Conv2d(256, 256, 3, padding=0)):
        assert winograd_tile(other, torch.empty(2, 256, 32, 32)) == 0


def test_winograd_rejects_bad_arguments():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="block size"):
        winograd_conv3x3(x, torch.randn(4, 4, 3, 3), torch.ones(4), torch.zeros(4), 3)
    with pytest.raises(ValueError, match="3, 3"):
        winograd_conv3x3(x, torch.randn(4, 4, 5, 5), torch.ones(4), torch.zeros(4), 2)


def test_backbone_trains_through_winograd_where_it_pays(monkeypatch):
    """In a training step of the folded R50 body at 256x256, layer2's stride-1 3x3 kernels
    (128 channels, 8x8 blocks of 4x4) take F(4x4), layer3's (256 channels, 32 blocks of 4x4)
    F(2x2), layer4's (too few tiles) and every strided one stay direct; features and gradients
    equal those of the body's own modules. Nothing takes it without grad."""
    monkeypatch.setattr(backbone_module, "FOLD_MIN_MACS_PER_WEIGHT", 0)
    taken: list[tuple[int, int]] = []
    real = winograd.winograd_conv3x3

    def spy(x, weight, scale, shift, m):
        taken.append((weight.shape[0], m))
        return real(x, weight, scale, shift, m)

    monkeypatch.setattr(backbone_module, "winograd_conv3x3", spy)
    torch.manual_seed(3)  # no ReLU within rounding of 0, see test_optimize
    backbone = dabdetr_r50_backbone()
    images = torch.randn(1, 3, 256, 256)
    folded = backbone.run_body(images)
    assert taken == [(128, 4)] * 3 + [(256, 2)] * 5
    folded.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad}
    backbone.zero_grad(set_to_none=True)
    plain = backbone.body(images)
    plain.square().mean().backward()
    assert _scaled_error(folded, plain) < 1e-5
    for name, param in backbone.named_parameters():
        if param.requires_grad:
            assert _scaled_error(grads[name], param.grad) < 1e-4, name
    taken.clear()
    with torch.no_grad():
        backbone.run_body(images)
    assert taken == []


def dabdetr_r50_backbone() -> nn.Module:
    """The R50 backbone of a tiny model, its frozen norms' statistics made non-trivial."""
    backbone = dabdetr.DabDetr(tiny_config(backbone="resnet50")).train().backbone
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0, (2 / module.weight[0].numel()) ** 0.5)
            if hasattr(module, "running_var"):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.2, 0.5)
                module.bias.uniform_(-0.1, 0.1)
    return backbone


def _scaled_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()

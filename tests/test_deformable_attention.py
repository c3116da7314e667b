"""Multi-scale deformable attention against an explicit float64 bilinear reference."""

from __future__ import annotations

import math

import pytest
import torch

from dabdetr.models.deformable_attention import MSDeformAttn, ms_deform_attn

SHAPES = [(5, 7), (3, 4), (2, 2)]


def _layout(shapes):
    spatial = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial, starts, int(sizes.sum())


def bilinear(img: list, height: int, width: int, x: float, y: float) -> list[float]:
    """One sample of `img` (img[i][j] = channel list at row i, column j) at normalized (x, y):
    pixel (x * W - 0.5, y * H - 0.5), corners outside the map count as zero."""
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = [0.0] * len(img[0][0])
    for dy in (0, 1):
        for dx in (0, 1):
            i, j = y0 + dy, x0 + dx
            if 0 <= i < height and 0 <= j < width:
                w = (1 - abs(px - j)) * (1 - abs(py - i))
                out = [o + w * v for o, v in zip(out, img[i][j], strict=True)]
    return out


def reference(value, shapes, locations, weights) -> torch.Tensor:
    """Loops over batch, query, head, level, point (float64 python arithmetic)."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads * head_dim, dtype=torch.float64)
    start = 0
    maps = []
    for h, w in shapes:
        maps.append((start, h, w))
        start += h * w
    for b in range(batch):
        for m in range(heads):
            images = [[[value[b, s + i * w + j, m].tolist() for j in range(w)] for i in range(h)]
                      for s, h, w in maps]
            for q in range(queries):
                acc = [0.0] * head_dim
                for lvl, (_, h, w) in enumerate(maps):
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        sample = bilinear(images[lvl], h, w, x, y)
                        a = float(weights[b, q, m, lvl, p])
                        acc = [c + a * s for c, s in zip(acc, sample, strict=True)]
                out[b, q, m * head_dim:(m + 1) * head_dim] = torch.tensor(acc, dtype=torch.float64)
    return out


def _random_inputs(dtype=torch.float32, batch=2, queries=4, heads=2, head_dim=3, points=3):
    spatial, starts, cells = _layout(SHAPES)
    value = torch.randn(batch, cells, heads, head_dim, dtype=dtype)
    # from -0.3 to 1.3: a good share of the points fall (partly or fully) outside the map
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, dtype=dtype)
    return value, spatial, starts, locations, weights


def test_core_equals_float64_reference_including_outside_points():
    value, spatial, starts, locations, weights = _random_inputs()
    outside = ((locations < 0) | (locations > 1)).any(-1)
    assert outside.float().mean() > 0.2  # the case under test is really exercised
    ours = ms_deform_attn(value, spatial, starts, locations, weights)
    ref = reference(value.double(), SHAPES, locations.double(), weights.double())
    assert ours.shape == (2, 4, 6)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)


def test_points_far_outside_read_zero():
    value, spatial, starts, locations, weights = _random_inputs()
    out = ms_deform_attn(value, spatial, starts, torch.full_like(locations, 3.0), weights)
    assert torch.equal(out, torch.zeros_like(out))


def test_core_gradcheck():
    value, spatial, starts, locations, weights = _random_inputs(
        torch.float64, batch=1, queries=2, heads=2, head_dim=2, points=2)
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, spatial, starts, loc, w), inputs)


def test_core_rejects_inconsistent_levels():
    value, spatial, starts, locations, weights = _random_inputs()
    with pytest.raises(ValueError, match="cells"):
        ms_deform_attn(value[:, :-1], spatial, starts, locations, weights)
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn(value, spatial[:2], starts[:2], locations, weights)


def _module_reference(module, query, ref, flat, mask):
    """The module's math spelled out, on top of the float64 loop reference."""
    heads, levels, points = module.n_heads, module.n_levels, module.n_points
    batch, queries, d = query.shape
    value = module.value_proj(flat).masked_fill(mask[..., None], 0.0)
    value = value.view(batch, -1, heads, d // heads)
    off = module.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
    attn = module.attention_weights(query).view(batch, queries, heads, levels * points)
    attn = attn.softmax(-1).view(batch, queries, heads, levels, points)
    loc = torch.empty_like(off)
    for lvl, (h, w) in enumerate(SHAPES):
        r = ref[:, :, None, lvl, None, :]
        if ref.shape[-1] == 2:
            loc[:, :, :, lvl] = r + off[:, :, :, lvl] / torch.tensor([w, h], dtype=off.dtype)
        else:
            loc[:, :, :, lvl] = r[..., :2] + off[:, :, :, lvl] / points * r[..., 2:] / 2
    return module.output_proj(reference(value, SHAPES, loc, attn))


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_with_padding_equals_reference(ref_dim):
    torch.manual_seed(0)
    d, heads, points = 8, 2, 2
    module = MSDeformAttn(d, len(SHAPES), heads, points).double()
    with torch.no_grad():  # random offsets and weights, not the structured init
        for p in module.parameters():
            p.normal_(0, 0.5)
    spatial, starts, cells = _layout(SHAPES)
    query = torch.randn(2, 3, d, dtype=torch.float64)
    flat = torch.randn(2, cells, d, dtype=torch.float64)
    ref = torch.rand(2, 3, len(SHAPES), ref_dim, dtype=torch.float64)
    mask = torch.zeros(2, cells, dtype=torch.bool)
    mask[1, starts[0] + 20:starts[1]] = True  # image 2: bottom rows of level 0 are padding
    mask[1, starts[1] + 9:starts[2]] = True
    ours = module(query, ref, flat, spatial, starts, mask)
    with torch.no_grad():
        expected = _module_reference(module, query, ref, flat, mask)
    torch.testing.assert_close(ours.detach(), expected, atol=1e-5, rtol=0)
    # what sits in padded cells never matters
    noisy = flat.masked_fill(mask[..., None], 1e3)
    torch.testing.assert_close(module(query, ref, noisy, spatial, starts, mask), ours)


def test_module_init_and_shape_check():
    module = MSDeformAttn(16, n_levels=3, n_heads=4, n_points=2)
    bias = module.sampling_offsets.bias.view(4, 3, 2, 2)
    torch.testing.assert_close(bias[0, :, 1], torch.tensor([[2.0, 0.0]] * 3))  # head 0: +x
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([0.0, 1.0]))  # head 1: +y
    spatial, starts, cells = _layout(SHAPES)
    with pytest.raises(ValueError, match="reference_points"):
        module(torch.randn(1, 2, 16), torch.rand(1, 2, 3, 3), torch.randn(1, cells, 16),
               spatial, starts)
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(10, n_heads=4)

"""3x3 convolutions by Winograd's minimal filtering (Lavin & Gray, arXiv 1509.09308), for the
backbone's trained convolutions in a CPU training step.

A stride-1 3x3 convolution computes each m x m block of its output from a (m+2) x (m+2) tile of
its input. F(m x m, 3 x 3) does that with (m+2)^2 products per input/output channel pair
instead of 9 m^2: with input tiles d and kernels g,

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise over the (m+2)^2 tile points)

summed over input channels, so for all tiles and channel pairs at once it is (m+2)^2 batched
GEMMs, [tiles, C_in] x [C_in, C_out], between cheap linear transforms of the inputs, kernels
and outputs. F(2x2) does 4/9 of the direct multiplications (2.25x fewer), F(4x4) 1/4 (4x
fewer), and the same holds for the two backward products, which are the transposed GEMMs of
the same transforms. Where the compiled kernels of models/winograd_native.py load (float32,
channels divisible by 16: every R50 shape), each transform is one fused pass of generated C over
the tiles; elsewhere it is one small torch matrix product with the Kronecker square of B^T, G or
A^T over every tile at once. Both compute the same function to float32 rounding.

The price is accuracy: F(4x4)'s points (0, +-1, +-2, inf) make its float32 results less exact
than a direct convolution's: up to 8e-6 to 1.1e-5 of the largest value over the output and both
gradients, against 1e-6 to 2.5e-6 for the direct kernels (128-512 channels, against float64;
benchmarks/bench_winograd.py, tests/test_winograd.py). F(2x2) is as exact as a direct one
(6e-7 to 9e-7). Both stay far inside the 1e-4 the training step is held to. Inference never
takes this path: it keeps oneDNN's kernels, whose outputs the parity tests pin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import winograd_native
from .winograd_native import tiles_shape

# Lavin & Gray's transforms, exact in binary floating point except G's sixths for F(4x4).
_B_T = {
    2: [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    4: [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
}
_G = {
    2: [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
    4: [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
}
_A_T = {
    2: [[1, 1, 1, 0], [0, 1, -1, -1]],
    4: [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
}
_TRANSFORMS: dict[tuple[int, torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor]] = {}


def _transforms(m: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B^T (x) B^T [t^2, t^2], G (x) G [t^2, 9], A^T (x) A^T [m^2, t^2]) for F(m x m, 3 x 3),
    t = m + 2, in `like`'s dtype and device: each applies its 2-D transform to tiles flattened
    row-major. Built in float64 once per (m, dtype, device)."""
    key = (m, like.dtype, like.device)
    if key not in _TRANSFORMS:
        mats = (torch.tensor(a[m], dtype=torch.float64) for a in (_B_T, _G, _A_T))
        _TRANSFORMS[key] = tuple(torch.kron(a, a).to(like) for a in mats)  # type: ignore[assignment]
    return _TRANSFORMS[key]


def _input_transform(x: Tensor, m: int) -> Tensor:
    """B^T d B for every (m+2)^2 input tile d of x [N, C, H, W] zero-padded by 1 (and up to a
    whole number of blocks): [t^2, tiles, C], tiles in (n, tile row, tile column) order."""
    b_t = _transforms(m, x)[0]
    t = m + 2
    n, c, h, w = x.shape
    th, tw, tiles = tiles_shape(x.shape, m)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + tw * m - w, 1, 1 + th * m - h))
    d = padded.unfold(1, t, m).unfold(2, t, m)  # (N, th, tw, C, t, t), overlapping windows
    d = d.permute(4, 5, 0, 1, 2, 3).reshape(t * t, tiles * c)  # one copy
    return (b_t @ d).view(t * t, tiles, c)


def _kernel_transform(weight: Tensor, m: int) -> Tensor:
    """G g G^T for every kernel g of weight [K, C, 3, 3]: [t^2, K, C]."""
    g = _transforms(m, weight)[1]
    k, c = weight.shape[:2]
    return (g @ weight.reshape(k * c, 9).t()).view(g.shape[0], k, c)


class _WinogradConv3x3(torch.autograd.Function):
    """F.conv2d(x, weight * scale, shift, padding=1) for a 3x3 weight [K, C, 3, 3], stride and
    dilation 1, groups 1, and per-output-channel constants `scale` and `shift` [K] (a frozen
    norm folded in; no gradient), computed as F(m x m, 3 x 3). Returns [N, K, H, W],
    channels_last.

    Keeps only x and the weight for backward, like `_FoldedConv2d`: the kernel and input
    transforms are recomputed there, so the step's peak holds none of the transformed tensors
    (2.25x-4x the input or the weight). Keeping the transformed kernels instead measured no
    faster (benchmarks/RESULTS.md, session 14)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, m: int) -> Tensor:
        native = winograd_native.usable(x, weight)
        if native is not None:  # the compiled transforms want NHWC data and plain [K] constants
            x = x.contiguous(memory_format=torch.channels_last)
            weight, scale, shift = weight.contiguous(), scale.contiguous(), shift.contiguous()
        ctx.save_for_backward(x, weight, scale)
        ctx.m, ctx.native = m, native
        if native is not None:
            return native.conv3x3(x, weight, scale, shift, m)
        n, _, h, w = x.shape
        k = weight.shape[0]
        a_t = _transforms(m, x)[2]
        th, tw, tiles = tiles_shape(x.shape, m)
        products = torch.bmm(_input_transform(x, m),
                             _kernel_transform(weight, m).transpose(1, 2))  # (t^2, tiles, K)
        blocks = (a_t @ products.view(-1, tiles * k)).view(m, m, n, th, tw, k)
        blocks = blocks.permute(2, 3, 0, 4, 1, 5)  # (N, th, m, tw, m, K)
        y = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last)  # not a view: callers work in place
        if (th * m, tw * m) == (h, w):  # whole blocks: scaled straight into the output
            torch.addcmul(shift, blocks, scale, out=y.permute(0, 2, 3, 1).view(blocks.shape))
        else:
            whole = blocks.reshape(n, th * m, tw * m, k)
            torch.addcmul(shift, whole[:, :h, :w], scale, out=y.permute(0, 2, 3, 1))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, scale = ctx.saved_tensors
        m, native = ctx.m, ctx.native
        if native is not None:
            return (*native.conv3x3_backward(grad, x, weight, scale, m, *ctx.needs_input_grad[:2]),
                    None, None, None)
        t = m + 2
        b_t, g, a_t = _transforms(m, x)
        n, c, h, w = x.shape
        k = weight.shape[0]
        th, tw, tiles = tiles_shape(x.shape, m)
        # the output transform's adjoint: A (x) A on each m x m block of the output gradient
        grad = grad.permute(0, 2, 3, 1)  # (N, H, W, K)
        if (th * m, tw * m) != (h, w):
            grad = F.pad(grad, (0, 0, 0, tw * m - w, 0, th * m - h))
        blocks = grad.reshape(n, th, m, tw, m, k).permute(2, 4, 0, 1, 3, 5)
        # scaled (the gradient of the unscaled convolution) and laid out block point first
        blocks = torch.mul(blocks, scale, out=grad.new_empty(blocks.shape)).view(m * m, -1)
        grad_products = (a_t.t() @ blocks).view(t * t, tiles, k)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_tiles = torch.bmm(grad_products, _kernel_transform(weight, m))  # (t^2, tiles, C)
            grad_tiles = (b_t.t() @ grad_tiles.view(t * t, -1)).view(t, t, n, th, tw, c)
            grad_x = _overlap_add(grad_tiles, m, h, w)
        if ctx.needs_input_grad[1]:
            grad_kernels = torch.bmm(grad_products.transpose(1, 2),
                                     _input_transform(x, m))  # (t^2, K, C)
            # G^T as one wide product, [9, t^2] x [t^2, K*C], then copied into the weight's
            # layout: 1.3x-2.6x faster than one [K*C, t^2] x [t^2, 9] product (R50's kernels,
            # warm memory, 2-core AMD EPYC; benchmarks/RESULTS.md, session 15)
            grad_weight = (g.t() @ grad_kernels.view(t * t, -1)).t().contiguous().view(weight.shape)
        return grad_x, grad_weight, None, None, None


def _overlap_add(grad_tiles: Tensor, m: int, h: int, w: int) -> Tensor:
    """The input gradient from the gradients of the overlapping input tiles: grad_tiles
    [t, t, N, th, tw, C], tile (i, j) covering padded rows i*m .. i*m+m+1 and the same columns.
    Returns [N, C, h, w] channels_last (the 1-pixel padding dropped)."""
    _, _, n, th, tw, c = grad_tiles.shape

    def part(rows: slice, cols: slice) -> Tensor:  # (N, th, rows, tw, cols, C)
        return grad_tiles[rows, cols].permute(2, 3, 0, 4, 1, 5)

    # (th + 1) x (tw + 1) blocks of m x m: tile (i, j)'s first m rows/columns fall in block
    # (i, j), its last two in the first two of block (i + 1, j + 1)
    out = grad_tiles.new_empty(n, th + 1, m, tw + 1, m, c)
    head, tail = slice(None, m), slice(m, None)
    out[:, :th, :, :tw] = part(head, head)
    out[:, th:].zero_()
    out[:, :th, :, tw:].zero_()
    out[:, :th, :, 1:, :2] += part(head, tail)
    out[:, 1:, :2, :tw] += part(tail, head)
    out[:, 1:, :2, 1:, :2] += part(tail, tail)
    out = out.view(n, (th + 1) * m, (tw + 1) * m, c)[:, 1 : h + 1, 1 : w + 1]
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


# Where F(m x m) beats the direct kernels (`_FoldedConv2d`: oneDNN, or a GEMM for the weight
# gradient) in a training step: forward, input and weight gradients, paired speed-ups from
# `python benchmarks/bench_winograd.py` on a 2-core Xeon (benchmarks/RESULTS.md, session 14).
# The input and output transforms cost per tile and channel, the GEMMs per tile and channel
# pair, so it pays with enough channels: at 64 channels F(2x2) ran at 0.31x and F(4x4) at 0.61x
# (128x128, batch 2); at 128 channels F(4x4) at 1.26x-1.52x, F(2x2) at 0.78x-1.11x; at 256
# channels F(4x4) at 1.47x-2.16x, F(2x2) at 1.23x-1.57x; at 512 F(2x2) at 1.39x-1.80x. The
# kernel transform costs per channel pair alone, (m+2)^2 of them, so the larger block needs
# enough tiles to amortize it: with 8-49 tiles F(4x4) was never faster than F(2x2) (0.52x-1.56x
# against 1.39x-1.69x); from 64 tiles on it was faster in every shape measured. At 128
# channels F(4x4) lost its gain past ~1000 tiles (1024: 1.48x; 1152: 0.98x; 2048: 0.93x), where
# its transformed tiles pass 20 MB (memory traffic, likely; not profiled); at 256 channels it
# still ran at 1.11x with 2048 tiles. On a 2-core AMD EPYC (AVX2, session 15) the rules picked
# the faster variant in every R50 shape measured as well.
# Rules in order, the first that holds decides: (block size, least channels, least tiles, most
# tiles or None).
WINOGRAD_RULES: tuple[tuple[int, int, int, int | None], ...] = (
    (4, 256, 64, None),
    (4, 128, 64, 1024),
    (2, 256, 32, None),
)


def winograd_tile(conv: nn.Conv2d, x: Tensor) -> int:
    """The block size m (4 or 2) to compute `conv` on x [N, C, H, W] as F(m x m, 3 x 3) in a
    CPU training step, or 0 where the direct convolution is used: not a stride-1, padding-1
    3x3 convolution, channels or tiles outside WINOGRAD_RULES, or not float32 on the CPU."""
    if not (
        conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.dilation == (1, 1)
        and conv.padding == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
        and x.device.type == "cpu" and x.dtype == torch.float32
    ):
        return 0
    channels = min(conv.in_channels, conv.out_channels)
    for m, min_channels, min_tiles, max_tiles in WINOGRAD_RULES:
        tiles = tiles_shape(x.shape, m)[2]
        if channels >= min_channels and min_tiles <= tiles <= (max_tiles or tiles):
            return m
    return 0


def winograd_conv3x3(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, m: int) -> Tensor:
    """conv2d(x, weight * scale[:, None, None, None], shift, padding=1) as F(m x m, 3 x 3),
    m in (2, 4): x [N, C, H, W], weight [K, C, 3, 3], scale and shift [K] constants. Returns
    [N, K, H, W] channels_last; differentiable in x and weight."""
    if m not in (2, 4):
        raise ValueError(f"Winograd block size must be 2 or 4, got {m}")
    if weight.shape[1:] != (x.shape[1], 3, 3):
        raise ValueError(f"expected a [K, {x.shape[1]}, 3, 3] weight, got {list(weight.shape)}")
    return _WinogradConv3x3.apply(x, weight, scale, shift, m)

"""ResNet backbone (torchvision) with FrozenBatchNorm2d, optional DC5 dilation and truncation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from ..config import check_dilation
from .winograd import winograd_conv3x3, winograd_tile

_STAGES = ("layer1", "layer2", "layer3", "layer4")


def _frozen_bn(num_features: int) -> FrozenBatchNorm2d:
    # upstream FrozenBatchNorm2d uses eps 1e-5, which is torchvision's default as well
    return FrozenBatchNorm2d(num_features, eps=1e-5)


def _dilate_basic_layer(layer: nn.Sequential) -> None:
    """DC5 for BasicBlock ResNets (18/34), which torchvision refuses to dilate.

    Same scheme as timm's output_stride=16: the first block loses its stride (conv1 and the
    downsample conv), its conv2 and every later 3x3 conv get dilation 2 (padding 2), so the
    output keeps stride 16 with layer4's receptive field.
    """
    first = layer[0]
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    convs = [first.conv2] + [c for block in layer[1:] for c in (block.conv1, block.conv2)]
    for conv in convs:
        conv.dilation = (2, 2)
        conv.padding = (2, 2)


def _foldable(body: nn.Module) -> bool:
    """Whether `Backbone.run_body` can fold the norms of `body`: torchvision's ResNet stem and
    blocks, every norm frozen (FrozenBatchNorm2d, or a BatchNorm2d in eval mode)."""
    names = list(body._modules)
    if names[:4] != ["conv1", "bn1", "relu", "maxpool"] or not set(names[4:]) <= set(_STAGES):
        return False
    for block in (b for name in names[4:] for b in getattr(body, name)):
        if type(block) not in (Bottleneck, BasicBlock):
            return False
        ds = block.downsample
        if ds is not None and not (len(ds) == 2 and type(ds[0]) is nn.Conv2d):
            return False
    norms = (m for m in body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)))
    return all(isinstance(m, FrozenBatchNorm2d) or not m.training for m in norms)


# On the CPU the backbone folds its frozen norms, in channels_last memory (oneDNN's native
# layout), only where that pays. The folded weights are rebuilt on every call (in training again
# in the backward pass, see _FoldedConv2d), and their 3x3 kernels are transposed to channels_last
# (in training their gradients are transposed back as well): a cost set by the weights. What
# folding and channels_last save (passes over the feature maps, layout conversions) grows with
# the convolution work, set by the pixels. The backbone folds when (multiply-adds of the call) >=
# this factor x (elements of the non-1x1 kernels); below that its own modules run as they are, in
# the default layout. Measured on a 2-core Xeon (benchmarks/RESULTS.md, sessions 5, 7, 9 and 10;
# time of the modules / time folded, paired): inference of R18 at 128x160, 256x256 and R50 at
# 192x192 0.73x-0.94x, of R50 at 256x256 and 384x384 and R18 at 384x384 1.01x-1.22x. Training
# (batch 2), since session 10's folded backward (which keeps no folded kernels): R18 at 128x128
# and 160x160, R50 at 128x128 0.94x-0.96x (108-236 multiply-adds per kernel element); R50 at
# 160x160 and 192x192, R18 at 256x256 and 320x320 1.00x-1.02x (368-673); R50 at 224x224 1.07x
# (722). One factor puts each case on its faster side, or within 1% of it, in inference and
# training alike (it was 3x, then 2x, higher in training before session 10). Other devices
# always fold, in channels_last (not measured there).
FOLD_MIN_MACS_PER_WEIGHT = 400


def _cost_model(body: nn.Module) -> tuple[float, int]:
    """(multiply-adds per input pixel, elements of the kernels larger than 1x1) of a foldable
    ResNet body, from its structure."""
    macs, kernels = 0.0, 0

    def conv(c: nn.Conv2d, stride_in: int) -> int:
        nonlocal macs, kernels
        stride_out = stride_in * c.stride[0]
        macs += c.weight.shape[1:].numel() * c.out_channels / stride_out**2
        if c.weight.shape[-1] > 1 or c.weight.shape[-2] > 1:
            kernels += c.weight.numel()
        return stride_out

    stride = conv(body.conv1, 1) * 2  # the stem's max pool halves again
    for stage in _STAGES:
        for block in getattr(body, stage, ()):
            out = conv(block.conv2, conv(block.conv1, stride))
            if isinstance(block, Bottleneck):
                out = conv(block.conv3, out)
            if block.downsample is not None:
                conv(block.downsample[0], stride)
            stride = out
    return macs, kernels


def _folding_pays(images: Tensor, cost: tuple[float, int]) -> bool:
    """Whether a body whose `_cost_model` is `cost` should run `images` folded in channels_last
    memory (else its modules as they are)."""
    if images.device.type != "cpu":
        return True  # measured on CPUs only: other devices always fold
    b, _, h, w = images.shape
    macs_per_pixel, kernels = cost
    return b * h * w * macs_per_pixel >= FOLD_MIN_MACS_PER_WEIGHT * kernels


def _onednn_fusion_available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and mkldnn is not None
        and hasattr(mkldnn, "_convolution_pointwise")
        and hasattr(mkldnn, "_convolution_pointwise_")
    )


#: oneDNN's fused convolution kernels (convolution + bias + ReLU, + residual sum) are built in
ONEDNN_FUSION = _onednn_fusion_available()


def _onednn_bf16_available() -> bool:
    """Whether oneDNN runs bfloat16 convolutions on this CPU: it refuses to without AVX512
    (BW, VL, DQ) or AVX-NE-CONVERT (an AVX2-only CPU, such as an AMD EPYC of the Zen 3
    generation, raises), where F.conv2d still runs them on torch's own kernels."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return ONEDNN_FUSION and check is not None and bool(check())


#: oneDNN's fused convolution kernels take bfloat16 on this CPU
ONEDNN_BF16 = _onednn_bf16_available()


def _register_fused_flops() -> None:
    """Give torch's flop counter (torch.utils.flop_counter.FlopCounterMode) the FLOPs of the
    fused oneDNN convolutions, which it would count as 0, so FLOP counts of the model are the
    same on every path. Skipped where torch already counts them."""
    from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

    def pointwise(x_shape, second, third, *args, out_shape=None, **kwargs) -> int:
        # .default(X, W, B, ...) or .binary(X, other, W, B, ...): W is the 4-d one after X
        weight = third if third is not None and len(third) == 4 else second
        return conv_flop_count(x_shape, weight, out_shape)

    def pointwise_inplace(other_shape, x_shape, w_shape, *args, **kwargs) -> int:
        # .binary(other, X, W, ...): the result is written into `other`
        return conv_flop_count(x_shape, w_shape, other_shape)

    mkldnn = torch.ops.mkldnn
    for op, formula in ((mkldnn._convolution_pointwise, pointwise),
                        (mkldnn._convolution_pointwise_, pointwise_inplace)):
        if op not in flop_registry:
            register_flop_formula(op)(formula)


if ONEDNN_FUSION:
    _register_fused_flops()


def can_fuse(x: Tensor, weight: Tensor) -> bool:
    """Whether `fused_conv2d(x, weight, ...)` runs as one oneDNN kernel: a CPU tensor in
    float32 (or bfloat16 where oneDNN takes it, `ONEDNN_BF16`), the weight's dtype, and nothing
    that autograd must record."""
    return (
        ONEDNN_FUSION
        and x.device.type == "cpu"
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and ONEDNN_BF16))
        and x.dtype == weight.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def fused_conv2d(x: Tensor, weight: Tensor, bias: Tensor, stride, padding, dilation,
                 groups: int, relu: bool, shortcut: Tensor | None = None) -> Tensor:
    """relu?(conv2d(x, weight, bias) + shortcut?), the ReLU after the sum as in a residual
    block. Where `can_fuse` holds this is one oneDNN kernel (one pass over the output), and a
    shortcut's buffer receives the result (the caller must not need it afterwards); elsewhere
    F.conv2d and separate operations."""
    if can_fuse(x, weight):
        args = (weight, bias, list(padding), list(stride), list(dilation), groups)
        if shortcut is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, *args, "relu" if relu else "none", [], "")
        shortcut = shortcut.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            shortcut, x, *args, "add", 1.0, "relu" if relu else None, [], "")
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if shortcut is not None:
        y = y + shortcut
    return F.relu(y) if relu else y


def _norm_affine(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift), per output channel, with norm(conv(x)) = conv(x) * scale + shift for the
    (frozen or eval-mode) batch norm `norm`; differentiable in the norm's parameters."""
    scale = (norm.running_var + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = norm.weight * scale
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return scale, shift


def _scaled_kernel(weight: Tensor, scale: Tensor) -> Tensor:
    """weight * scale per output channel, channels_last like the folded path's activations."""
    return (weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last)


def _fold(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the convolution equal to norm(conv(x)) with the (frozen or eval-mode)
    batch norm folded in, differentiable in the convolution and norm parameters. The weight is
    channels_last, like the activations of the folded path."""
    scale, shift = _norm_affine(conv, norm)
    return _scaled_kernel(conv.weight, scale), shift


# In training on the CPU, oneDNN's kernel for a convolution's weight gradient is slow where
# the weights are many for the output pixels they reduce over, as in layer4 (batch 2 at 512x512:
# 512 output pixels for 2.4M weights of a 3x3 kernel; 134 GFLOP/s against ~300 for the forward).
# There the backbone computes that gradient as one GEMM (MKL) over the input's patches instead,
# and leaves the input gradient to oneDNN. Measured on a 2-core Xeon (benchmarks/RESULTS.md,
# session 9; time of oneDNN's backward / input gradient + GEMM, R50 shapes at batch 2): 1x1
# kernels 1.06x-1.8x at every size tried (512 to 32768 output pixels); 3x3 kernels 1.1x-1.7x
# at 1388-4608 weights per output pixel, 0.8x-1.08x at 72-1152. 1x1 kernels always take the
# GEMM; larger ones where (weights) >= this factor x (output pixels).
GEMM_WEIGHT_GRAD_MIN_WEIGHTS_PER_PIXEL = 1200

# Without AVX-512, oneDNN's weight gradient of a strided 3x3 kernel is slow at every size: on a
# 2-core AMD EPYC (Zen 3, AVX2), R50's three strided kernels at batch 2, 512x512 (18-4608
# weights per output pixel) took 1.5x-1.7x longer than the GEMM (benchmarks/RESULTS.md,
# session 15), while its stride-1 kernels are as fast as the GEMM or faster. On CPUs where torch
# runs its AVX2 kernels every strided kernel takes the GEMM (other CPUs were not measured).
STRIDED_GEMM_WEIGHT_GRAD = torch.backends.cpu.get_cpu_capability() == "AVX2"


def _gemm_weight_grad_pays(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether `conv` applied to `x` in training on the CPU should compute its weight gradient
    as a GEMM over the input's patches rather than by oneDNN: every 1x1 kernel, every strided
    one where STRIDED_GEMM_WEIGHT_GRAD holds, and the others by the weights-per-pixel factor."""
    if conv.kernel_size == (1, 1) or (STRIDED_GEMM_WEIGHT_GRAD and conv.stride != (1, 1)):
        return True
    n, _, h, w = x.shape
    out_h, out_w = (
        (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
        for size, pad, dil, k, stride in zip(
            (h, w), conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True))
    return conv.weight.numel() >= GEMM_WEIGHT_GRAD_MIN_WEIGHTS_PER_PIXEL * n * out_h * out_w


def _patches(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
             padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """The convolution's input patches (im2col) of x [N, C, H, W]: [N*Ho*Wo, kh*kw*C], one row
    per output pixel in (n, y, x) order, columns in (ky, kx, c) order, a channels_last kernel's."""
    rows = x.permute(0, 2, 3, 1)  # [N, H, W, C]: a view where x is channels_last
    if kernel == (1, 1) and tuple(padding) == (0, 0):
        return rows[:, :: stride[0], :: stride[1]].reshape(-1, x.shape[1])
    (ph, pw), (dh, dw), (kh, kw) = padding, dilation, kernel
    rows = F.pad(rows, (0, 0, pw, pw, ph, ph))
    windows = rows.unfold(1, dh * (kh - 1) + 1, stride[0]).unfold(2, dw * (kw - 1) + 1, stride[1])
    windows = windows[..., ::dh, ::dw]  # [N, Ho, Wo, C, kh, kw]
    return windows.permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * x.shape[1])


class _FoldedConv2d(torch.autograd.Function):
    """F.conv2d(x, weight * scale, shift, stride, padding, dilation) (groups 1), for a frozen
    norm's per-output-channel `scale` and `shift` (constants: no gradient), in channels_last.

    Only x and the weight parameter itself are kept for the backward pass: the scaled kernel
    is rebuilt there where the input gradient needs it, so the step's peak memory holds no
    copy of the trained kernels (~90 MB for R50), and every byte less of peak is a page the
    step need not fault in again. The weight gradient is computed with respect to the scaled
    kernel, as one GEMM over the input's patches (`gemm`, see
    GEMM_WEIGHT_GRAD_MIN_WEIGHTS_PER_PIXEL) or by oneDNN, and scaled into the parameter's own
    layout in the same pass. Same gradients as autograd through F.conv2d up to float rounding
    (order of the sums)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride, padding,
                dilation, gemm: bool) -> Tensor:
        ctx.save_for_backward(x, weight, scale)
        ctx.geometry = (list(stride), list(padding), list(dilation))
        ctx.gemm = gemm
        return F.conv2d(x, _scaled_kernel(weight, scale), shift, stride, padding, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        need_x, need_weight = ctx.needs_input_grad[:2]
        grad = grad.contiguous(memory_format=torch.channels_last)
        onednn_weight = need_weight and not ctx.gemm
        grad_x = grad_kernel = None
        if need_x or onednn_weight:
            # the weight gradient alone reads only the kernel's shape: no need to rebuild it
            kernel = _scaled_kernel(weight, scale) if need_x else weight
            grad_x, grad_kernel, _ = torch.ops.aten.convolution_backward(
                grad, x, kernel, None, stride, padding, dilation, False, [0, 0], 1,
                [need_x, onednn_weight, False])
        grad_weight = None
        if need_weight:
            cout, cin, kh, kw = weight.shape
            if ctx.gemm:
                rows = grad.permute(0, 2, 3, 1).view(-1, cout)  # [N*Ho*Wo, Cout], a view
                grad_kernel = rows.t() @ _patches(x, (kh, kw), stride, padding, dilation)
                if (kh, kw) == (1, 1):  # [Cout, Cin]: the parameter's layout already
                    grad_weight = grad_kernel.mul_(scale[:, None]).view(weight.shape)
                else:
                    grad_kernel = grad_kernel.view(cout, kh, kw, cin).permute(0, 3, 1, 2)
            if grad_weight is None:
                # d(loss)/d(weight) = d(loss)/d(kernel) * scale, in the parameter's layout
                grad_weight = torch.mul(grad_kernel, scale[:, None, None, None],
                                        out=torch.empty_like(weight))
        return grad_x, grad_weight, None, None, None, None, None, None


def _folds_in_backward(conv: nn.Conv2d, x: Tensor, scale: Tensor, shift: Tensor) -> bool:
    """Whether `_conv_norm_act` runs `conv` as `_FoldedConv2d`: recorded by autograd, on the
    CPU (where it was measured), not under autocast (which casts F.conv2d), groups 1, and a norm
    with nothing to train."""
    return (
        _records_grad(x, conv)
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and conv.groups == 1
        and not isinstance(conv.padding, str)
        and not (scale.requires_grad or shift.requires_grad)
    )


def _conv_norm_act(conv: nn.Conv2d, norm: nn.Module, x: Tensor, relu: bool,
                   shortcut: Tensor | None = None) -> Tensor:
    """relu?(norm(conv(x)) + shortcut?) as one convolution with the norm folded in, recorded by
    autograd; the sum and the ReLU in place on the convolution's output."""
    scale, shift = _norm_affine(conv, norm)
    if not _folds_in_backward(conv, x, scale, shift):
        y = F.conv2d(x, _scaled_kernel(conv.weight, scale), shift, conv.stride, conv.padding,
                     conv.dilation, conv.groups)
    elif tile := winograd_tile(conv, x):
        # stride-1 3x3 kernels with enough channels and tiles: 2.25x-4x fewer products
        y = winograd_conv3x3(x, conv.weight, scale, shift, tile)
    else:
        y = _FoldedConv2d.apply(x, conv.weight, scale, shift, conv.stride, conv.padding,
                                conv.dilation, _gemm_weight_grad_pays(conv, x))
    if shortcut is not None:
        y = y.add_(shortcut)
    return y.relu_() if relu else y


@torch.no_grad()
def _fused_conv_norm_act(conv: nn.Conv2d, norm: nn.Module, x: Tensor, relu: bool,
                         shortcut: Tensor | None = None) -> Tensor:
    """`_conv_norm_act` without autograd, through `fused_conv2d`: one oneDNN kernel where it
    can, writing into the shortcut's buffer."""
    weight, bias = _fold(conv, norm)
    return fused_conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                        relu, shortcut)


def _block_forward(block: nn.Module, x: Tensor, conv_norm_act: Callable[..., Tensor]) -> Tensor:
    """A torchvision Bottleneck / BasicBlock with folded norms (same computation), each
    convolution through `conv_norm_act`. With `_fused_conv_norm_act`, `x` must be the previous
    unit's output: an identity shortcut receives the block's result."""
    out = conv_norm_act(block.conv1, block.bn1, x, True)
    if isinstance(block, Bottleneck):
        out = conv_norm_act(block.conv2, block.bn2, out, True)
        last = (block.conv3, block.bn3)
    else:
        last = (block.conv2, block.bn2)
    shortcut = x if block.downsample is None else conv_norm_act(*block.downsample, x, False)
    return conv_norm_act(*last, out, True, shortcut)


def _records_grad(x: Tensor, *modules: nn.Module) -> bool:
    """Whether autograd records `modules` applied to `x`."""
    return torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters()))


class Backbone(nn.Module):
    """A torchvision ResNet feeding the transformer one feature map.

    Parameter names follow torchvision (`body.conv1`, `body.layer1.0.bn1`, ...), so torchvision
    ImageNet state dicts and the authors' `backbone.0.body.*` keys map one to one.

    forward(images [B, 3, H, W] float, mask [B, H, W] bool True on padding) returns
    (features [B, C, h, w], mask [B, h, w] bool), with (h, w) = ceil((H, W) / stride) and stride
    32 (16 with dilation or when truncated after layer3, 8 when truncated after layer2).
    """

    def __init__(
        self,
        name: str = "resnet50",
        dilation: bool = False,
        norm: str = "frozen",
        return_layer: str = "layer4",
        trainable_layers: int = 3,
    ) -> None:
        super().__init__()
        check_dilation(dilation, return_layer)
        norm_layer: Callable[[int], nn.Module] = _frozen_bn if norm == "frozen" else nn.BatchNorm2d
        builder = getattr(torchvision.models, name)
        bottleneck = name in ("resnet50", "resnet101")
        resnet = builder(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation and bottleneck],
            norm_layer=norm_layer,
        )
        if dilation and not bottleneck:
            _dilate_basic_layer(resnet.layer4)
        # Keep only what is used: no avgpool/fc, and no layer4 when truncated.
        keep = ("conv1", "bn1", "relu", "maxpool") + _STAGES[: _STAGES.index(return_layer) + 1]
        self.body = nn.Sequential()
        for child in keep:
            self.body.add_module(child, getattr(resnet, child))
        last_block = self.body[-1][-1]
        last_conv = last_block.conv3 if hasattr(last_block, "conv3") else last_block.conv2
        self.num_channels = last_conv.out_channels
        self.stride = {"layer2": 8, "layer3": 16}.get(return_layer, 16 if dilation else 32)
        # Upstream trains layer2..layer4 and freezes the stem and layer1 (trainable_layers=3),
        # counted like torchvision's `trainable_backbone_layers`.
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            trainable.append("bn1")
        for pname, param in self.body.named_parameters():
            if not pname.startswith(tuple(trainable)):
                param.requires_grad_(False)
        self._fold_cost: tuple[float, int] | None = None  # see run_body

    def forward(self, images: Tensor, mask: Tensor, pad_invariant: bool = False
                ) -> tuple[Tensor, Tensor]:
        if pad_invariant:
            return self._forward_per_image(images, mask)
        features = self.run_body(images)
        # upstream: nearest interpolation of the float mask, then back to bool
        small_mask = nn.functional.interpolate(mask[None].float(), size=features.shape[-2:])
        return features, small_mask.to(torch.bool)[0]

    def run_body(self, images: Tensor) -> Tensor:
        """`self.body(images)`: [B, 3, H, W] -> features [B, C, h, w].

        For inputs large enough (see FOLD_MIN_MACS_PER_WEIGHT), computed with every eval-mode
        batch norm folded into the convolution before it (conv(x, w * s) + (beta - mean * s),
        s = gamma / sqrt(var + eps): the same function, differentiable in w, gamma and beta),
        on channels_last activations, oneDNN's native layout. This saves the two passes over
        memory each FrozenBatchNorm2d makes forward and its pass backward, about a quarter of
        the backbone's training step on CPU. On CPUs the units autograd need not record (every
        unit without grad; in training the frozen stem and layer1) run as oneDNN kernels that
        also apply the ReLU and add the residual in place (not under CPU autocast, which casts
        F.conv2d). In training on CPUs, the trained stride-1 3x3 convolutions with enough
        channels and tiles run as Winograd's F(4x4, 3x3) or F(2x2, 3x3) (models/winograd.py:
        2.25x-4x fewer products). The other trained convolutions run as `_FoldedConv2d`, which
        keeps no folded kernel for the backward pass, and those with many weights for their
        output pixels (every 1x1, and layer4's strided 3x3 at the recipe's sizes; on AVX2 CPUs
        every strided one, STRIDED_GEMM_WEIGHT_GRAD) compute their weight gradient as a GEMM
        (see GEMM_WEIGHT_GRAD_MIN_WEIGHTS_PER_PIXEL). Smaller inputs, where
        rebuilding and transposing the folded weights costs more than that, run the body's
        modules as they are. Bodies this cannot fold (trainable BatchNorm2d in training mode,
        replaced modules) run as they are, on channels_last input.
        """
        body = self.body
        if not _foldable(body):
            # trainable BatchNorm (or unknown modules): as they are, on channels_last memory,
            # which oneDNN's convolutions (forward and backward) and batch norm run faster
            return body(images.contiguous(memory_format=torch.channels_last))
        if self._fold_cost is None:
            # counted once (~0.4 ms): it steers how the body runs, never the result beyond
            # rounding
            self._fold_cost = _cost_model(body)
        if not _folding_pays(images, self._fold_cost):
            return body(images.contiguous())
        x = images.contiguous(memory_format=torch.channels_last)
        fuse = ONEDNN_FUSION and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")

        def conv_norm_act(x: Tensor, *modules: nn.Module) -> Callable[..., Tensor]:
            # what autograd need not record runs fused (the frozen stem and layer1 in training)
            fused = fuse and not _records_grad(x, *modules)
            return _fused_conv_norm_act if fused else _conv_norm_act

        stem = conv_norm_act(x, body.conv1, body.bn1)
        x = body.maxpool(stem(body.conv1, body.bn1, x, True))
        for stage in _STAGES:
            for block in getattr(body, stage, ()):
                x = _block_forward(block, x, conv_norm_act(x, block))
        return x

    def _forward_per_image(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone on each image's valid (top-left) extent, features pasted into a padded map.

        Images of equal size run together. Feature cells beyond an image's own feature map are
        padding; no convolution ever sees another image's padding, so results do not depend on
        the batch.
        """
        valid = ~mask
        heights = valid.any(dim=2).sum(dim=1).tolist()
        widths = valid.any(dim=1).sum(dim=1).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(zip(heights, widths, strict=True)):
            groups.setdefault(size, []).append(i)
        pieces: dict[int, Tensor] = {}
        for (h, w), idx in groups.items():
            feats = self.run_body(images[idx, :, :h, :w])
            pieces.update(zip(idx, feats, strict=True))
        fh = max(p.shape[-2] for p in pieces.values())
        fw = max(p.shape[-1] for p in pieces.values())
        first = pieces[0]
        features = first.new_zeros(len(pieces), first.shape[0], fh, fw)
        small_mask = torch.ones(len(pieces), fh, fw, dtype=torch.bool, device=images.device)
        for i, feat in pieces.items():
            features[i, :, : feat.shape[-2], : feat.shape[-1]] = feat
            small_mask[i, : feat.shape[-2], : feat.shape[-1]] = False
        return features, small_mask

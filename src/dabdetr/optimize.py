"""Faster inference with the same outputs: batch norms folded once, fused convolutions.

`optimize_for_inference(model)` returns an inference-only copy of a DabDetr whose backbone is
`FusedBackbone`: every batch norm folded into its convolution once (w' = w * s,
b' = beta - mean * s with s = gamma / sqrt(var + eps), computed in float64), activations in
channels_last memory, and where oneDNN's fused convolution kernel is available (a private torch
op, checked on first use against F.conv2d; F.conv2d and separate operations otherwise) each
convolution applies its ReLU, and the last convolution of a residual block adds the shortcut in
the same kernel. The original model is not modified.

Numerically the optimized model differs from the plain one only by float32 rounding (max abs
difference ~2e-6 on logits of DAB-DETR-R50 at 800x1088; `benchmarks/README.md`). Its state dict
holds folded weights: it is not a checkpoint; save the original model instead.

`quantize="int8"` also applies dynamic int8 quantization to the transformer's nn.Linear layers
(CPU only; not exact). `bf16=True` stores the folded weights in bfloat16 and runs the forward
under bfloat16 autocast (`AutocastModel`; not exact). `CUDAGraphed` replays one CUDA graph per
input shape (GPU, inputs of one size). `optimized(model, mode)` applies the command line's
`--optimize` modes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from dabdetr.models.backbone import Backbone, features_per_image, resize_mask
from dabdetr.models.dab_detr import DabDetr
from dabdetr.models.outputs import DetectionOutput
from dabdetr.precision import check_amp

logger = logging.getLogger(__name__)

__all__ = ["OPTIMIZE_CHOICES", "AutocastModel", "CUDAGraphed", "FusedBackbone", "FusedConv2d",
           "FusedResNet", "add_cli_argument", "fold_batch_norm", "fused_conv2d",
           "optimize_for_inference", "optimized"]


@functools.cache
def onednn_fusion(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's fused convolution (+ bias, ReLU, residual sum) kernels, private torch
    ops, exist in this build and agree with F.conv2d in `dtype` on this CPU. Checked once, on
    first use; any failure means False and the public fallback runs."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if not (torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_convolution_pointwise")
            and hasattr(mkldnn, "_convolution_pointwise_")):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 8, 6, 6, generator=gen).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(8, 8, 3, 3, generator=gen).to(dtype)
        w = w.contiguous(memory_format=torch.channels_last)
        b = torch.randn(8, generator=gen).to(dtype)
        shortcut = torch.randn(1, 8, 6, 6, generator=gen).to(dtype)
        with torch.no_grad():
            got = mkldnn._convolution_pointwise.default(x, w, b, [1, 1], [1, 1], [1, 1], 1,
                                                         "relu", [], "")
            got_sum = mkldnn._convolution_pointwise_.binary(
                shortcut.clone().contiguous(memory_format=torch.channels_last), x, w, b,
                [1, 1], [1, 1], [1, 1], 1, "add", 1.0, "relu", [], "")
            ref = F.conv2d(x.float(), w.float(), b.float(), 1, 1)
        tol = 1e-4 if dtype == torch.float32 else 0.1
        return (torch.allclose(got.float(), ref.relu(), atol=tol, rtol=tol)
                and torch.allclose(got_sum.float(), (ref + shortcut.float()).relu(), atol=tol,
                                   rtol=tol))
    except (RuntimeError, TypeError, AttributeError):
        return False


def fused_conv2d(x: Tensor, weight: Tensor, bias: Tensor, stride, padding, dilation,
                 groups: int, relu: bool, shortcut: Tensor | None = None) -> Tensor:
    """relu?(conv2d(x, weight, bias) + shortcut?), the ReLU after the sum as in a residual block.

    x: [B, C_in, H, W]; weight: [C_out, C_in / groups, kh, kw]; bias: [C_out]; shortcut:
    [B, C_out, H', W'] or None. On a CPU where `onednn_fusion` holds, without autograd, this is
    one oneDNN kernel and a shortcut's buffer receives the result (the caller must not need it
    afterwards); elsewhere F.conv2d and separate operations.
    """
    if (x.device.type == "cpu" and x.dtype == weight.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and onednn_fusion(x.dtype)):
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


def fold_batch_norm(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """Weight and bias of the convolution that equals `norm(conv(x))` in eval mode.

    norm: FrozenBatchNorm2d or an nn.BatchNorm2d with running statistics. Folding is done in
    float64 and cast back, so the folded weights carry one rounding, not three.
    Returns (weight [C_out, C_in/g, kh, kw], bias [C_out]) in the convolution's dtype.
    """
    if isinstance(norm, nn.BatchNorm2d):
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError("cannot fold a BatchNorm2d without running statistics")
        gamma = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
        beta = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    elif isinstance(norm, FrozenBatchNorm2d):
        gamma, beta = norm.weight, norm.bias
    else:
        raise TypeError(f"cannot fold {type(norm).__name__} into a convolution")
    mean, var = norm.running_mean, norm.running_var
    scale = gamma.double() * (var.double() + norm.eps).rsqrt()  # (C_out,)
    weight = conv.weight.double() * scale[:, None, None, None]
    bias = beta.double() - mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    dtype = conv.weight.dtype
    return weight.to(dtype).contiguous(), bias.to(dtype).contiguous()


class FusedConv2d(nn.Module):
    """A convolution with its batch norm (if any) folded in and an optional fused ReLU
    (inference only).

    forward(x [B, C_in, H, W], shortcut=None) -> relu?(conv(x) + shortcut?) [B, C_out, H', W'].
    With a shortcut the result is written into `shortcut`'s buffer on the oneDNN path (the
    caller must not need it afterwards); ReLU is then applied after the addition, as in a
    ResNet block.
    """

    def __init__(self, conv: nn.Conv2d, norm: nn.Module | None, relu: bool):
        super().__init__()
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("only zero-padded convolutions with explicit padding can be fused")
        if norm is not None:
            weight, bias = fold_batch_norm(conv, norm)
        else:
            weight = conv.weight.detach().clone()
            bias = torch.zeros_like(conv.weight[:, 0, 0, 0]) if conv.bias is None else conv.bias
            bias = bias.detach().clone()
        # channels_last like the activations: otherwise every call converts the weight
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", bias)
        self.stride = list(conv.stride)
        self.padding = list(conv.padding)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.relu = relu

    def extra_repr(self) -> str:
        out_ch, in_ch, kh, kw = self.weight.shape
        return (f"{in_ch * self.groups}, {out_ch}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, relu={self.relu}")

    def forward(self, x: Tensor, shortcut: Tensor | None = None) -> Tensor:
        return fused_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                            self.groups, self.relu, shortcut)


class _FusedBlock(nn.Module):
    """A torchvision Bottleneck or BasicBlock as fused convolutions (same computation)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        if isinstance(block, Bottleneck):
            pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
        elif isinstance(block, BasicBlock):
            pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        else:
            raise TypeError(f"cannot fuse a {type(block).__name__} residual block")
        # every convolution ends in a ReLU; the last one after adding the shortcut
        self.convs = nn.ModuleList(FusedConv2d(conv, norm, relu=True) for conv, norm in pairs)
        self.downsample = None
        if block.downsample is not None:
            ds = block.downsample
            if not (isinstance(ds, nn.Sequential) and len(ds) == 2):
                raise TypeError("cannot fuse a downsample other than Sequential(conv, norm)")
            self.downsample = FusedConv2d(ds[0], ds[1], relu=False)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = x
        for conv in self.convs[:-1]:
            out = conv(out)
        return self.convs[-1](out, shortcut)


class FusedResNet(nn.Module):
    """Inference twin of `Backbone.body` (torchvision ResNet stem + layers): folded batch norms,
    fused ReLU/residual additions, channels_last activations.

    forward(images [B, 3, H, W]) -> features [B, C, h, w] (channels_last memory format), equal
    to the original body's output up to float32 rounding.
    """

    def __init__(self, body: nn.Sequential):
        super().__init__()
        names = list(body._modules)
        if names[:4] != ["conv1", "bn1", "relu", "maxpool"] or not names[4:]:
            raise TypeError(f"expected a ResNet body (conv1, bn1, relu, maxpool, layer...), got {names}")
        self.stem = FusedConv2d(body.conv1, body.bn1, relu=True)
        self.maxpool = copy.deepcopy(body.maxpool)
        self.blocks = nn.Sequential(*(_FusedBlock(b) for name in names[4:] for b in getattr(body, name)))

    def forward(self, images: Tensor) -> Tensor:
        # in the weights' dtype: bfloat16 after optimize_for_inference(..., bf16=True)
        x = images.to(self.stem.weight.dtype).contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.stem(x))
        return self.blocks(x)


class FusedBackbone(nn.Module):
    """`Backbone`'s contract (forward(images, mask, pad_invariant) -> (features, mask)) on a
    `FusedResNet` built from a Backbone's body; inference only. Features come back in the
    default (contiguous) memory format, as the plain backbone gives them."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.body = FusedResNet(backbone.body)
        self.num_channels = backbone.num_channels
        self.stride = backbone.stride

    def _features(self, images: Tensor) -> Tensor:
        return self.body(images).to(images.dtype).contiguous()

    def forward(self, images: Tensor, mask: Tensor, pad_invariant: bool = False
                ) -> tuple[Tensor, Tensor]:
        if pad_invariant:
            return features_per_image(self._features, images, mask)
        features = self._features(images)
        return features, resize_mask(mask, features.shape[-2:])


class InferenceWrapper(nn.Module):
    """A module that runs a wrapped inference DabDetr (`model`) differently; `config` is the
    wrapped model's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config


class AutocastModel(InferenceWrapper):
    """`model` with its forward under torch.autocast in `dtype` (anchors, boxes and outputs stay
    float32: the model keeps them so)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__(model)
        self.dtype = dtype

    def forward(self, images: Tensor, mask: Tensor | None = None) -> DetectionOutput:
        with torch.autocast(images.device.type, dtype=self.dtype):
            return self.model(images, mask)


#: choices of the `--optimize` option of `dabdetr predict` and `dabdetr evaluate`
OPTIMIZE_CHOICES = ("none", "fused", "int8", "bf16", "cudagraph")


def add_cli_argument(parser: argparse.ArgumentParser) -> None:
    """The `--optimize` option of the inference commands (applied with `optimized`)."""
    parser.add_argument(
        "--optimize", choices=OPTIMIZE_CHOICES, default="none",
        help="fused: frozen batch norms folded once and fused oneDNN convolutions (outputs "
             "within float rounding, ~1e-6); int8: fused plus dynamic int8 Linear layers in the "
             "transformer (CPU only; not exact); bf16: fused with bfloat16 convolutions and the "
             "transformer under bfloat16 autocast (CUDA, or a CPU with AVX512-BF16/AMX; not "
             "exact); cudagraph: fused, replayed as one CUDA graph per input size (GPU; for "
             "inputs of one size). Deviations and AP effects: benchmarks/README.md")


def optimized(model: DabDetr, mode: str) -> nn.Module:
    """`mode` as the command line names it: "none" (the model itself), "fused"
    (`optimize_for_inference`), "int8" (fused plus dynamic int8 Linear layers), "bf16" (fused
    with bfloat16 convolution weights, under bfloat16 autocast) or "cudagraph" (fused, wrapped
    in `CUDAGraphed`; CUDA only). Every mode but "none" returns a new module; `model` is left
    as it is."""
    if mode not in OPTIMIZE_CHOICES:
        raise ValueError(f"unknown optimization {mode!r}; choose one of {OPTIMIZE_CHOICES}")
    if mode == "none":
        return model
    if mode == "cudagraph":
        _check_cuda(model)  # before any work
    fast = optimize_for_inference(model, quantize="int8" if mode == "int8" else None,
                                  bf16=mode == "bf16")
    return CUDAGraphed(fast) if mode == "cudagraph" else fast


def _check_cuda(model: nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs run on a CUDA GPU only; this model is on {device}")


def _cloned(out: DetectionOutput | None) -> DetectionOutput | None:
    """A copy of an inference output (no denoising part) that the next replay cannot
    overwrite."""
    if out is None:
        return None
    return DetectionOutput(out.pred_logits.clone(), out.pred_boxes.clone(),
                           aux_outputs=[_cloned(a) for a in out.aux_outputs],
                           enc_outputs=_cloned(out.enc_outputs))


class CUDAGraphed(InferenceWrapper):
    """An inference DabDetr on a GPU whose forward replays a CUDA graph, one per input shape.

    DAB-DETR runs hundreds of small kernels per image; at batch 1 on a fast GPU the time to
    launch them from Python, not the arithmetic, bounds the forward. The first call with a
    given (images, mask) shape runs the model twice to warm it up (cuDNN and cuBLAS pick their
    kernels) and captures a third run as a CUDA graph; every call with that shape then copies
    its inputs into the graph's and replays it. Outputs are the model's own (the same
    kernels), returned as fresh tensors.

    Args:
        model: an inference model on a CUDA device, usually `optimize_for_inference`'s.
        max_shapes: graphs kept (least recently used dropped); each holds its activations'
            memory, about one forward's worth.

    The forward always runs under torch.inference_mode(). `config` is the wrapped model's.
    """

    def __init__(self, model: nn.Module, max_shapes: int = 8):
        _check_cuda(model)
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be at least 1, got {max_shapes}")
        super().__init__(model.eval().requires_grad_(False))
        self.max_shapes = max_shapes
        self.captures = 0
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()

    @torch.inference_mode()
    def forward(self, images: Tensor, mask: Tensor) -> DetectionOutput:
        key = (tuple(images.shape), images.dtype, images.device, tuple(mask.shape))
        entry = self._graphs.pop(key, None)
        if entry is None:
            entry = self._capture(images, mask)
        self._graphs[key] = entry  # the most recently used last
        while len(self._graphs) > self.max_shapes:
            self._graphs.popitem(last=False)
        static_images, static_mask, graph, out = entry
        static_images.copy_(images)
        static_mask.copy_(mask)
        graph.replay()
        return _cloned(out)

    def _capture(self, images: Tensor, mask: Tensor) -> tuple:
        self.captures += 1
        if self.captures == self.max_shapes + 1:
            logger.warning("more than %d input shapes: CUDA graphs are being captured again; "
                           "for inputs of many sizes --optimize fused is faster", self.max_shapes)
        static_images, static_mask = images.clone(), mask.clone()
        device = images.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture needs
            for _ in range(2):
                self.model(static_images, static_mask)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(static_images, static_mask)
        return static_images, static_mask, graph, out


def optimize_for_inference(model: DabDetr, *, quantize: str | None = None, bf16: bool = False
                           ) -> nn.Module:
    """An inference-only copy of `model` that computes the same outputs faster.

    Args:
        model: a DabDetr (any backbone/config; its ResNet may use FrozenBatchNorm2d or
            BatchNorm2d, whose running statistics are then frozen into the weights). Not
            modified.
        quantize: None, or "int8" for dynamic int8 quantization of the transformer's nn.Linear
            layers (CPU; outputs then differ by ~1e-2, no longer by float rounding only).
        bf16: folded convolution weights in bfloat16 and the forward under bfloat16 autocast
            (`AutocastModel`); CUDA, or a CPU with native bfloat16 (see `dabdetr.precision`).
            Not exact: logits move by ~4e-2, boxes by ~1e-3.

    Returns a DabDetr with a `FusedBackbone` (an `AutocastModel` around it with bf16), in eval
    mode with gradients disabled; forward(images, mask) as DabDetr's. Run it under
    torch.inference_mode() (or no_grad). Its outputs equal the original's up to float32
    rounding (~1e-6); its state_dict holds folded weights, so keep the original for saving.
    """
    if not isinstance(model, DabDetr):
        raise TypeError(f"optimize_for_inference expects a DabDetr, got {type(model).__name__}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r} is not supported; use None or 'int8'")
    if bf16 and quantize is not None:
        raise ValueError("bf16 and quantize='int8' cannot be combined: the dynamic int8 "
                         "layers take float32 input")
    device = next(model.parameters()).device
    if quantize == "int8" and device.type != "cpu":
        raise ValueError("quantize='int8' (dynamic quantization) runs on CPU only")
    autocast = check_amp("bf16", device) if bf16 else None  # refuses before any work
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    # the copy's backbone (not the caller's) becomes its fused twin: the same contract
    fast.backbone = FusedBackbone(fast.backbone).to(device)
    if quantize == "int8":
        with warnings.catch_warnings():
            # torch.ao.quantization announces its move to torchao; it still ships with torch
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            from torch.ao.quantization import quantize_dynamic

            quantize_dynamic(fast.transformer, {nn.Linear}, dtype=torch.qint8, inplace=True)
    if autocast is None:
        return fast
    # autocast does not reach the fused oneDNN kernels: bfloat16 weights make them run in it
    fast.backbone.body.to(torch.bfloat16)
    return AutocastModel(fast, autocast)

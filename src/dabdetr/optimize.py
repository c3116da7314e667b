"""Faster inference with the same outputs: a fused, pre-folded ResNet.

The plain model already folds each frozen batch norm into its convolution on the fly, for
inputs large enough to pay for refolding on every call, and without grad runs the same fused
oneDNN kernels as below (`Backbone.run_body`). `optimize_for_inference(model)` returns an
inference-only copy that folds once, at any input size (on small inputs the plain model runs
its modules unfolded):

- the folded weights (w' = w * s, b' = beta - mean * s with s = gamma / sqrt(var + eps)) are
  computed once, in float64, and stored channels_last;
- on CPU (oneDNN builds) each convolution also applies its ReLU, and the last convolution of a
  residual block adds the shortcut and applies the ReLU in the same kernel, writing into the
  shortcut's buffer. Activations are channels_last (NHWC), oneDNN's native layout;
- elsewhere (CUDA, other CPU builds) the folded convolutions run through F.conv2d.

Numerically the optimized model differs from the plain one only by float32 rounding (max abs
difference ~2e-6 on logits and ~3e-7 on boxes of DAB-DETR-R50 at 800x1088, see
benchmarks/RESULTS.md). Its state dict holds folded weights: it is not a checkpoint; save the
original model instead.

`quantize="int8"` additionally applies dynamic int8 quantization to the transformer's
nn.Linear layers (CPU only). That is not exact: on DAB-DETR-R50 logits move by ~7e-2 and boxes
by ~4e-3, for ~7% less time.

`bf16=True` (`--optimize bf16`) is another inexact mode: the fused convolutions with bfloat16
weights, the transformer under bfloat16 autocast (`dabdetr.precision`). On a 2-core Xeon with
AMX, DAB-DETR-R50 at 800x1088 took 0.33-0.48 s instead of 1.0-1.1 s; logits move by ~4e-2,
boxes by ~1e-3.

`cudagraph` (`--optimize cudagraph`, `CUDAGraphed`) is for a GPU and inputs of a fixed size (a
camera stream, a fixed resize): the fused model's forward is captured once per input shape as a
CUDA graph and replayed, which removes the per-kernel launch cost that bounds DAB-DETR-R50 at
batch 1 on a fast GPU. Same arithmetic as `fused`. Each new shape costs a capture (about three
forward passes), so inputs of many sizes (COCO evaluation) are faster with `fused`.

Not used, measured on a 2-core Xeon: torch.compile (inductor with freezing) made the backbone
slower than these kernels (1.45 s vs ~1.1 s at 800x1088, 1 thread) and took ~40 s to compile;
oneDNN weight prepacking gained ~4% but gives wrong results when a caller passes NCHW input.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from dabdetr.models.backbone import fused_conv2d
from dabdetr.models.dab_detr import DabDetr
from dabdetr.models.outputs import DetectionOutput
from dabdetr.precision import check_amp

logger = logging.getLogger(__name__)

__all__ = ["OPTIMIZE_CHOICES", "CUDAGraphed", "FusedConv2d", "FusedResNet", "add_cli_argument",
           "fold_batch_norm", "optimize_for_inference", "optimized"]


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
             "inputs of one size). Deviations and AP effects: benchmarks/RESULTS.md")


def optimized(model: DabDetr, mode: str) -> DabDetr:
    """`mode` as the command line names it: "none" (the model itself), "fused"
    (`optimize_for_inference`, in place), "int8" (fused plus dynamic int8 Linear layers),
    "bf16" (fused with bfloat16 convolution weights, the rest under bfloat16 autocast) or
    "cudagraph" (fused, wrapped in `CUDAGraphed`; CUDA only)."""
    if mode not in OPTIMIZE_CHOICES:
        raise ValueError(f"unknown optimization {mode!r}; choose one of {OPTIMIZE_CHOICES}")
    if mode == "none":
        return model
    if mode == "cudagraph":
        _check_cuda(model)  # before any change to the model
    fused = optimize_for_inference(model, inplace=True,
                                   quantize="int8" if mode == "int8" else None,
                                   bf16=mode == "bf16")
    return CUDAGraphed(fused) if mode == "cudagraph" else fused


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


class CUDAGraphed(nn.Module):
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

    def __init__(self, model: DabDetr, max_shapes: int = 8):
        super().__init__()
        _check_cuda(model)
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be at least 1, got {max_shapes}")
        self.model = model.eval().requires_grad_(False)
        self.max_shapes = max_shapes
        self.captures = 0
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()

    @property
    def config(self):
        return self.model.config

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


def optimize_for_inference(
    model: DabDetr, *, inplace: bool = False, quantize: str | None = None, bf16: bool = False
) -> DabDetr:
    """An inference-only DabDetr that computes the same outputs faster.

    Args:
        model: a DabDetr (any backbone/config; its ResNet may use FrozenBatchNorm2d or
            BatchNorm2d, whose running statistics are then frozen into the weights).
        inplace: False (default) leaves `model` untouched and returns an optimized deep copy;
            True converts `model` itself and returns it.
        quantize: None, or "int8" for dynamic int8 quantization of the transformer's nn.Linear
            layers (CPU; outputs then differ by ~1e-2, no longer by float rounding only).
        bf16: folded convolution weights in bfloat16 (the fused oneDNN kernels then run in
            bfloat16) and the rest of the forward under bfloat16 autocast
            (`model.autocast_dtype`); CUDA, or a CPU with native bfloat16 (see
            `dabdetr.precision`). Not exact: logits move by ~4e-2, boxes by ~1e-3.

    Returns the model in eval mode with gradients disabled. Run it under torch.inference_mode()
    (or no_grad). Its outputs equal the original's up to float32 rounding (~1e-6); its
    state_dict holds folded weights, so keep the original for saving and fine-tuning.
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
    autocast = check_amp("bf16", device) if bf16 else None  # refuses before any change
    if not inplace:
        model = copy.deepcopy(model)
    model.eval().requires_grad_(False)
    model.backbone.body = FusedResNet(model.backbone.body).to(device)
    # the 1x1 projection reads the channels_last features; torch's own dispatch picks a slow
    # non-oneDNN kernel for it
    model.input_proj = FusedConv2d(model.input_proj, None, relu=False).to(device)
    if autocast is not None:
        model.autocast_dtype = autocast
        # autocast does not reach the fused oneDNN kernels; bfloat16 weights (and the body's
        # input cast to them) make them run in bfloat16: 1.17x faster than autocast over the
        # plain model for R50 at 800x1088 (benchmarks/RESULTS.md)
        model.backbone.body.to(torch.bfloat16)
        model.input_proj.to(torch.bfloat16)
    if quantize == "int8":
        with warnings.catch_warnings():
            # torch.ao.quantization announces its move to torchao; it still ships with torch
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            from torch.ao.quantization import quantize_dynamic

            quantize_dynamic(model.transformer, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model

"""Box utilities: formats, logit space, and the precision boxes are computed in.

Box formats: normalized cxcywh (centre x, centre y, width, height in [0, 1] of the image) is
what the model predicts; absolute xyxy (pixels) is what post-processing and COCO use. The
conversions and the generalized IoU are torchvision's (`torchvision.ops`); this module names the
project's boundaries between them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["box_precision", "cxcywh_to_xyxy", "generalized_box_iou", "inverse_sigmoid",
           "xyxy_to_cxcywh"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps.

    The authors clamp with eps 1e-3 (transformers' DabDetr uses 1e-5): anchors in logit space
    are bounded by about +-6.9, which the published weights depend on.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_precision(x: Tensor) -> Tensor:
    """`x` in float32 if it is in a reduced precision (bf16/fp16 under autocast), else as is.

    Anchors and boxes stay in float32 (or float64) even under autocast: their sine embedding
    and logit-space updates need more than bfloat16's 8 significant bits."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1), in the same units."""
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h), in the same units."""
    return box_convert(boxes, "xyxy", "cxcywh")

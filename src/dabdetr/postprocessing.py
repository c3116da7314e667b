"""Post-processing: model outputs -> per-image detections in absolute pixel coordinates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dabdetr.models.box_ops import cxcywh_to_xyxy
from dabdetr.models.outputs import DetectionOutput

# The authors' evaluation keeps the top 300 (query, class) pairs for DAB-DETR; their
# DAB-Deformable-DETR PostProcess hard-codes 100.
DEFAULT_NUM_SELECT = {"dab-detr": 300, "dab-deformable-detr": 100}


def default_num_select(config: object) -> int:
    """The authors' top-k for a model config's family (300 DAB-DETR, 100 deformable)."""
    from dabdetr.model_types import model_type_of

    return DEFAULT_NUM_SELECT[model_type_of(config)]


def resolve_num_select(num_select: int | None, config: object) -> int:
    """`num_select`, or the authors' top-k for the config's family where it is None."""
    return default_num_select(config) if num_select is None else num_select


@torch.no_grad()
def postprocess(
    outputs: DetectionOutput | dict,
    target_sizes: Tensor | Sequence[Sequence[int]],
    num_select: int = 300,
    threshold: float = 0.0,
) -> list[dict[str, Tensor]]:
    """Top-k detections per image, as the authors' PostProcess.

    Args:
        outputs: model output (pred_logits [B, N, C], pred_boxes [B, N, 4] normalized cxcywh).
        target_sizes: [B, 2] (height, width) of each original image, in pixels.
        num_select: k of the top-k over all N * C (query, class) scores; upstream evaluates
            with 300 (capped at N * C).
        threshold: detections scoring below it are dropped after the top-k (0 keeps all k).
    Returns:
        one dict per image: `scores` [K] float (sigmoid), `labels` [K] int64 class indices,
        `boxes` [K, 4] float absolute (x0, y0, x1, y1) in the original image's pixels; sorted by
        descending score.
    """
    if isinstance(outputs, dict):
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    else:
        logits, boxes = outputs.pred_logits, outputs.pred_boxes
    batch = logits.shape[0]
    sizes = torch.as_tensor(target_sizes, dtype=torch.float32, device=logits.device)
    if sizes.shape != (batch, 2):
        raise ValueError(f"target_sizes must be [B={batch}, 2] (height, width), got {tuple(sizes.shape)}")
    scores, labels, xyxy = top_detections(logits, boxes, sizes, num_select)
    results = []
    for s, lab, b in zip(scores, labels, xyxy, strict=True):
        keep = s >= threshold if threshold > 0 else slice(None)
        results.append({"scores": s[keep], "labels": lab[keep], "boxes": b[keep]})
    return results


def top_detections(logits: Tensor, boxes: Tensor, target_sizes: Tensor, num_select: int = 300
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The batched core of `postprocess` (no threshold), tensors in and out, exportable.

    Args:
        logits: [B, N, C] class logits; boxes: [B, N, 4] normalized cxcywh.
        target_sizes: [B, 2] (height, width) of each original image, any real or integer dtype.
        num_select: k of the top-k over all N * C (query, class) scores (capped at N * C).
    Returns:
        scores [B, K] float32 (sigmoid, descending), labels [B, K] int64 class indices,
        boxes [B, K, 4] float32 absolute xyxy in the original images' pixels.
    """
    batch, num_queries, num_classes = logits.shape
    k = min(num_select, num_queries * num_classes)
    prob = logits.float().sigmoid()
    scores, index = torch.topk(prob.view(batch, -1), k, dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    labels = index % num_classes
    xyxy = cxcywh_to_xyxy(boxes.float())
    xyxy = torch.gather(xyxy, 1, query.unsqueeze(-1).expand(-1, -1, 4))
    height, width = target_sizes.to(torch.float32).unbind(1)
    scale = torch.stack([width, height, width, height], dim=1)  # (B, 4)
    return scores, labels, xyxy * scale[:, None, :]

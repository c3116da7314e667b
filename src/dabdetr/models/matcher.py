"""Hungarian matching between decoder queries and ground-truth boxes (DETR, DAB-DETR recipe).

Also home of the two input normalizers shared by the matcher and the criterion:
`as_detection_output` (a DetectionOutput or a DETR-style dict -> DetectionOutput) and
`check_targets` (validates the per-image target dicts with a ValueError that names the fault).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from dabdetr.models.box_ops import cxcywh_to_xyxy, generalized_box_iou
from dabdetr.models.outputs import DetectionOutput

Targets = Sequence[Mapping[str, Any]]
"""Per-image ground truth: dicts with `boxes` [N, 4] float normalized (cx, cy, w, h) and `labels`
[N] int64 class indices. Other keys (image_id, size, ...) are ignored."""

MatchIndices = list[tuple[Tensor, Tensor]]
"""One (query_idx, target_idx) pair of int64 CPU tensors per image, query_idx ascending."""


def as_detection_output(outputs: DetectionOutput | Mapping[str, Any]) -> DetectionOutput:
    """Normalize model outputs to a DetectionOutput and check their shapes.

    Accepts a DetectionOutput or a DETR-style dict with `pred_logits` [B, Q, C], `pred_boxes`
    [B, Q, 4] (normalized cx, cy, w, h), optional `aux_outputs` (a list of such dicts or
    DetectionOutputs), optional `dn_outputs` and `dn_meta`.
    """
    if isinstance(outputs, DetectionOutput):
        out = outputs
    elif isinstance(outputs, Mapping):
        missing = {"pred_logits", "pred_boxes"} - outputs.keys()
        if missing:
            raise ValueError(
                f"outputs dict lacks {sorted(missing)}; expected keys pred_logits [B, Q, C], "
                f"pred_boxes [B, Q, 4] and optionally aux_outputs, dn_outputs, dn_meta"
            )
        dn = outputs.get("dn_outputs")
        out = DetectionOutput(
            pred_logits=outputs["pred_logits"],
            pred_boxes=outputs["pred_boxes"],
            aux_outputs=[as_detection_output(a) for a in outputs.get("aux_outputs") or []],
            dn_outputs=None if dn is None else as_detection_output(dn),
            dn_meta=outputs.get("dn_meta"),
        )
    else:
        raise TypeError(
            f"outputs must be a DetectionOutput or a dict with pred_logits/pred_boxes, "
            f"got {type(outputs).__name__}"
        )
    _check_predictions(out.pred_logits, out.pred_boxes)
    return out


def _check_predictions(pred_logits: Tensor, pred_boxes: Tensor) -> None:
    if pred_logits.dim() != 3:
        raise ValueError(f"pred_logits must be [B, Q, C], got shape {tuple(pred_logits.shape)}")
    if pred_boxes.shape != (*pred_logits.shape[:2], 4):
        raise ValueError(
            f"pred_boxes must be [B, Q, 4] = {(*pred_logits.shape[:2], 4)} to match pred_logits, "
            f"got shape {tuple(pred_boxes.shape)}"
        )


def check_targets(targets: Targets, batch_size: int, num_classes: int) -> None:
    """Raise ValueError unless `targets` holds `batch_size` dicts with `boxes` [N, 4] (float)
    and `labels` [N] (integer, each in [0, num_classes))."""
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} target dicts for a batch of {batch_size} images")
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(
                f"targets[{i}] must have 'boxes' [N, 4] and 'labels' [N], got keys {sorted(t)}"
            )
        boxes, labels = t["boxes"], t["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(
                f"targets[{i}]['boxes'] must be [N, 4] normalized (cx, cy, w, h), "
                f"got shape {tuple(boxes.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"targets[{i}]['labels'] must be [N] with N = {boxes.shape[0]} (one per box), "
                f"got shape {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"targets[{i}]['labels'] must be int64, got {labels.dtype}")
    # The range check reads the labels' values: one device->host sync for the whole batch
    # (the matcher runs this once per decoder layer), and the per-image search only on failure.
    flat = torch.cat([t["labels"] for t in targets]) if targets else torch.empty(0)
    if flat.numel() and bool(((flat < 0) | (flat >= num_classes)).any()):
        for i, t in enumerate(targets):
            lab = t["labels"]
            bad = lab[(lab < 0) | (lab >= num_classes)].unique().tolist()
            if bad:
                raise ValueError(
                    f"targets[{i}]['labels'] has class indices {bad} outside [0, {num_classes}); "
                    f"map category ids to indices below num_classes (or raise num_classes)"
                )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth boxes minimizing a matching cost.

    For every image, the cost between query q and target t is

        C[q, t] = cost_class * (pos[q, l_t] - neg[q, l_t])
                + cost_bbox  * ||b_q - b_t||_1                      (normalized cxcywh)
                - cost_giou  * GIoU(xyxy(b_q), xyxy(b_t))

    with p = sigmoid(logit) and the focal-loss-shaped class terms
    pos = alpha * (1 - p)^gamma * -log(p + 1e-8), neg = (1 - alpha) * p^gamma * -log(1 - p + 1e-8).
    The assignment minimizing the summed cost is solved exactly by scipy's
    linear_sum_assignment on the CPU; min(Q, N) pairs are returned per image.

    Runs without gradients. The cost matrix is computed for the whole batch at once
    ([B*Q, sum N], as DETR does) and split per image.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0; set cost_class, cost_bbox or cost_giou")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}"
        )

    @torch.no_grad()
    def forward(
        self, outputs: DetectionOutput | Mapping[str, Any], targets: Targets
    ) -> MatchIndices:
        """Match the top-level predictions of `outputs` (aux layers are ignored) to `targets`.

        Args:
            outputs: DetectionOutput or dict; pred_logits [B, Q, C], pred_boxes [B, Q, 4]
                normalized (cx, cy, w, h).
            targets: B dicts with `boxes` [N_i, 4] normalized (cx, cy, w, h) and `labels`
                [N_i] int64 in [0, C).

        Returns:
            B pairs (query_idx, target_idx), int64 CPU tensors of length min(Q, N_i), query_idx
            ascending: query query_idx[j] is assigned to target target_idx[j]. Empty for an
            image without targets.
        """
        out = as_detection_output(outputs)
        batch_size, num_queries, num_classes = out.pred_logits.shape
        check_targets(targets, batch_size, num_classes)

        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in targets]

        device = out.pred_logits.device
        prob = out.pred_logits.flatten(0, 1).sigmoid()  # (B*Q, C)
        pred_boxes = out.pred_boxes.flatten(0, 1)  # (B*Q, 4)
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device)  # (sum N,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device, pred_boxes.dtype)

        alpha, gamma = self.focal_alpha, self.focal_gamma
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        class_cost = pos[:, tgt_labels] - neg[:, tgt_labels]  # (B*Q, sum N)
        bbox_cost = torch.cdist(pred_boxes, tgt_boxes, p=1)  # (B*Q, sum N)
        giou_cost = -generalized_box_iou(
            cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(tgt_boxes)
        )
        cost = (
            self.cost_bbox * bbox_cost + self.cost_class * class_cost + self.cost_giou * giou_cost
        )
        # One device->host copy; float32 -> float64 is exact, scipy works in float64 anyway.
        cost_np = cost.view(batch_size, num_queries, -1).cpu().to(torch.float64).numpy()

        indices: MatchIndices = []
        start = 0
        for i, n in enumerate(sizes):
            c = cost_np[i, :, start : start + n]  # (Q, N_i)
            start += n
            if n == 0:
                indices.append((empty, empty.clone()))
                continue
            if not torch.from_numpy(c).isfinite().all():
                raise ValueError(
                    f"matching cost for image {i} is not finite (NaN/inf): check pred_logits, "
                    f"pred_boxes and targets[{i}]['boxes'] of that image for NaN/inf"
                )
            query_idx, target_idx = linear_sum_assignment(c)
            indices.append(
                (
                    torch.as_tensor(query_idx, dtype=torch.int64),
                    torch.as_tensor(target_idx, dtype=torch.int64),
                )
            )
        return indices

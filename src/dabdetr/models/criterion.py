"""Set-prediction losses of DAB-DETR: Hungarian matching, then focal, L1 and GIoU losses.

The criterion owns the loss-name -> weight table (`SetCriterion.weight_dict`) and returns the
losses unweighted; `weighted_total` does the weighting.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from dabdetr import distributed
from dabdetr.models.box_ops import cxcywh_to_xyxy
from dabdetr.models.matcher import (
    HungarianMatcher,
    MatchIndices,
    Targets,
    as_detection_output,
    check_targets,
)
from dabdetr.models.outputs import DetectionOutput

DEFAULT_WEIGHTS: dict[str, float] = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
"""The published recipe: classification 1, L1 5, GIoU 2 (the same on every decoder layer)."""

# the suffixes of the copies of a term: denoising (`_dn`), then an auxiliary layer or the encoder
_LOSS_SUFFIX = re.compile(r"(_dn)?(_\d+|_enc)?$")


class SetCriterion(nn.Module):
    """DETR-style set loss with DAB-DETR's sigmoid focal classification.

    For each decoder layer (the last one, then every entry of `aux_outputs`), queries are matched
    to the targets by `matcher` (re-run per layer) and three losses are computed, all divided by
    num_boxes = the number of target boxes in the batch, averaged over processes, clamped >= 1:

    - `loss_ce`: sigmoid focal loss (alpha, gamma) of pred_logits [B, Q, C] against one-hot
      targets (1 at the label of a matched query, 0 everywhere else: unmatched queries are pushed
      towards "no object" in every class). Upstream's convention, kept for parity:
      `focal.mean(1).sum() / num_boxes * Q`, i.e. mean over queries, sum over images and classes,
      times Q. Numerically that is focal.sum() / num_boxes.
    - `loss_bbox`: L1 distance of the matched normalized (cx, cy, w, h) boxes, summed / num_boxes.
    - `loss_giou`: 1 - GIoU of the matched boxes (in xyxy), summed / num_boxes.

    Auxiliary layer i gives the same keys with suffix `_i` (`loss_ce_0`, ...).

    One-to-many matching (`match_repeat` k > 1, as in H-DETR's one-to-many branch): every target
    box is repeated k times before matching, so up to k queries are assigned to each ground-truth
    box, and that layer's losses are divided by k * num_boxes (the repeated targets are simply
    the targets of that layer). `match_repeat_layers` names the decoder layers it applies to,
    counted from the first decoder layer: aux layer i is layer i, the last layer is
    `len(aux_outputs)`. None means every layer.

    Denoising (DN-DETR): `dn_losses` is the hook for `outputs.dn_outputs` / `dn_meta`; it will
    reuse `layer_losses` with the indices recorded in `dn_meta` instead of a matching.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module | None = None,
        weight_dict: Mapping[str, float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        match_repeat: int = 1,
        match_repeat_layers: Collection[int] | None = None,
        enc_match_repeat: int = 1,
        enc_class_agnostic: bool = False,
    ) -> None:
        """
        Args:
            num_classes: C, the size of the classifier output (91 for COCO category ids).
            matcher: called as matcher(DetectionOutput, targets) -> MatchIndices; defaults to
                HungarianMatcher() with the published costs.
            weight_dict: weights of the last layer's losses (`loss_ce`, `loss_bbox`,
                `loss_giou`, ...); defaults to DEFAULT_WEIGHTS. Copies with suffix `_i` for the
                auxiliary layers are added by `weight_dict_for` / `forward`.
            focal_alpha, focal_gamma: parameters of the sigmoid focal loss.
            match_repeat: k, how many queries each target is matched to (1 = one-to-one).
            match_repeat_layers: decoder layers that use `match_repeat` (None: all).
            enc_match_repeat: k for the encoder proposals of query selection (`enc_outputs`).
            enc_class_agnostic: match and classify the encoder proposals as one class: every
                target's label is 0 for them (Deformable DETR's two-stage, which ranks the
                proposals by class 0 alone). `dabdetr.model_types.class_agnostic_proposals`
                gives the value of a model family.
        """
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if match_repeat < 1 or enc_match_repeat < 1:
            raise ValueError(f"match_repeat and enc_match_repeat must be >= 1, got "
                             f"{match_repeat}, {enc_match_repeat}")
        self.enc_match_repeat = enc_match_repeat
        self.enc_class_agnostic = enc_class_agnostic
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.match_repeat = match_repeat
        self.match_repeat_layers = (
            None if match_repeat_layers is None else frozenset(match_repeat_layers)
        )
        # fixed here: the weight of a suffixed key (`_i`, `_enc`, `_dn`, `_dn_i`) is its base
        # term's (see `weight`)
        self.weight_dict: Mapping[str, float] = MappingProxyType(
            dict(DEFAULT_WEIGHTS if weight_dict is None else weight_dict))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}, match_repeat={self.match_repeat}, "
            f"enc_class_agnostic={self.enc_class_agnostic}, "
            f"weights={dict(self.weight_dict)}"
        )

    def weight_dict_for(self, num_aux: int) -> dict[str, float]:
        """Weights of every key forward returns for outputs with `num_aux` auxiliary layers:
        the base weights plus a `_i` copy of each for i in range(num_aux)."""
        weights = dict(self.weight_dict)
        for i in range(num_aux):
            weights.update({f"{k}_{i}": w for k, w in self.weight_dict.items()})
        return weights

    def weight(self, key: str) -> float:
        """The weight of loss `key`: its own, or that of the term it is a copy of (`loss_ce_3`,
        `loss_ce_enc`, `loss_ce_dn`, `loss_ce_dn_3` weigh like `loss_ce`). KeyError if none."""
        if key in self.weight_dict:
            return self.weight_dict[key]
        base = _LOSS_SUFFIX.sub("", key)
        if base in self.weight_dict:
            return self.weight_dict[base]
        raise KeyError(key)

    def weighted_total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Sum of loss * weight over the keys of `losses` that start with `loss_` (other keys
        are logging-only metrics). A loss key without a weight raises ValueError."""
        names = [k for k in losses if k.startswith("loss_")]
        missing = [k for k in names if _LOSS_SUFFIX.sub("", k) not in self.weight_dict
                   and k not in self.weight_dict]
        if missing:
            raise ValueError(f"no weight for {missing}; add them to the criterion's weight_dict")
        terms = [losses[k] * self.weight(k) for k in names]
        if not terms:
            raise ValueError("weighted_total got no `loss_*` entries")
        return torch.stack(terms).sum()

    def forward(
        self, outputs: DetectionOutput | Mapping[str, Any], targets: Targets
    ) -> dict[str, Tensor]:
        """Unweighted losses of every decoder layer.

        Args:
            outputs: DetectionOutput or dict: pred_logits [B, Q, C], pred_boxes [B, Q, 4]
                normalized (cx, cy, w, h), aux_outputs (list, earliest layer first).
            targets: B dicts with `boxes` [N_i, 4] float normalized (cx, cy, w, h) and `labels`
                [N_i] int64 in [0, num_classes); other keys are ignored. N_i may be 0.

        Returns:
            Scalar tensors `loss_ce`, `loss_bbox`, `loss_giou` for the last layer and
            `loss_ce_i`, ... for auxiliary layer i. `weight(key)` gives each one's weight.
        """
        out = as_detection_output(outputs)
        batch_size, _, num_classes = out.pred_logits.shape
        if num_classes != self.num_classes:
            raise ValueError(
                f"pred_logits has {num_classes} classes but the criterion was built with "
                f"num_classes={self.num_classes}"
            )
        check_targets(targets, batch_size, self.num_classes)
        num_boxes = self.num_boxes(targets, out.pred_logits.device)
        num_aux = len(out.aux_outputs)

        # Last layer first (unsuffixed), then aux layer i with suffix _i; `layer` counts decoder
        # layers from the first, so the last one is num_aux.
        layers = [(num_aux, out), *enumerate(out.aux_outputs)]
        losses: dict[str, Tensor] = {}
        for layer, pred in layers:
            suffix = "" if layer == num_aux else f"_{layer}"
            k = self._repeat_for(layer)
            layer_targets = targets if k == 1 else _repeat_targets(targets, k)
            indices = self.matcher(pred, layer_targets)
            layer_losses = self.layer_losses(pred, layer_targets, indices, num_boxes * k)
            losses.update({f"{name}{suffix}": v for name, v in layer_losses.items()})

        losses.update(self.dn_losses(out, targets, num_boxes))
        losses.update(self.encoder_losses(out, targets, num_boxes))
        return losses

    def encoder_losses(
        self, outputs: DetectionOutput, targets: Targets, num_boxes: float
    ) -> dict[str, Tensor]:
        """Losses of the per-cell encoder proposals (query selection): Hungarian matching over
        all cells (each target matched `enc_match_repeat` times, and labelled 0 when
        `enc_class_agnostic`), the same terms and weights as a decoder layer, named
        `loss_ce_enc`, `loss_bbox_enc`, `loss_giou_enc`. Empty when query selection is off."""
        enc = outputs.enc_outputs
        if enc is None:
            return {}
        if self.enc_class_agnostic:
            # upstream deep-copies the targets and zeroes every label (`bin_targets`): a
            # proposal is scored as "object" on class 0, whatever the object's class
            targets = [{"boxes": t["boxes"], "labels": torch.zeros_like(t["labels"])}
                       for t in targets]
        k = self.enc_match_repeat
        enc_targets = targets if k == 1 else _repeat_targets(targets, k)
        indices = self.matcher(enc, enc_targets)
        return self._named(self.layer_losses(enc, enc_targets, indices, num_boxes * k), "_enc")

    def _named(self, losses: dict[str, Tensor], suffix: str) -> dict[str, Tensor]:
        """`losses` with `suffix` on every name (weighted like its unsuffixed term)."""
        return {name + suffix: value for name, value in losses.items()}

    def _repeat_for(self, layer: int) -> int:
        if self.match_repeat_layers is None or layer in self.match_repeat_layers:
            return self.match_repeat
        return 1

    @staticmethod
    def num_boxes(targets: Targets, device: torch.device) -> float:
        """Total target boxes in the batch, averaged over processes, clamped to >= 1 (so a
        batch without any box does not divide by zero)."""
        total = torch.tensor(
            float(sum(len(t["labels"]) for t in targets)), dtype=torch.float64, device=device
        )
        return max(distributed.all_reduce_mean(total).item(), 1.0)

    def layer_losses(
        self,
        pred: DetectionOutput,
        targets: Targets,
        indices: MatchIndices,
        num_boxes: float,
    ) -> dict[str, Tensor]:
        """`loss_ce`, `loss_bbox`, `loss_giou` of one layer for given query <-> target indices.

        Args:
            pred: pred_logits [B, Q, C], pred_boxes [B, Q, 4] normalized (cx, cy, w, h) (its
                aux_outputs are ignored).
            targets: as in forward.
            indices: B pairs (query_idx, target_idx) of int64 tensors, from the matcher (or,
                for denoising, from dn_meta).
            num_boxes: the normalizer (> 0).
        """
        logits, boxes = pred.pred_logits, pred.pred_boxes
        device = logits.device
        batch_size, num_queries, _ = logits.shape

        batch_idx = torch.cat(
            [torch.full((len(q),), i, dtype=torch.int64) for i, (q, _) in enumerate(indices)]
        ).to(device)
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        tgt_labels = torch.cat(
            [
                t["labels"][j.to(t["labels"].device)]
                for t, (_, j) in zip(targets, indices, strict=True)
            ]
        ).to(device)
        tgt_boxes = torch.cat(
            [
                t["boxes"][j.to(t["boxes"].device)]
                for t, (_, j) in zip(targets, indices, strict=True)
            ]
        ).to(device, boxes.dtype)

        onehot = torch.zeros_like(logits)  # (B, Q, C)
        onehot[batch_idx, query_idx, tgt_labels] = 1.0
        focal = sigmoid_focal_loss(
            logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
        )
        # Upstream: mean over queries, sum over the rest, / num_boxes, * num_queries.
        loss_ce = focal.mean(1).sum() / num_boxes * num_queries

        matched = boxes[batch_idx, query_idx]  # (M, 4)
        loss_bbox = (matched - tgt_boxes).abs().sum() / num_boxes
        # Element-wise 1 - GIoU: the diagonal of upstream's pairwise GIoU matrix without building
        # the M x M matrix. torchvision adds eps=1e-7 to union and hull areas (safe for
        # degenerate boxes); that moves the loss by ~1e-6 relative from upstream.
        loss_giou = (
            generalized_box_iou_loss(
                cxcywh_to_xyxy(matched),
                cxcywh_to_xyxy(tgt_boxes),
                reduction="sum",
            )
            / num_boxes
        )
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def dn_losses(
        self, outputs: DetectionOutput, targets: Targets, num_boxes: float
    ) -> dict[str, Tensor]:
        """Denoising losses (DN-DETR): every denoising query reconstructs the ground truth it
        was made from (fixed assignment from `dn_meta`, no matching). Same terms and weights as
        the matching part, named `loss_ce_dn`, ... and `loss_ce_dn_i` for auxiliary layer i;
        normalized by num_boxes * groups. Empty when denoising is off."""
        if outputs.dn_outputs is None or outputs.dn_meta is None:
            return {}
        from dabdetr.models.denoising import dn_match_indices

        meta = outputs.dn_meta
        indices = dn_match_indices(meta)
        norm = num_boxes * meta["groups"]
        dn = outputs.dn_outputs
        layers = [("", dn), *((f"_{i}", a) for i, a in enumerate(dn.aux_outputs))]
        losses: dict[str, Tensor] = {}
        for suffix, pred in layers:
            losses.update(self._named(self.layer_losses(pred, targets, indices, norm),
                                      f"_dn{suffix}"))
        return losses


def _repeat_targets(targets: Targets, k: int) -> list[dict[str, Tensor]]:
    """Targets with every box repeated k times (target j -> j, j + N, ..., j + (k-1)N)."""
    return [{"boxes": t["boxes"].repeat(k, 1), "labels": t["labels"].repeat(k)} for t in targets]

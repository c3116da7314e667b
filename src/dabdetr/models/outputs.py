"""The model's output type, shared by the heads, the criterion and post-processing."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class DetectionOutput:
    """Predictions of one decoder layer (the last one at the top level).

    Attributes:
        pred_logits: [B, Q, C] float, class logits (sigmoid, not softmax: there is no
            "no object" class).
        pred_boxes: [B, Q, 4] float, normalized (cx, cy, w, h) in [0, 1] relative to the
            unpadded image.
        aux_outputs: one DetectionOutput per earlier decoder layer (layer 0 first); empty when
            auxiliary outputs are off. Their own `aux_outputs` are empty.
        dn_outputs: predictions for the denoising queries (training only, DN-DETR); None
            when denoising is off or in eval mode. Its `aux_outputs` hold the earlier layers.
        dn_meta: bookkeeping the criterion needs for the denoising loss (group count, padding
            per group, which target each denoising query reconstructs); None when off.
        enc_outputs: per-encoder-cell proposals (query selection, config.two_stage) with
            [B, S, C] logits and [B, S, 4] boxes; None when off.
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    aux_outputs: list[DetectionOutput] = field(default_factory=list)
    dn_outputs: DetectionOutput | None = None
    dn_meta: dict | None = None
    enc_outputs: DetectionOutput | None = None

    def to_dict(self) -> dict:
        """Plain-dict view in the DETR convention (`aux_outputs` as a list of dicts)."""
        out: dict = {"pred_logits": self.pred_logits, "pred_boxes": self.pred_boxes}
        out["aux_outputs"] = [
            {"pred_logits": a.pred_logits, "pred_boxes": a.pred_boxes} for a in self.aux_outputs
        ]
        return out

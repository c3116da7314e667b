"""Denoising queries (DN-DETR, Li et al. 2022, built on DAB-DETR by the same group).

During training only, noised copies of the ground-truth boxes (and labels) are fed to the
decoder as extra anchor queries in `groups` groups; the decoder learns to reconstruct the
originals. An attention mask keeps the matching queries from seeing any denoising query and
each group from seeing the others, so the matching part computes exactly what it computes
without them (and inference is unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dabdetr.models.box_ops import inverse_sigmoid


@dataclass
class DenoisingQueries:
    """content: [B, G*P, d]; anchors: [B, G*P, 4] (logit space); attn_mask: [G*P+N, G*P+N]
    bool, True where attention is allowed; meta: what the criterion needs (see dn_meta)."""

    content: Tensor
    anchors: Tensor
    attn_mask: Tensor
    meta: dict


def build_denoising_queries(
    targets: Sequence[Mapping[str, Tensor]],
    label_embed: nn.Embedding,
    num_matching: int,
    groups: int,
    label_noise: float,
    box_noise: float,
    eps: float,
) -> DenoisingQueries | None:
    """Noised ground truth as decoder queries.

    targets: B dicts with `boxes` [N_i, 4] normalized cxcywh and `labels` [N_i] class indices.
    Each group holds every object of an image, padded to P = max N_i; group g, object j sits at
    query g*P + j. Label noise: with probability `label_noise` a label is replaced by a random
    class. Box noise (DN-DETR): the center moves by up to box_noise * (w/2, h/2), w and h are
    scaled by 1 +- box_noise at most; the result is clamped to [0, 1]. Returns None when no image
    has an object (nothing to denoise).
    """
    device = label_embed.weight.device
    counts = [len(t["labels"]) for t in targets]
    pad = max(counts, default=0)
    if pad == 0 or groups <= 0:
        return None
    batch = len(targets)
    total = groups * pad
    labels = torch.zeros(batch, total, dtype=torch.int64, device=device)
    boxes = torch.full((batch, total, 4), 0.5, device=device)
    valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
    target_index = torch.zeros(batch, total, dtype=torch.int64, device=device)
    for b, t in enumerate(targets):
        n = counts[b]
        if n == 0:
            continue
        slots = (torch.arange(groups, device=device)[:, None] * pad
                 + torch.arange(n, device=device)[None]).flatten()  # (G*n,)
        labels[b, slots] = t["labels"].to(device).repeat(groups)
        boxes[b, slots] = t["boxes"].to(device, torch.float32).repeat(groups, 1)
        valid[b, slots] = True
        target_index[b, slots] = torch.arange(n, device=device).repeat(groups)
    num_classes = label_embed.num_embeddings
    if label_noise > 0:
        flip = torch.rand(batch, total, device=device) < label_noise
        labels = torch.where(flip, torch.randint_like(labels, num_classes), labels)
    if box_noise > 0:
        wh = boxes[..., 2:]
        shift = (torch.rand_like(boxes) * 2 - 1) * torch.cat([wh / 2, wh], dim=-1) * box_noise
        boxes = (boxes + shift).clamp(0.0, 1.0)
    content = label_embed(labels)  # (B, G*P, d)
    anchors = inverse_sigmoid(boxes, eps)
    # attention mask (True = may attend): matching queries see only matching queries; a
    # denoising group sees itself and the matching queries
    size = total + num_matching
    allowed = torch.zeros(size, size, dtype=torch.bool, device=device)
    allowed[total:, total:] = True
    for g in range(groups):
        block = slice(g * pad, (g + 1) * pad)
        allowed[block, block] = True
        allowed[block, total:] = True
    meta = {"groups": groups, "pad": pad, "valid": valid, "target_index": target_index}
    return DenoisingQueries(content, anchors, allowed, meta)


def dn_match_indices(meta: Mapping) -> list[tuple[Tensor, Tensor]]:
    """(query_idx, target_idx) per image for the denoising queries (fixed, no matching)."""
    out = []
    for valid, index in zip(meta["valid"], meta["target_index"], strict=True):
        queries = torch.nonzero(valid).flatten()
        out.append((queries.cpu(), index[queries].cpu()))
    return out

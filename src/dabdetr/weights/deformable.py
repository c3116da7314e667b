"""The authors' DAB-Deformable-DETR checkpoints: recognition, key renames, config inference.

Their state dict differs from ours only in the backbone prefix (`backbone.0.body.` vs
`backbone.body.`), the two-stage modules (directly under `transformer.` there, under
`transformer.selection.` here), and two second references to the heads
(`transformer.decoder.bbox_embed.*`, `transformer.decoder.class_embed.*`), dropped after
checking they equal `bbox_embed.*` / `class_embed.*`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from dabdetr.config import DabDeformableDetrConfig
from dabdetr.weights.official import infer_backbone

# (authors' prefix, ours)
RENAMES = (
    ("backbone.0.body.", "backbone.body."),
    ("transformer.enc_output.", "transformer.selection.enc_output."),
    ("transformer.enc_output_norm.", "transformer.selection.enc_output_norm."),
    ("transformer.pos_trans.", "transformer.selection.pos_trans."),
    ("transformer.pos_trans_norm.", "transformer.selection.pos_trans_norm."),
)
_HEAD_COPIES = ("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")


def is_deformable_state_dict(state: dict[str, Any]) -> bool:
    """Multi-scale deformable attention's `sampling_offsets` mark the deformable variant."""
    return any(".sampling_offsets." in k for k in state)


def _renamed(key: str, table) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def official_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' keys renamed to ours, float16 tensors cast to float32 (the authors' files
    may be stored in half precision; the model computes in float32)."""
    out: dict[str, Tensor] = {}
    copies: dict[str, Tensor] = {}
    for key, value in state.items():
        if value.dtype == torch.float16:
            value = value.float()
        if key.startswith(_HEAD_COPIES):
            copies[key.removeprefix("transformer.decoder.")] = value
        elif not key.endswith("num_batches_tracked"):
            out[_renamed(key, RENAMES)] = value
    for key, value in copies.items():
        if key in out and not torch.equal(out[key], value):
            raise ValueError(f"checkpoint's transformer.decoder.{key} differs from {key}; "
                             "upstream shares these heads, so the file is inconsistent")
    return out


def ours_to_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our keys renamed to the authors' (the inverse of `official_to_ours`), with the
    decoder's second references to the heads (two-stage: class heads as well)."""
    out = {_renamed(k, [(new, old) for old, new in RENAMES]): v for k, v in state.items()}
    two_stage = any(k.startswith("transformer.selection.") for k in state)
    for key, value in state.items():
        if key.startswith("bbox_embed.") or (two_stage and key.startswith("class_embed.")):
            out["transformer.decoder." + key] = value
    return out


def _count(state: dict[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_config(state: dict[str, Tensor], args: dict[str, Any] | None = None,
                 **overrides: Any) -> DabDeformableDetrConfig:
    """A DabDeformableDetrConfig from our-named keys and shapes, plus the authors' args for
    what the weights cannot tell (heads count, dilation, query count with two-stage);
    `overrides` win over both."""
    args = args or {}
    sd = state
    enc = "transformer.encoder.layers.0.self_attn."
    dec = "transformer.decoder.layers.0.cross_attn."
    nheads = int(overrides.get("nheads", args.get("nheads", 8)))
    levels = sd["transformer.level_embed"].shape[0]
    values: dict[str, Any] = {
        "backbone": args.get("backbone") or infer_backbone(sd),
        "dilation": bool(args.get("dilation", False)),
        "hidden_dim": sd["transformer.level_embed"].shape[1],
        "nheads": nheads,
        "enc_layers": _count(sd, r"transformer\.encoder\.layers\.(\d+)\."),
        "dec_layers": _count(sd, r"transformer\.decoder\.layers\.(\d+)\."),
        "dim_feedforward": sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        "dropout": float(args.get("dropout", 0.0)),
        "num_feature_levels": levels,
        "enc_n_points": sd[enc + "attention_weights.weight"].shape[0] // (nheads * levels),
        "dec_n_points": sd[dec + "attention_weights.weight"].shape[0] // (nheads * levels),
        "two_stage": "transformer.selection.enc_output.weight" in sd,
        "random_refpoints_xy": bool(args.get("random_refpoints_xy", False)),
        "num_classes": sd["class_embed.0.weight"].shape[0],
        "aux_loss": bool(args.get("aux_loss", True)),
    }
    if "tgt_embed.weight" in sd:
        values["num_queries"] = sd["tgt_embed.weight"].shape[0]
    else:
        values["num_queries"] = int(args.get("num_queries", 300))
    if "patterns_embed.weight" in sd:
        values["num_patterns"] = sd["patterns_embed.weight"].shape[0]
    values.update(overrides)
    return DabDeformableDetrConfig(**values)

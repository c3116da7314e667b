"""Typed model configuration. Defaults equal the published DAB-DETR-R50 configuration."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
ACTIVATIONS = ("prelu", "relu", "gelu")
QUERY_SCALE_TYPES = ("cond_elewise", "cond_scalar", "fix_elewise")
POSITION_EMBEDDINGS = ("sine", "learned")
BACKBONE_NORMS = ("frozen", "batch")
RETURN_LAYERS = ("layer2", "layer3", "layer4")


def check_dilation(dilation: bool, return_layer: str) -> None:
    """DC5 dilates layer4, so a backbone truncated before it cannot take it: ValueError."""
    if dilation and return_layer != "layer4":
        raise ValueError(
            f"dilation (DC5) applies to layer4; it cannot be used with {return_layer} output")


@dataclass
class DabDetrConfig:
    """Everything that defines a DAB-DETR network (not how it is trained).

    The defaults reproduce the authors' DAB-DETR-R50 (`main.py` defaults): 300 queries,
    6 + 6 layers, PReLU, image position temperatures 20/20, query sine temperature 10000,
    91 classes (the COCO category-id layout), auxiliary outputs on.
    """

    # backbone
    backbone: str = "resnet50"
    dilation: bool = False  # DC5: layer4 with dilation instead of stride (stride 16 output)
    backbone_norm: str = "frozen"  # "frozen" (FrozenBatchNorm2d, upstream) | "batch" (trainable BN)
    backbone_return_layer: str = "layer4"  # "layer3" truncates the ResNet (a light CPU model)
    backbone_trainable_layers: int = 3  # upstream trains layer2..4; stem and layer1 stay frozen
    # transformer
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    activation: str = "prelu"
    pre_norm: bool = False  # upstream: only adds a final encoder LayerNorm
    # image position embedding
    position_embedding: str = "sine"
    pe_temperature_h: float = 20.0
    pe_temperature_w: float = 20.0
    # anchor-box queries
    num_queries: int = 300
    num_patterns: int = 0
    query_pe_temperature: float = 10000.0  # hard-coded upstream; the paper's text says 20
    random_refpoints_xy: bool = False  # "fixxy": x, y drawn uniform(0, 1)
    freeze_refpoints_xy: bool = True  # with random_refpoints_xy: really freeze x, y (upstream didn't)
    modulate_hw_attn: bool = True
    keep_query_pos: bool = False
    query_scale_type: str = "cond_elewise"
    bbox_embed_diff_each_layer: bool = False
    iter_update: bool = True  # iterative box refinement through the decoder
    inverse_sigmoid_eps: float = 1e-3  # 1e-3 upstream, 1e-5 in transformers
    aux_loss: bool = True
    # Denoising queries (DN-DETR), training only: groups of noised ground-truth boxes fed to the
    # decoder (0 = off). Adds a label embedding; inference is unchanged.
    dn_groups: int = 0
    dn_label_noise: float = 0.2
    dn_box_noise: float = 0.4
    # Query selection ("two-stage", as in Deformable DETR / DINO): every encoder cell predicts a
    # class and a box around its own centre (trained by its own Hungarian loss, `loss_*_enc`);
    # the decoder's anchors are the num_queries best of those boxes, per image, instead of the
    # learned anchors. Content queries stay as in DAB-DETR (zeros, or the pattern embeddings).
    two_stage: bool = False
    two_stage_proposal_size: float = 0.1  # w and h of each cell's proposal before regression
    # Batching policy: upstream runs the backbone on the zero-padded batch, so convolutions near
    # the bottom/right edge see the padding and an image's detections depend on its batch mates.
    # True runs the backbone on each image's unpadded extent (same-size images together) and
    # masks whole feature cells: every image gets exactly its single-image result.
    pad_invariant: bool = False
    # heads
    num_classes: int = 91  # logits per query; 91 = COCO category ids 0..90 (0 unused)
    id2label: dict[int, str] = field(default_factory=dict)  # class index -> name
    class_to_category: list[int] | None = None  # class index -> dataset category id (None: same)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def check(name: str, value: Any, allowed: tuple) -> None:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")

        check("backbone", self.backbone, BACKBONES)
        check("activation", self.activation, ACTIVATIONS)
        check("query_scale_type", self.query_scale_type, QUERY_SCALE_TYPES)
        check("position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        check("backbone_norm", self.backbone_norm, BACKBONE_NORMS)
        check("backbone_return_layer", self.backbone_return_layer, RETURN_LAYERS)
        check_dilation(self.dilation, self.backbone_return_layer)
        if self.hidden_dim <= 0 or self.nheads <= 0 or self.hidden_dim % self.nheads:
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be a positive multiple of nheads ({self.nheads})"
            )
        if self.hidden_dim % 4:
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by 4: the 2-D sine position "
                "embedding splits it into sin/cos pairs for y and x"
            )
        for name in ("enc_layers", "num_queries", "num_classes", "dim_feedforward"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dec_layers <= 0:
            raise ValueError(f"dec_layers must be positive, got {self.dec_layers}")
        if self.num_patterns < 0:
            raise ValueError(f"num_patterns must be >= 0, got {self.num_patterns}")
        if not 0.0 < self.two_stage_proposal_size < 1.0:
            raise ValueError(
                f"two_stage_proposal_size must be in (0, 1), got {self.two_stage_proposal_size}"
            )
        if not 0 <= self.backbone_trainable_layers <= 5:
            raise ValueError("backbone_trainable_layers must be in 0..5")
        if self.class_to_category is not None and len(self.class_to_category) != self.num_classes:
            raise ValueError(
                f"class_to_category has {len(self.class_to_category)} entries but num_classes is "
                f"{self.num_classes}"
            )
        # JSON turns int keys into strings; accept both.
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    @property
    def total_queries(self) -> int:
        """Number of predictions per image (num_queries x max(1, num_patterns))."""
        return self.num_queries * max(1, self.num_patterns)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DabDetrConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DabDetrConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def replace(self, **overrides: Any) -> DabDetrConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown config overrides {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def label_name(self, class_index: int) -> str:
        return self.id2label.get(class_index, f"class_{class_index}")

    def category_id(self, class_index: int) -> int:
        if self.class_to_category is None:
            return class_index
        return self.class_to_category[class_index]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> dict; values parsed as JSON when possible (true, 3, 0.5)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out

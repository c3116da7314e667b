"""Typed model configuration. Defaults equal the published DAB-DETR-R50 configuration."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
ACTIVATIONS = ("prelu", "relu", "gelu")
QUERY_SCALE_TYPES = ("cond_elewise", "cond_scalar", "fix_elewise")
POSITION_EMBEDDINGS = ("sine", "learned")
BACKBONE_NORMS = ("frozen", "batch")
RETURN_LAYERS = ("layer2", "layer3", "layer4")
QUERY_TYPES = ("dab", "anchor2d", "detr")


def check_dilation(dilation: bool, return_layer: str) -> None:
    """DC5 dilates layer4, so a backbone truncated before it cannot take it: ValueError."""
    if dilation and return_layer != "layer4":
        raise ValueError(
            f"dilation (DC5) applies to layer4; it cannot be used with {return_layer} output")


# The JSON types a stored config may hold per field, beyond those of the field's default.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id2label": (dict,), "class_to_category": (list, type(None)),
    "eval_max_size": (int, type(None)),
    "modulate_hw_attn": (bool, type(None)), "iter_update": (bool, type(None)),
}


def check_field_type(name: str, value: Any, config_class: type | None = None) -> None:
    """ValueError if `value` cannot be the field `name` of `config_class` (default
    DabDetrConfig), as read from JSON."""
    default = (config_class or DabDetrConfig).__dataclass_fields__[name].default
    allowed = _FIELD_TYPES.get(name) or (
        (int, float) if isinstance(default, float) else (type(default),))
    wrong_bool = isinstance(value, bool) and bool not in allowed
    if wrong_bool or not isinstance(value, allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"model config field {name!r} must be {names}, got "
                         f"{type(value).__name__} {value!r:.60}; fix config.json")
    if name == "id2label" and not all(isinstance(v, str) for v in value.values()):
        raise ValueError("model config field 'id2label' must map class indices to names")
    if name == "class_to_category" and value is not None and not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError("model config field 'class_to_category' must be a list of integers")


def resolve_eval_resize(config: DabDetrConfig, size: int | None = None,
                        max_size: int | None = None) -> tuple[int, int | None]:
    """(short side, long-side cap or None) for evaluation/inference of a model.

    Without `size`: the model's own eval_size/eval_max_size. With `size` only: the model's
    cap scaled by size / eval_size (the official 800/1333 ratio for published weights).
    `max_size` 0 means no cap.
    """
    if size is None:
        size = config.eval_size
        cap = config.eval_max_size if max_size is None else max_size
    elif max_size is None:
        cap = (None if config.eval_max_size is None
               else max(size, round(config.eval_max_size * size / config.eval_size)))
    else:
        cap = max_size
    return size, (cap or None)


class _ConfigMethods:
    """What the model configs share: plain-dict round trips, checked replacement, and the
    class index -> name / dataset category id maps."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The config from its `to_dict` form; ValueError naming a field that is unknown or
        has a value of the wrong type."""
        if not isinstance(data, dict):
            raise ValueError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: "
                             f"{sorted(known)}")
        for name, value in data.items():
            check_field_type(name, value, cls)
        return cls(**data)

    def replace(self, **overrides: Any):
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


@dataclass
class DabDetrConfig(_ConfigMethods):
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
    # Decoder queries. query_type says what the positional part of a query is:
    #   "dab": a learned 4-D anchor box (x, y, w, h), embedded by its sine (DAB-DETR);
    #   "anchor2d": a learned 2-D point (x, y), embedded by its sine (Conditional / Anchor DETR);
    #     boxes are predicted around it from a neutral size (w = h = 0.5, logit 0);
    #   "detr": a learned d-dim vector, no anchor; boxes are sigmoid(bbox_embed(hs)) (DETR).
    # See models/transformer.py `Decoder` for how each enters the attention.
    query_type: str = "dab"
    num_queries: int = 300
    num_patterns: int = 0
    query_pe_temperature: float = 10000.0  # hard-coded upstream; the paper's text says 20
    random_refpoints_xy: bool = False  # "fixxy": x, y drawn uniform(0, 1)
    freeze_refpoints_xy: bool = True  # with random_refpoints_xy: really freeze x, y (upstream didn't)
    # width/height-modulated positional attention (needs anchor w, h: "dab" only).
    # None: the query type's default (on for "dab", off otherwise).
    modulate_hw_attn: bool | None = None
    keep_query_pos: bool = False
    query_scale_type: str = "cond_elewise"
    bbox_embed_diff_each_layer: bool = False
    # Anchors updated by every decoder layer's box prediction (True) or static (False).
    # None: the query type's default (on for "dab" and "anchor2d"; "detr" has no anchors).
    iter_update: bool | None = None
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
    # The resize the weights were trained and evaluated with: short side eval_size, long side
    # capped at eval_max_size (None: no cap). predict/evaluate use it unless told otherwise;
    # the published checkpoints' is 800/1333.
    eval_size: int = 800
    eval_max_size: int | None = 1333

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def check(name: str, value: Any, allowed: tuple) -> None:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")

        check("backbone", self.backbone, BACKBONES)
        check("query_type", self.query_type, QUERY_TYPES)
        self._check_query_options()
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
        if self.eval_size < 1 or (self.eval_max_size is not None and self.eval_max_size < 1):
            raise ValueError(f"eval_size ({self.eval_size}) and eval_max_size "
                             f"({self.eval_max_size}) must be positive")
        # JSON turns int keys into strings; accept both.
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    def _check_query_options(self) -> None:
        """Resolve the query-type defaults (None) and refuse options the query type cannot
        express: modulation needs anchor widths and heights, updating needs an anchor."""
        kind = self.query_type
        if self.modulate_hw_attn is None:
            self.modulate_hw_attn = kind == "dab"
        if self.iter_update is None:
            self.iter_update = kind != "detr"
        if kind == "dab":
            return
        what = "2-D anchor points (no width or height)" if kind == "anchor2d" else "no anchors"
        refused = []
        if self.modulate_hw_attn:
            refused.append("modulate_hw_attn=True (set modulate_hw_attn=False)")
        if kind == "detr" and self.iter_update:
            refused.append("iter_update=True (set iter_update=False)")
        if kind == "detr" and self.random_refpoints_xy:
            refused.append("random_refpoints_xy=True")
        if self.two_stage:
            refused.append("two_stage=True (query selection makes 4-D anchors: query_type='dab')")
        if self.dn_groups > 0:
            refused.append("dn_groups > 0 (denoising feeds 4-D boxes: query_type='dab')")
        if refused:
            raise ValueError(f"query_type={kind!r} has {what}, so it cannot take: "
                             + "; ".join(refused))

    @property
    def total_queries(self) -> int:
        """Number of predictions per image (num_queries x max(1, num_patterns))."""
        return self.num_queries * max(1, self.num_patterns)


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


@dataclass
class DabDeformableDetrConfig(_ConfigMethods):
    """Everything that defines a DAB-Deformable-DETR network (not how it is trained).

    The defaults are the authors' `main.py` defaults for `-m dab_deformable_detr` (their
    published R50-v2 model): ResNet-50 levels at strides 8, 16, 32 plus a stride-64 level,
    6 + 6 layers with FFN 2048 and ReLU, 8 heads and 4 sampling points per level, 300 queries,
    91 classes (the COCO category-id layout), box refinement in every layer, auxiliary outputs.
    """

    # backbone
    backbone: str = "resnet50"
    dilation: bool = False  # DC5: the last level at stride 16
    backbone_norm: str = "frozen"  # "frozen" (FrozenBatchNorm2d, upstream) | "batch"
    backbone_trainable_layers: int = 3  # upstream trains layer2..4
    # transformer
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    num_feature_levels: int = 4  # up to 3 from the backbone, the rest strided 3x3 convs
    enc_n_points: int = 4
    dec_n_points: int = 4
    # queries
    num_queries: int = 300
    num_patterns: int = 0
    random_refpoints_xy: bool = False  # x, y of the anchors drawn uniform(0, 1)
    freeze_refpoints_xy: bool = True  # with random_refpoints_xy: really freeze x, y
    two_stage: bool = False  # anchors and content from the top encoder proposals
    inverse_sigmoid_eps: float = 1e-3
    aux_loss: bool = True
    # heads
    num_classes: int = 91
    id2label: dict[int, str] = field(default_factory=dict)
    class_to_category: list[int] | None = None
    # the resize the weights were trained and evaluated with (see DabDetrConfig)
    eval_size: int = 800
    eval_max_size: int | None = 1333

    model_type: ClassVar[str] = "dab-deformable-detr"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} is not supported; choose one of {BACKBONES}")
        if self.backbone_norm not in BACKBONE_NORMS:
            raise ValueError(f"backbone_norm={self.backbone_norm!r}: choose one of {BACKBONE_NORMS}")
        if self.hidden_dim <= 0 or self.hidden_dim % 32 or self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be a positive multiple of 32 "
                             f"(GroupNorm's 32 groups) and of nheads ({self.nheads})")
        for name in ("enc_layers", "dec_layers", "dim_feedforward", "num_queries", "num_classes",
                     "num_feature_levels", "enc_n_points", "dec_n_points"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_patterns < 0:
            raise ValueError(f"num_patterns must be >= 0, got {self.num_patterns}")
        if self.two_stage and self.num_patterns:
            raise ValueError("two_stage selects its own queries: set num_patterns=0 with it")
        if not 0 <= self.backbone_trainable_layers <= 5:
            raise ValueError("backbone_trainable_layers must be in 0..5")
        if self.class_to_category is not None and len(self.class_to_category) != self.num_classes:
            raise ValueError(f"class_to_category has {len(self.class_to_category)} entries but "
                             f"num_classes is {self.num_classes}")
        if self.eval_size < 1 or (self.eval_max_size is not None and self.eval_max_size < 1):
            raise ValueError(f"eval_size ({self.eval_size}) and eval_max_size "
                             f"({self.eval_max_size}) must be positive")
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    @property
    def total_queries(self) -> int:
        """Predictions per image (num_queries x max(1, num_patterns))."""
        return self.num_queries * max(1, self.num_patterns)

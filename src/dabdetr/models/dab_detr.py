"""The DAB-DETR detector: backbone -> encoder -> anchor-box decoder -> heads."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dabdetr.config import DabDetrConfig
from dabdetr.models.backbone import Backbone
from dabdetr.models.box_ops import box_precision, inverse_sigmoid
from dabdetr.models.denoising import build_denoising_queries
from dabdetr.models.outputs import DetectionOutput
from dabdetr.models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSineHW
from dabdetr.models.transformer import MLP, Transformer


class AnchorQueries(nn.Module):
    """The learned anchors, [Q, dims] in logit space, as `weight`: boxes (x, y, w, h) for
    dims=4 ("dab"), points (x, y) for dims=2 ("anchor2d").

    With `random_refpoints_xy` ("fixxy") x and y start uniform in (0, 1). Upstream meant to
    freeze them but its freeze was a no-op; here `freeze_xy=True` really freezes them: x, y are
    a buffer, so neither gradients nor weight decay move them, while w, h stay trainable.
    The state dict always shows one `weight` [Q, dims], so checkpoints are interchangeable.
    """

    def __init__(self, num_queries: int, random_xy: bool, freeze_xy: bool, eps: float = 1e-3,
                 dims: int = 4):
        super().__init__()
        weight = torch.randn(num_queries, dims)  # nn.Embedding's N(0, 1) init
        if random_xy:
            weight[:, :2] = inverse_sigmoid(torch.rand(num_queries, 2), eps)
        self.frozen_xy = random_xy and freeze_xy
        if self.frozen_xy:
            self.register_buffer("xy", weight[:, :2].clone())
            self.wh = nn.Parameter(weight[:, 2:].clone()) if dims == 4 else None
        else:
            self.full = nn.Parameter(weight)
        self.register_state_dict_post_hook(_anchor_state_dict_hook)
        self.register_load_state_dict_pre_hook(_anchor_load_hook)

    @property
    def weight(self) -> Tensor:
        if not self.frozen_xy:
            return self.full
        if self.wh is None:
            return self.xy
        return torch.cat([self.xy, self.wh], dim=1)


def _anchor_state_dict_hook(module: AnchorQueries, state_dict: dict, prefix: str, local_metadata):
    if module.frozen_xy:
        xy = state_dict.pop(prefix + "xy")
        wh = state_dict.pop(prefix + "wh", xy[:, :0])
        state_dict[prefix + "weight"] = torch.cat([xy, wh], dim=1)
    else:
        state_dict[prefix + "weight"] = state_dict.pop(prefix + "full")


def _anchor_load_hook(module: AnchorQueries, state_dict: dict, prefix: str, *args) -> None:
    key = prefix + "weight"
    if key not in state_dict:
        return
    weight = state_dict.pop(key)
    if module.frozen_xy and weight.dim() == 2 and weight.shape[-1] in (2, 4):
        state_dict[prefix + "xy"] = weight[:, :2]
        if weight.shape[-1] == 4:
            state_dict[prefix + "wh"] = weight[:, 2:]
    else:
        state_dict[prefix + "full"] = weight


def _flatten_maps(src: Tensor, pos: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[B, d, h, w] maps and [B, h, w] mask -> [B, S, d], [B, S, d], [B, S] (row-major cells)."""
    return src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2), mask.flatten(1)


class QuerySelection(nn.Module):
    """Two-stage query selection on the encoder output (Deformable DETR / DINO style).

    Every feature cell proposes a box centred on itself with side `two_stage_proposal_size`;
    a class head and a box-delta head on the (projected) encoder output score and refine the
    proposals. The `num_queries` best-scoring refined boxes of each image (detached) become its
    decoder anchors. Padded cells never win against a real cell; when an image has fewer real
    cells than queries, the remaining anchors are centred boxes of the proposal size.
    """

    def __init__(self, config: DabDetrConfig):
        super().__init__()
        d = config.hidden_dim
        self.num_queries = config.num_queries
        self.proposal_size = config.two_stage_proposal_size
        self.eps = config.inverse_sigmoid_eps
        self.output = nn.Linear(d, d)
        self.output_norm = nn.LayerNorm(d)
        self.class_embed = nn.Linear(d, config.num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def proposals(self, mask: Tensor, height: int, width: int) -> Tensor:
        """[B, S, 4] normalized cxcywh proposals, cell centres relative to each image's
        unpadded extent (mask: [B, S] bool, True on padding, S = height * width)."""
        valid = ~mask.view(-1, height, width)
        valid_h = valid[:, :, 0].sum(1).clamp(min=1).to(torch.float32)
        valid_w = valid[:, 0, :].sum(1).clamp(min=1).to(torch.float32)
        ys = torch.arange(height, device=mask.device, dtype=torch.float32) + 0.5
        xs = torch.arange(width, device=mask.device, dtype=torch.float32) + 0.5
        cy = (ys[None, :, None] / valid_h[:, None, None]).expand(-1, height, width)
        cx = (xs[None, None, :] / valid_w[:, None, None]).expand(-1, height, width)
        side = torch.full_like(cx, self.proposal_size)
        return torch.stack([cx, cy, side, side], dim=-1).flatten(1, 2)

    def forward(self, memory: Tensor, mask: Tensor, height: int, width: int
                ) -> tuple[DetectionOutput, Tensor]:
        """Returns the per-cell predictions ([B, S, C] logits, [B, S, 4] boxes; trained by the
        criterion as `enc_outputs`) and the selected anchors [B, num_queries, 4] in logit
        space (detached)."""
        box_dtype = box_precision(memory).dtype  # float32 under autocast
        proposals = self.proposals(mask, height, width).to(box_dtype)
        # padded cells, and cells whose centre falls outside the image, never propose
        invalid = mask | (proposals[..., :2] >= 1.0).any(-1)
        features = self.output_norm(self.output(memory.masked_fill(invalid[..., None], 0.0)))
        logits = box_precision(self.class_embed(features)).masked_fill(invalid[..., None], -1e4)
        inv_proposals = inverse_sigmoid(proposals.clamp(max=1.0), self.eps)
        boxes_unsig = self.bbox_embed(features) + inv_proposals
        enc_outputs = DetectionOutput(logits, boxes_unsig.sigmoid())

        num_cells = logits.shape[1]
        k = min(self.num_queries, num_cells)
        scores = logits.detach().amax(-1)
        top = scores.topk(k, dim=1).indices  # (B, k)
        anchors = boxes_unsig.detach().gather(1, top[..., None].expand(-1, -1, 4))
        # (0.5, 0.5, size, size) filled on the device: no host-to-device copy, which a CUDA
        # graph capture (dabdetr.optimize.CUDAGraphed) would refuse
        default = torch.full((4,), self.proposal_size, device=memory.device, dtype=box_dtype)
        default[:2] = 0.5
        default = inverse_sigmoid(default, self.eps)
        chosen_invalid = invalid.gather(1, top)[..., None]
        anchors = torch.where(chosen_invalid, default, anchors)
        if k < self.num_queries:
            fill = default.expand(anchors.shape[0], self.num_queries - k, 4)
            anchors = torch.cat([anchors, fill], dim=1)
        return enc_outputs, anchors


class DabDetr(nn.Module):
    """DAB-DETR (Liu et al., ICLR 2022).

    forward(images, mask) -> DetectionOutput:
        images: [B, 3, H, W] float, normalized with ImageNet mean/std, zero-padded bottom/right
            (see `dabdetr.batch_images`). Not modified.
        mask: [B, H, W] bool, True on padding; None means no padding.
        Returns pred_logits [B, N, C], pred_boxes [B, N, 4] normalized cxcywh relative to each
        image's unpadded size, and aux_outputs for decoder layers 0..L-2 (when aux_loss is on),
        with N = num_queries * max(1, num_patterns).

    By default a padded batch is computed exactly as upstream (the backbone sees the padding,
    so an image's result depends slightly on its batch mates); config.pad_invariant=True gives
    every image exactly its single-image result.

    config.query_type picks the decoder's positional queries: learned 4-D anchor boxes
    ("dab", the default), learned 2-D points ("anchor2d"), or learned d-dim vectors without
    anchors ("detr"); `dabdetr.models.transformer.Decoder` says how each enters the attention.

    Under torch.autocast, outputs, anchors and boxes stay float32.
    """

    def __init__(self, config: DabDetrConfig | None = None):
        super().__init__()
        config = config or DabDetrConfig()
        self.config = config
        d = config.hidden_dim
        self.backbone = Backbone(
            config.backbone,
            dilation=config.dilation,
            norm=config.backbone_norm,
            return_layer=config.backbone_return_layer,
            trainable_layers=config.backbone_trainable_layers,
        )
        if config.position_embedding == "sine":
            self.position_embedding: nn.Module = PositionEmbeddingSineHW(
                d, config.pe_temperature_h, config.pe_temperature_w
            )
        else:
            self.position_embedding = PositionEmbeddingLearned(d)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, kernel_size=1)
        self.transformer = Transformer(
            d, config.nheads, config.enc_layers, config.dec_layers, config.dim_feedforward,
            config.dropout, config.activation, config.pre_norm, config.num_patterns,
            config.query_scale_type, config.modulate_hw_attn, config.keep_query_pos,
            config.query_pe_temperature, config.inverse_sigmoid_eps, config.query_type,
        )
        # learned anchors (replaced by the selected encoder proposals with query selection)
        self.refpoint_embed = None
        if not config.two_stage and config.query_type != "detr":
            self.refpoint_embed = AnchorQueries(
                config.num_queries, config.random_refpoints_xy, config.freeze_refpoints_xy,
                config.inverse_sigmoid_eps, dims=4 if config.query_type == "dab" else 2,
            )
        # DETR's learned positional queries (N(0, 1), nn.Embedding's init, as DETR)
        self.query_embed = None
        if config.query_type == "detr":
            self.query_embed = nn.Embedding(config.num_queries, d)
        self.class_embed = nn.Linear(d, config.num_classes)
        if config.bbox_embed_diff_each_layer:
            self.bbox_embed: nn.Module = nn.ModuleList(
                MLP(d, d, 4, 3) for _ in range(config.dec_layers)
            )
        else:
            self.bbox_embed = MLP(d, d, 4, 3)
        # DN-DETR: content embedding of the (noised) labels of the denoising queries
        self.label_enc = nn.Embedding(config.num_classes, d) if config.dn_groups > 0 else None
        # Query selection: per-cell proposal heads on the encoder output
        self.query_selection = QuerySelection(config) if config.two_stage else None
        self.reset_head_parameters()

    def reset_head_parameters(self) -> None:
        """Upstream init of the heads: class bias for a 1% prior, last box layer zero (the
        first boxes are the anchors). A "detr" model has no anchor to start from: its box head
        keeps nn.Linear's init, as DETR's."""
        prior_prob = 0.01
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        if self.config.query_type == "detr":
            return
        heads = self.bbox_embed if isinstance(self.bbox_embed, nn.ModuleList) else [self.bbox_embed]
        for head in heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    def encode_image(self, images: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone + projection: returns src [B, S, d], pos [B, S, d], mask [B, S] (True pad)
        with S = h * w feature cells (row-major)."""
        return _flatten_maps(*self.feature_maps(images, mask))

    def feature_maps(self, images: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """encode_image before flattening: src [B, d, h, w], pos [B, d, h, w], mask [B, h, w]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool,
                               device=images.device)
        elif mask.shape != (images.shape[0], *images.shape[2:]) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape {(images.shape[0], *images.shape[2:])}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        features, feat_mask = self.backbone(images, mask, self.config.pad_invariant)
        pos = self.position_embedding(feat_mask).to(features.dtype)
        return self.input_proj(features), pos, feat_mask

    def forward(self, images: Tensor, mask: Tensor | None = None,
                targets: list[dict[str, Tensor]] | None = None) -> DetectionOutput:
        """`targets` (normalized cxcywh `boxes`, `labels`) are only read in training with
        denoising on (config.dn_groups > 0); they never change the matching queries' output."""
        src, pos, feat_mask = self.feature_maps(images, mask)
        height, width = feat_mask.shape[-2:]
        src, pos, feat_mask = _flatten_maps(src, pos, feat_mask)
        bbox_embed = self.bbox_embed if self.config.iter_update else None
        cfg = self.config
        dn = None
        if self.training and self.label_enc is not None and targets is not None:
            dn = build_denoising_queries(targets, self.label_enc, cfg.total_queries,
                                         cfg.dn_groups, cfg.dn_label_noise, cfg.dn_box_noise,
                                         cfg.inverse_sigmoid_eps)
        memory = self.transformer.encode(src, pos, feat_mask)
        enc_outputs = None
        if self.query_selection is not None:
            enc_outputs, queries = self.query_selection(memory, feat_mask, height, width)
        elif self.query_embed is not None:
            queries = self.query_embed.weight
        else:
            queries = self.refpoint_embed.weight
        extra = None if dn is None else (dn.content, dn.anchors)
        hs, references = self.transformer.decode(
            memory, pos, feat_mask, queries, bbox_embed, extra_queries=extra,
            self_attn_mask=None if dn is None else dn.attn_mask,
        )
        if dn is None:
            out = self.heads(hs, references)
        else:
            split = dn.content.shape[1]
            out = self.heads(hs[:, :, split:], references[:, :, split:])
            out.dn_outputs = self.heads(hs[:, :, :split], references[:, :, :split])
            out.dn_meta = dn.meta
        out.enc_outputs = enc_outputs
        return out

    def heads(self, hs: Tensor, references: Tensor | None) -> DetectionOutput:
        """Class and box heads on every decoder layer.

        hs: [L, B, N, d] normed decoder outputs; references: [L, B, N, 4] (or [1, B, N, 4]
        without iterative refinement) normalized cxcywh anchors, or None ("detr"). Boxes are
        sigmoid(bbox_embed(hs_l) + inverse_sigmoid(ref_l)), or sigmoid(bbox_embed(hs_l)).
        """
        logits = box_precision(self.class_embed(hs))  # (L, B, N, C); float32 under autocast
        if isinstance(self.bbox_embed, nn.ModuleList):
            deltas = torch.stack([head(h) for head, h in zip(self.bbox_embed, hs, strict=True)])
        else:
            deltas = self.bbox_embed(hs)
        if references is None:  # "detr": no anchors
            boxes = box_precision(deltas).sigmoid()
        else:
            inv_ref = inverse_sigmoid(references, self.config.inverse_sigmoid_eps)
            boxes = (deltas + inv_ref).sigmoid()  # (L, B, N, 4) normalized cxcywh
        aux = []
        if self.config.aux_loss:
            aux = [DetectionOutput(logits[i], boxes[i]) for i in range(hs.shape[0] - 1)]
        return DetectionOutput(logits[-1], boxes[-1], aux)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

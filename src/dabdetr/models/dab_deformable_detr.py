"""DAB-Deformable-DETR: multi-level ResNet -> deformable encoder -> DAB anchor decoder -> heads.

The authors' second model (IDEA-Research/DAB-DETR, `-m dab_deformable_detr`): Deformable DETR
with box refinement in every layer and DAB queries (a learned content vector and a learned 4-D
anchor per query).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from dabdetr.config import DabDeformableDetrConfig
from dabdetr.models.backbone import Backbone, resize_mask
from dabdetr.models.box_ops import box_precision
from dabdetr.models.dab_detr import AnchorQueries
from dabdetr.models.deformable_transformer import DeformableTransformer, MultiScaleInput
from dabdetr.models.outputs import DetectionOutput
from dabdetr.models.position_encoding import PositionEmbeddingSineCentered
from dabdetr.models.transformer import MLP

_STAGES = ("layer2", "layer3", "layer4")  # strides 8, 16, 32


def _stage_channels(backbone: Backbone, stages: tuple[str, ...]) -> list[int]:
    """Output channels of the named ResNet stages (their last block's last conv)."""
    channels = []
    for stage in stages:
        block = getattr(backbone.body, stage)[-1]
        channels.append((block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels)
    return channels


class DabDeformableDetr(nn.Module):
    """DAB-Deformable-DETR (Liu et al., ICLR 2022, on Zhu et al.'s Deformable DETR).

    forward(images, mask) -> DetectionOutput:
        images: [B, 3, H, W] float, ImageNet-normalized, zero-padded bottom/right (see
            `dabdetr.batch_images`). Not modified.
        mask: [B, H, W] bool, True on padding; None means no padding.
        Returns pred_logits [B, N, C], pred_boxes [B, N, 4] normalized cxcywh relative to each
        image's unpadded size, aux_outputs for decoder layers 0..Ld-2 (when aux_loss is on) and,
        with two_stage, enc_outputs ([B, S, C] logits, [B, S, 4] boxes per encoder cell);
        N = num_queries * max(1, num_patterns).

    As upstream, an image's result depends on its batch mates' padding (the valid ratios enter
    every sampling location).
    """

    def __init__(self, config: DabDeformableDetrConfig | None = None):
        super().__init__()
        config = config or DabDeformableDetrConfig()
        self.config = config
        d = config.hidden_dim
        self.backbone = Backbone(config.backbone, dilation=config.dilation,
                                 norm=config.backbone_norm, return_layer="layer4",
                                 trainable_layers=config.backbone_trainable_layers)
        self.stages = _STAGES[-min(config.num_feature_levels, len(_STAGES)):]
        self.position_embedding = PositionEmbeddingSineCentered(d)
        self.input_proj = self._input_projections(config)
        self.transformer = DeformableTransformer(
            d, config.nheads, config.enc_layers, config.dec_layers, config.dim_feedforward,
            config.dropout, config.num_feature_levels, config.enc_n_points, config.dec_n_points,
            config.two_stage, config.num_queries, config.inverse_sigmoid_eps)
        if not config.two_stage:
            self.tgt_embed = nn.Embedding(config.num_queries, d)
            self.refpoint_embed = AnchorQueries(config.num_queries, config.random_refpoints_xy,
                                                config.freeze_refpoints_xy,
                                                config.inverse_sigmoid_eps)
        if config.num_patterns > 0:
            self.patterns_embed = nn.Embedding(config.num_patterns, d)
        # one class and box head per decoder layer (+ one scoring the two-stage proposals)
        num_heads = config.dec_layers + int(config.two_stage)
        self.class_embed = _clones(nn.Linear(d, config.num_classes), num_heads)
        self.bbox_embed = _clones(MLP(d, d, 4, 3), num_heads)
        self.reset_head_parameters()

    def _input_projections(self, config: DabDeformableDetrConfig) -> nn.ModuleList:
        """1x1 conv + GroupNorm per backbone level; each extra level a 3x3 stride-2 conv +
        GroupNorm, the first on the raw last stage, the next ones on the previous level."""
        d = config.hidden_dim
        layers = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d))
                  for c in _stage_channels(self.backbone, self.stages)]
        in_channels = _stage_channels(self.backbone, ("layer4",))[0]
        for _ in range(config.num_feature_levels - len(self.stages)):
            layers.append(nn.Sequential(
                nn.Conv2d(in_channels, d, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(32, d)))
            in_channels = d
        for proj in layers:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        return nn.ModuleList(layers)

    def reset_head_parameters(self) -> None:
        """Upstream: every layer's heads start as copies of one (class bias for a 1% prior,
        last box layer zero); box head 0 starts with small boxes (w, h bias -2) unless
        two-stage proposals give the size."""
        nn.init.constant_(self.class_embed[0].bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.bbox_embed[0].layers[-1].weight)
        nn.init.zeros_(self.bbox_embed[0].layers[-1].bias)
        with torch.no_grad():
            for heads in (self.class_embed, self.bbox_embed):
                for head in heads[1:]:
                    for dst, src in zip(head.parameters(), heads[0].parameters(), strict=True):
                        dst.copy_(src)
        if not self.config.two_stage:
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    def backbone_levels(self, images: Tensor) -> list[Tensor]:
        """ResNet stage outputs [B, C_l, H/s_l, W/s_l] for `self.stages`, then layer4's output
        again last (the extra levels' input)."""
        return self.backbone.stage_outputs(images, (*self.stages, "layer4"))

    def multi_scale_input(self, images: Tensor, mask: Tensor) -> MultiScaleInput:
        """Projected levels with their masks and position + level embeddings, flattened."""
        *features, last = self.backbone_levels(images)
        srcs, masks = [], []
        for proj, feat in zip(self.input_proj, features, strict=False):
            srcs.append(proj(feat))
            masks.append(resize_mask(mask, feat.shape[-2:]))
        for proj in list(self.input_proj)[len(features):]:
            srcs.append(proj(last if len(srcs) == len(features) else srcs[-1]))
            masks.append(resize_mask(mask, srcs[-1].shape[-2:]))  # from the image mask
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks, strict=True)]
        return self.transformer.flatten(srcs, masks, pos)

    def queries(self, batch: int) -> tuple[Tensor, Tensor]:
        """Learned content [B, N, d] and anchors [B, N, 4] normalized cxcywh. With P patterns,
        query p * Q + q has content tgt[q] + pattern[p] and anchor q."""
        content = self.tgt_embed.weight
        anchors = self.refpoint_embed.weight
        patterns = self.config.num_patterns
        if patterns > 0:
            num_queries = content.shape[0]
            content = content.repeat(patterns, 1) + self.patterns_embed.weight.repeat_interleave(
                num_queries, dim=0)
            anchors = anchors.repeat(patterns, 1)
        return (content[None].expand(batch, -1, -1),
                anchors.sigmoid()[None].expand(batch, -1, -1))

    def forward(self, images: Tensor, mask: Tensor | None = None,
                targets: list[dict[str, Tensor]] | None = None) -> DetectionOutput:
        """`targets` are not read: this variant has no denoising queries. The parameter lets
        the training engine call both model families alike."""
        mask = self._checked_mask(images, mask)
        inputs = self.multi_scale_input(images, mask)
        memory = self.transformer.encode(inputs)
        enc_outputs = None
        if self.transformer.selection is not None:
            content, anchors, cell_logits, cell_boxes = self.transformer.selection(
                memory, self.class_embed[-1], self.bbox_embed[-1])
            enc_outputs = DetectionOutput(cell_logits, cell_boxes)
        else:
            content, anchors = self.queries(images.shape[0])
        hs, boxes = self.transformer.decoder(content, anchors, memory, self.bbox_embed)
        # float32 logits under autocast, as DabDetr's (the criterion's focal loss needs them)
        logits = box_precision(torch.stack(
            [head(h) for head, h in zip(self.class_embed, hs, strict=False)]))
        aux = []
        if self.config.aux_loss:
            aux = [DetectionOutput(logits[i], boxes[i]) for i in range(hs.shape[0] - 1)]
        return DetectionOutput(logits[-1], boxes[-1], aux, enc_outputs=enc_outputs)

    @staticmethod
    def _checked_mask(images: Tensor, mask: Tensor | None) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        expected = (images.shape[0], *images.shape[2:])
        if mask is None:
            return torch.zeros(expected, dtype=torch.bool, device=images.device)
        if mask.shape != expected or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {expected}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        return mask

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _clones(module: nn.Module, count: int) -> nn.ModuleList:
    """`count` independent deep copies of `module`."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(count))

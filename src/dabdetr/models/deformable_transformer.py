"""The DAB-Deformable-DETR transformer: a deformable encoder over all feature levels and a
decoder whose queries are learned content vectors plus learned 4-D anchor boxes.

Batch-first throughout: sequences are [B, N, d]. Parameter names follow the authors' code
(`transformer.encoder.layers.N.self_attn.sampling_offsets`, ...), so their checkpoints load
without renames. Notation: S = sum_l H_l * W_l cells of L levels, Q queries.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dabdetr.models.box_ops import inverse_sigmoid
from dabdetr.models.deformable_attention import MSDeformAttn, level_sizes
from dabdetr.models.position_encoding import anchor_sine_embedding, proposal_sine_embedding
from dabdetr.models.transformer import MLP


@dataclass
class MultiScaleInput:
    """All feature levels flattened and concatenated (the encoder's and decoder's memory input).

    src: [B, S, d] features; pos: [B, S, d] position + level embedding; mask: [B, S] bool, True
    on padding; spatial_shapes: L pairs (H_l, W_l); level_start_index: L offsets, where each
    level starts in S; valid_ratios: [B, L, 2] float (valid width / W_l, valid height / H_l).

    The sizes are Python ints taken from the feature maps' shapes, not tensors: under
    torch.export they stay symbolic, where `torch.as_tensor` of them fixes height and width to
    the traced example's (export refuses: "specialized to a constant").
    """

    src: Tensor
    pos: Tensor
    mask: Tensor
    spatial_shapes: list[tuple[int, int]]
    level_start_index: list[int]
    valid_ratios: Tensor


def valid_ratios_of(mask: Tensor) -> Tensor:
    """[B, H, W] bool padding mask -> [B, 2] (valid columns of row 0 / W, valid rows of column
    0 / H), float32."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / width, valid_h / height], -1)


def encoder_reference_points(spatial_shapes: Tensor | Sequence[Sequence[int]],
                             valid_ratios: Tensor) -> Tensor:
    """Cell centres of every level, as points on every level: [B, S, L, 2] normalized (x, y).

    spatial_shapes: [L, 2] (H_l, W_l), a tensor or Python ints; valid_ratios: [B, L, 2].
    Cell (i, j) of level l sits at ((j + 0.5) / (vr_w,l W_l), (i + 0.5) / (vr_h,l H_l)), i.e.
    relative to the valid extent of its own level, then is scaled by each level's valid ratio.
    """
    points = []
    for lvl, (height, width) in enumerate(level_sizes(spatial_shapes)):
        # arange + 0.5: the same values as upstream's linspace(0.5, H - 0.5, H), exactly
        ys = torch.arange(height, dtype=torch.float32, device=valid_ratios.device) + 0.5
        xs = torch.arange(width, dtype=torch.float32, device=valid_ratios.device) + 0.5
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * height)  # (B, H*W)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))  # (B, H*W, 2)
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]  # (B, S, L, 2)


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(self, d_model: int, dim_ff: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_ff, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, inputs: MultiScaleInput, reference_points: Tensor) -> Tensor:
        """src [B, S, d], reference_points [B, S, L, 2] -> [B, S, d]."""
        attn = self.self_attn(src + inputs.pos, reference_points, src, inputs.spatial_shapes,
                              inputs.level_start_index, inputs.mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, inputs: MultiScaleInput) -> Tensor:
        """-> memory [B, S, d] (no final norm)."""
        reference_points = encoder_reference_points(inputs.spatial_shapes, inputs.valid_ratios)
        output = inputs.src
        for layer in self.layers:
            output = layer(output, inputs, reference_points)
        return output


class DeformableDecoderLayer(nn.Module):
    """Post-norm layer: self-attention among queries (norm2), deformable cross-attention into
    the memory (norm1), ReLU FFN (norm3); norm names as upstream."""

    def __init__(self, d_model: int, dim_ff: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_ff, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor,
                memory: MultiScaleInput) -> Tensor:
        """tgt, query_pos [B, Q, d]; reference_points [B, Q, L, 4] normalized cxcywh (valid-
        ratio scaled); memory.src is the encoder output. -> [B, Q, d]."""
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory.src,
                               memory.spatial_shapes, memory.level_start_index, memory.mask)
        tgt = self.norm1(tgt + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DabDeformableDecoder(nn.Module):
    """Decoder with DAB anchor queries and box refinement in every layer.

    Per layer k: the anchors, scaled per level by the valid ratios, give the positional query
    ref_point_head(sine(anchor at level 0)), times query_scale(output) for k > 0; after the
    layer, box head k refines the anchors in logit space (detached for the next layer).
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, d_model: int,
                 eps: float = 1e-3):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.d_model = d_model
        self.eps = eps
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)

    def forward(self, tgt: Tensor, anchors: Tensor, memory: MultiScaleInput,
                bbox_embed: nn.ModuleList) -> tuple[Tensor, Tensor]:
        """tgt: [B, Q, d] content queries; anchors: [B, Q, 4] normalized cxcywh;
        bbox_embed: one box head per layer (the model's, shared with its outputs).

        Returns hs [Ld, B, Q, d] (every layer's output, no final norm) and boxes [Ld, B, Q, 4]:
        layer k's refined boxes sigmoid(bbox_embed[k](hs_k) + inverse_sigmoid(anchors_k)),
        whose gradient reaches box head k but not the earlier layers' boxes (upstream detach).
        """
        ratios = torch.cat([memory.valid_ratios, memory.valid_ratios], -1)[:, None]  # (B,1,L,4)
        output = tgt
        hs, boxes = [], []
        for lid, layer in enumerate(self.layers):
            ref_in = anchors[:, :, None] * ratios  # (B, Q, L, 4)
            # sine of the valid-ratio-scaled box at level 0: (y, x, w, h), d/2 each -> 2d
            query_pos = self.ref_point_head(anchor_sine_embedding(ref_in[:, :, 0], self.d_model))
            if lid > 0:
                query_pos = query_pos * self.query_scale(output)
            output = layer(output, query_pos, ref_in, memory)
            refined = (bbox_embed[lid](output) + inverse_sigmoid(anchors, self.eps)).sigmoid()
            hs.append(output)
            boxes.append(refined)
            anchors = refined.detach()
        return torch.stack(hs), torch.stack(boxes)


class ProposalSelection(nn.Module):
    """Two-stage query selection (Deformable DETR's): each encoder cell proposes a box, the
    top `num_queries` by class-0 score become the decoder's anchors and (through their sine
    embedding) its content queries. Parameter names as upstream (`transformer.enc_output`, ...).
    """

    def __init__(self, d_model: int, num_queries: int):
        super().__init__()
        self.num_queries = num_queries
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
        self.pos_trans_norm = nn.LayerNorm(2 * d_model)

    @staticmethod
    def proposals(memory: MultiScaleInput) -> tuple[Tensor, Tensor]:
        """Per-cell proposals in logit space [B, S, 4] (+inf where padded or invalid) and their
        validity [B, S, 1] bool. Centres ((j + 0.5) / valid_W, (i + 0.5) / valid_H), side
        0.05 * 2**level; valid when all four coordinates lie in (0.01, 0.99)."""
        batch = memory.mask.shape[0]
        boxes = []
        for lvl, ((height, width), start) in enumerate(
                zip(memory.spatial_shapes, memory.level_start_index, strict=True)):
            mask = memory.mask[:, start:start + height * width].view(batch, height, width)
            valid_h = (~mask[:, :, 0]).sum(1)
            valid_w = (~mask[:, 0, :]).sum(1)
            # arange: upstream's linspace(0, H - 1, H), exactly
            ys = torch.arange(height, dtype=torch.float32, device=mask.device)
            xs = torch.arange(width, dtype=torch.float32, device=mask.device)
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            grid = torch.stack([grid_x, grid_y], -1)  # (H, W, 2) (x, y)
            scale = torch.stack([valid_w, valid_h], 1).view(batch, 1, 1, 2)
            centres = (grid[None].expand(batch, -1, -1, -1) + 0.5) / scale
            sides = torch.full_like(centres, 0.05 * 2.0**lvl)
            boxes.append(torch.cat([centres, sides], -1).view(batch, -1, 4))
        proposals = torch.cat(boxes, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        logits = torch.log(proposals / (1 - proposals))  # no clamp, as upstream
        logits = logits.masked_fill(memory.mask[..., None] | ~valid, float("inf"))
        return logits, valid

    def forward(self, memory: MultiScaleInput, class_head: nn.Module, box_head: nn.Module
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (content [B, Q, d], anchors [B, Q, 4] normalized cxcywh, detached),
        and the per-cell outputs: logits [B, S, C], boxes [B, S, 4] (sigmoid)."""
        num_cells = memory.mask.shape[1]
        if num_cells < self.num_queries:
            raise ValueError(f"two-stage selection needs num_queries={self.num_queries} of the "
                             f"{num_cells} encoder cells this input has; use larger images or "
                             "fewer queries")
        proposals, valid = self.proposals(memory)
        features = memory.src.masked_fill(memory.mask[..., None] | ~valid, 0.0)
        features = self.enc_output_norm(self.enc_output(features))
        cell_logits = class_head(features)
        cell_boxes = box_head(features) + proposals  # logit space
        top = torch.topk(cell_logits[..., 0], self.num_queries, dim=1).indices  # (B, Q)
        chosen = cell_boxes.gather(1, top[..., None].expand(-1, -1, 4)).detach()
        embedding = self.pos_trans_norm(self.pos_trans(proposal_sine_embedding(
            chosen.sigmoid(), self.enc_output.in_features // 2)))
        content = embedding[..., self.enc_output.in_features:]  # first half unused with DAB
        return content, chosen.sigmoid(), cell_logits, cell_boxes.sigmoid()


class DeformableTransformer(nn.Module):
    """Level embedding + deformable encoder + DAB decoder (+ two-stage proposal selection)."""

    def __init__(self, d_model: int, nheads: int, enc_layers: int, dec_layers: int, dim_ff: int,
                 dropout: float, num_levels: int, enc_points: int, dec_points: int,
                 two_stage: bool, num_queries: int, eps: float = 1e-3):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        self.encoder = DeformableEncoder(DeformableEncoderLayer(
            d_model, dim_ff, dropout, num_levels, nheads, enc_points), enc_layers)
        self.decoder = DabDeformableDecoder(DeformableDecoderLayer(
            d_model, dim_ff, dropout, num_levels, nheads, dec_points), dec_layers, d_model, eps)
        self.selection = ProposalSelection(d_model, num_queries) if two_stage else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Upstream: xavier on every matrix, then the deformable attention's own init."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def flatten(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor]
                ) -> MultiScaleInput:
        """Per-level maps (srcs, pos [B, d, H_l, W_l], masks [B, H_l, W_l]) -> one sequence."""
        shapes = [(src.shape[-2], src.shape[-1]) for src in srcs]
        starts = [0]
        for height, width in shapes[:-1]:
            starts.append(starts[-1] + height * width)
        return MultiScaleInput(
            src=torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1),
            pos=torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl]
                           for lvl, p in enumerate(pos)], 1),
            mask=torch.cat([m.flatten(1) for m in masks], 1),
            spatial_shapes=shapes,
            level_start_index=starts,
            valid_ratios=torch.stack([valid_ratios_of(m) for m in masks], 1),
        )

    def encode(self, inputs: MultiScaleInput) -> MultiScaleInput:
        """The same layout with src replaced by the encoder output (memory)."""
        return MultiScaleInput(self.encoder(inputs), inputs.pos, inputs.mask,
                               inputs.spatial_shapes, inputs.level_start_index,
                               inputs.valid_ratios)

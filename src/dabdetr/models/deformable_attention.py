"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021), in plain PyTorch.

Each query attends to a few sampled points per head and feature level instead of to every cell:
the points sit at learned offsets around the query's reference point, their features are read
by bilinear interpolation (`F.grid_sample`), and a softmax over each head's points weights them.
No compiled extension is involved; the same code runs on CPUs and GPUs and is differentiable in
the values, the sampling locations and the weights.

Notation: B batch, Nq queries, S = sum_l H_l * W_l flattened cells of all levels, M heads,
Dh = d / M channels per head, L levels, P points per head and level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def level_sizes(spatial_shapes: Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """[L, 2] (H, W) as a list of pairs. Sizes given as a sequence are kept as they are: under
    torch.export they are symbolic sizes, which `int()` would fix to the traced example's."""
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def _level_starts(level_start_index: Tensor | Sequence[int]) -> list[int]:
    if isinstance(level_start_index, Tensor):
        return [int(s) for s in level_start_index.tolist()]
    return list(level_start_index)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    level_start_index: Tensor | Sequence[int],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The multi-scale deformable attention core: weighted bilinear samples of every level.

    Args:
        value: [B, S, M, Dh] per-head values of all levels, flattened row-major per level and
            concatenated level after level.
        spatial_shapes: [L, 2] int (H_l, W_l) of each level, a tensor or Python ints.
        level_start_index: [L] int, where each level starts in S (exclusive cumsum of H_l * W_l),
            a tensor or Python ints.
        sampling_locations: [B, Nq, M, L, P, 2] float, (x, y) normalized to [0, 1] over each
            level's full (padded) map: pixel coordinate x * W_l - 0.5 (align_corners=False).
            Points outside the map read zeros.
        attention_weights: [B, Nq, M, L, P] float, weights of the samples (usually a softmax
            over each head's L * P points).
    Returns:
        [B, Nq, M * Dh]: for each head, sum over (l, p) of weight * sample, heads concatenated.
    """
    batch, num_cells, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    sizes = level_sizes(spatial_shapes)
    starts = _level_starts(level_start_index)
    if len(sizes) != levels or len(starts) != levels:
        raise ValueError(f"sampling_locations has {levels} levels but spatial_shapes has "
                         f"{len(sizes)} and level_start_index {len(starts)}")
    if starts[-1] + sizes[-1][0] * sizes[-1][1] != num_cells:
        raise ValueError(f"value has {num_cells} cells but the levels {sizes} starting at "
                         f"{starts} cover {starts[-1] + sizes[-1][0] * sizes[-1][1]}")
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] convention
    samples = []
    for level, ((height, width), start) in enumerate(zip(sizes, starts, strict=True)):
        # (B, H*W, M, Dh) -> (B*M, Dh, H, W)
        level_value = value[:, start:start + height * width].permute(0, 2, 3, 1)
        level_value = level_value.reshape(batch * heads, head_dim, height, width)
        # (B, Nq, M, P, 2) -> (B*M, Nq, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, num_queries, points, 2)
        samples.append(F.grid_sample(level_value, grid, mode="bilinear",
                                     padding_mode="zeros", align_corners=False))  # (B*M, Dh, Nq, P)
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # (B*M, Dh, Nq, L*P)
    # (B, Nq, M, L, P) -> (B*M, 1, Nq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries,
                                                        levels * points)
    out = (stacked * weights).sum(-1)  # (B*M, Dh, Nq)
    return out.view(batch, heads * head_dim, num_queries).transpose(1, 2)  # (B, Nq, M*Dh)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (parameter names as the authors').

    forward(query, reference_points, input_flatten, spatial_shapes, level_start_index,
    input_padding_mask=None) -> [B, Nq, d]:
        query: [B, Nq, d] (content + position of each query).
        reference_points: [B, Nq, L, 2] normalized (x, y) in [0, 1], offsets scaled by the
            level size; or [B, Nq, L, 4] normalized (cx, cy, w, h), offsets scaled by
            0.5 * (w, h) / P (the points spread over the box).
        input_flatten: [B, S, d] features of all levels (see `ms_deform_attn`).
        spatial_shapes: [L, 2] int64 (H_l, W_l); level_start_index: [L] int64 (either also as
            Python ints, as `MultiScaleInput` holds them).
        input_padding_mask: [B, S] bool, True on padded cells (their values read as zero).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        # channel ((m * L + l) * P + p) * 2 + (0: x, 1: y), as upstream
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on rays, one direction per head (angle 2*pi*m/M), point p at distance
        p + 1 in the L-infinity norm; uniform attention; xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        rays = torch.stack([angles.cos(), angles.sin()], -1)  # (M, 2)
        rays = rays / rays.abs().max(-1, keepdim=True).values
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        bias = rays[:, None, None, :] * steps[None, None, :, None]  # (M, 1, P, 2)
        bias = bias.expand(-1, self.n_levels, -1, -1)  # (M, L, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                spatial_shapes: Tensor | Sequence[Sequence[int]],
                level_start_index: Tensor | Sequence[int],
                input_padding_mask: Tensor | None = None) -> Tensor:
        batch, num_queries, _ = query.shape
        num_cells = input_flatten.shape[1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        if reference_points.shape[:3] != (batch, num_queries, levels) or \
                reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points must be [B={batch}, Nq={num_queries}, "
                             f"L={levels}, 2 or 4], got {tuple(reference_points.shape)}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_cells, heads, self.d_model // heads)  # (B, S, M, Dh)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        ref = reference_points[:, :, None, :, None, :]  # (B, Nq, 1, L, 1, 2|4)
        if reference_points.shape[-1] == 2:
            locations = ref + _per_cell(offsets, level_sizes(spatial_shapes))
        else:
            locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


def _per_cell(offsets: Tensor, sizes: Sequence[tuple[int, int]]) -> Tensor:
    """Offsets [B, Nq, M, L, P, 2] (x, y) in cells of each level -> in units of each level's
    width and height: divided by (W_l, H_l). Divided by the sizes themselves, not by a tensor
    made of them: under torch.export that tensor would fix the sizes to the traced example's."""
    levels = [torch.stack([offsets[:, :, :, lvl, :, 0] / width,
                           offsets[:, :, :, lvl, :, 1] / height], -1)
              for lvl, (height, width) in enumerate(sizes)]
    return torch.stack(levels, 3)

"""Position embeddings: the 2-D image embedding and the anchor-box sine embedding."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _sine(values: Tensor, num_feats: int, temperature: float) -> Tensor:
    """[..., ] -> [..., num_feats]: sin of even and cos of odd frequencies, interleaved.

    dim_t = T ** (2 * (i // 2) / num_feats) as upstream; computed in float32.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=values.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = values[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def _normalized_cell_coords(mask: Tensor, offset: float, scale: float) -> tuple[Tensor, Tensor]:
    """Per-cell (y, x) coordinates [B, h, w] float32 of a padding mask [B, h, w] (True on
    padding): (cumsum of valid cells - offset) / (last cumsum + 1e-6) * scale along each axis."""
    not_mask = (~mask).to(torch.float32)
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    eps = 1e-6
    y_embed = (y_embed - offset) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed - offset) / (x_embed[:, :, -1:] + eps) * scale
    return y_embed, x_embed


class PositionEmbeddingSineHW(nn.Module):
    """2-D sine embedding with separate temperatures for y and x (the DAB-DETR variant).

    forward(mask [B, h, w] bool True on padding) -> pos [B, hidden_dim, h, w] float32,
    channels ordered [pos_y (hidden_dim/2), pos_x (hidden_dim/2)]. Coordinates are the cumulative
    count of valid pixels normalized by the last one (no -0.5 offset), times 2*pi.
    """

    def __init__(self, hidden_dim: int, temperature_h: float = 20.0, temperature_w: float = 20.0):
        super().__init__()
        self.num_feats = hidden_dim // 2
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.scale = 2 * math.pi

    def forward(self, mask: Tensor) -> Tensor:
        y_embed, x_embed = _normalized_cell_coords(mask, offset=0.0, scale=self.scale)
        pos_y = _sine(y_embed, self.num_feats, self.temperature_h)
        pos_x = _sine(x_embed, self.num_feats, self.temperature_w)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute 2-D embedding (up to 50 x 50 cells), as upstream's 'learned' option.

    forward(mask [B, h, w] bool) -> pos [B, hidden_dim, h, w], channels ordered [x, y].
    """

    def __init__(self, hidden_dim: int, max_cells: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_cells, hidden_dim // 2)
        self.col_embed = nn.Embedding(max_cells, hidden_dim // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        batch, height, width = mask.shape
        if height > self.row_embed.num_embeddings or width > self.col_embed.num_embeddings:
            raise ValueError(
                f"learned position embedding covers at most {self.row_embed.num_embeddings} cells "
                f"per side, got a {height}x{width} feature map; use position_embedding='sine'"
            )
        x_emb = self.col_embed.weight[:width]  # (w, d/2)
        y_emb = self.row_embed.weight[:height]  # (h, d/2)
        pos = torch.cat(
            [x_emb[None].expand(height, -1, -1), y_emb[:, None].expand(-1, width, -1)], dim=-1
        )  # (h, w, d)
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)


def anchor_sine_embedding(boxes: Tensor, hidden_dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of anchor boxes (upstream `gen_sineembed_for_position`).

    Args:
        boxes: [..., 4] normalized (cx, cy, w, h) in [0, 1], or [..., 2] (cx, cy).
        hidden_dim: model width d; each coordinate gets d/2 features.
    Returns:
        [..., 2d] (or [..., d] for 2-D input) ordered (y, x, w, h) like upstream.
    """
    feats = hidden_dim // 2
    scaled = boxes * (2 * math.pi)
    x, y = scaled[..., 0], scaled[..., 1]
    parts = [_sine(y, feats, temperature), _sine(x, feats, temperature)]
    if boxes.shape[-1] == 4:
        parts += [_sine(scaled[..., 2], feats, temperature), _sine(scaled[..., 3], feats, temperature)]
    elif boxes.shape[-1] != 2:
        raise ValueError(f"anchor boxes must have 2 or 4 coordinates, got {boxes.shape[-1]}")
    return torch.cat(parts, dim=-1)


class PositionEmbeddingSineCentered(nn.Module):
    """2-D sine embedding at cell centres (Deformable DETR's variant, used by DAB-Deformable-DETR).

    forward(mask [B, h, w] bool True on padding) -> pos [B, hidden_dim, h, w] float32,
    channels [pos_y (hidden_dim/2), pos_x (hidden_dim/2)]. Coordinates are
    (cumsum(valid) - 0.5) / (last cumsum + 1e-6) * 2*pi: the -0.5 puts each cell at its centre,
    unlike `PositionEmbeddingSineHW`. One temperature (10000) for both axes.
    """

    def __init__(self, hidden_dim: int, temperature: float = 10000.0):
        super().__init__()
        self.num_feats = hidden_dim // 2
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, mask: Tensor) -> Tensor:
        # fully padded rows/columns get a huge argument here; they are masked everywhere
        y_embed, x_embed = _normalized_cell_coords(mask, offset=0.5, scale=self.scale)
        pos_y = _sine(y_embed, self.num_feats, self.temperature)
        pos_x = _sine(x_embed, self.num_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def proposal_sine_embedding(boxes: Tensor, num_feats: int = 128,
                            temperature: float = 10000.0) -> Tensor:
    """Sine embedding of two-stage proposals (Deformable DETR's `get_proposal_pos_embed`).

    boxes: [..., 4] normalized (cx, cy, w, h) in [0, 1]. Returns [..., 4 * num_feats] in the
    order (x, y, w, h), unlike `anchor_sine_embedding`'s (y, x, w, h).
    """
    return _sine(boxes * (2 * math.pi), num_feats, temperature).flatten(-2)

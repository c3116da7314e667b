"""The DAB-DETR transformer: a conditional encoder and a decoder whose queries are anchor boxes.

Layout inside this module is batch-first: sequences are [B, N, d]. Upstream works sequence-first;
the math is the same, and batch-first suits torch's fused scaled_dot_product_attention (SDPA).
Parameter names follow the authors' code so their checkpoints load without renames.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dabdetr.models.box_ops import box_precision, inverse_sigmoid
from dabdetr.models.position_encoding import anchor_sine_embedding


class MLP(nn.Module):
    """A stack of `num_layers` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def feed_forward(x: Tensor, linear1: nn.Linear, activation: nn.Module, dropout: nn.Dropout,
                 linear2: nn.Linear) -> Tensor:
    """The layers' FFN: linear2(dropout(activation(linear1(x))))."""
    return linear2(dropout(activation(linear1(x))))


def _activation(name: str) -> nn.Module:
    if name == "prelu":
        return nn.PReLU()  # one learnable slope, init 0.25
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; choose prelu, relu or gelu")


def _split_heads(x: Tensor, nheads: int) -> Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, nheads, width // nheads).transpose(1, 2)  # (B, nh, N, hs)


def _merge_heads(x: Tensor) -> Tensor:
    batch, nheads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, nheads * head_dim)  # (B, N, d)


class AttentionOutput(nn.Module):
    """Multi-head attention over already-projected q, k, v, followed by `out_proj`.

    The decoder projects its queries and keys itself (content and position separately), so the
    only parameters here are the output projection (upstream's MultiheadAttention without input
    projection). q, k: [B, nh, N, e]; v: [B, nh, S, ev]; e may differ from ev (cross-attention
    concatenates content and position halves per head). Softmax scale 1/sqrt(e).
    """

    def __init__(self, value_dim: int, dropout: float = 0.0):
        super().__init__()
        self.out_proj = nn.Linear(value_dim, value_dim)
        self.dropout = dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        p = self.dropout if self.training else 0.0
        value_dim = v.shape[-1]
        if value_dim < q.shape[-1]:
            # The fused (flash) SDPA kernels need value heads as wide as the query heads; with
            # narrower ones torch falls back to its unfused path (materialized scores, NaN
            # guards), ~2x slower on CPU. Zero columns in v give zero output columns, and the
            # scale stays 1/sqrt(e) (it depends on q only): same result, dropped below.
            v = F.pad(v, (0, q.shape[-1] - value_dim))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out_proj(_merge_heads(out[..., :value_dim]))


class PackedSelfAttention(AttentionOutput):
    """Encoder self-attention with packed q/k/v input projection (upstream nn.MultiheadAttention
    parameter names: `in_proj_weight` [3d, d], `in_proj_bias`, `out_proj`)."""

    def __init__(self, d_model: int, nheads: int, dropout: float = 0.0):
        super().__init__(d_model, dropout)
        self.nheads = nheads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, qk_input: Tensor, value_input: Tensor, mask: Tensor | None) -> Tensor:  # type: ignore[override]
        d = value_input.shape[-1]
        # q and k share their input (src + pos): one matmul for both
        qk = F.linear(qk_input, self.in_proj_weight[: 2 * d], self.in_proj_bias[: 2 * d])
        q, k = qk.split(d, dim=-1)
        v = F.linear(value_input, self.in_proj_weight[2 * d :], self.in_proj_bias[2 * d :])
        heads = self.nheads
        return super().forward(
            _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads), mask
        )


class EncoderLayer(nn.Module):
    """Post-norm encoder layer: self-attention with q = k = src + pos, v = src; then the FFN."""

    def __init__(self, d_model: int, nheads: int, dim_ff: int, dropout: float, activation: str):
        super().__init__()
        self.self_attn = PackedSelfAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.linear2 = nn.Linear(dim_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        src = self.norm1(src + self.dropout(self.self_attn(src + pos, src, mask)))
        ffn = feed_forward(src, self.linear1, self.activation, self.dropout, self.linear2)
        return self.norm2(src + self.dropout(ffn))


class Encoder(nn.Module):
    """Encoder whose positional embedding is rescaled per layer by an MLP of the content
    (pos_l = pos * query_scale(output), every layer including the first)."""

    def __init__(self, layer: EncoderLayer, num_layers: int, d_model: int, final_norm: bool):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model) if final_norm else None

    def forward(self, src: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        """src, pos: [B, S, d]; mask: [B, 1, 1, S] bool, True where attention is allowed."""
        output = src
        for layer in self.layers:
            output = layer(output, pos * self.query_scale(output), mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


class DecoderLayer(nn.Module):
    """Decoder layer with content/position-decoupled self- and cross-attention (Conditional DETR
    style, as DAB-DETR uses it). Post-norm: norm1 after self-attention, norm2 after
    cross-attention, norm3 after the FFN."""

    def __init__(
        self,
        d_model: int,
        nheads: int,
        dim_ff: int,
        dropout: float,
        activation: str,
        has_query_pos_proj: bool,
        keep_query_pos: bool,
    ):
        super().__init__()
        self.nheads = nheads
        self.keep_query_pos = keep_query_pos
        linear = lambda: nn.Linear(d_model, d_model)  # noqa: E731
        self.sa_qcontent_proj = linear()
        self.sa_qpos_proj = linear()
        self.sa_kcontent_proj = linear()
        self.sa_kpos_proj = linear()
        self.sa_v_proj = linear()
        self.self_attn = AttentionOutput(d_model, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ca_qcontent_proj = linear()
        # upstream creates ca_qpos_proj only where it is used: layer 0, or all with keep_query_pos
        self.ca_qpos_proj = linear() if has_query_pos_proj else None
        self.ca_kcontent_proj = linear()
        self.ca_kpos_proj = linear()
        self.ca_v_proj = linear()
        self.ca_qpos_sine_proj = linear()
        self.cross_attn = AttentionOutput(d_model, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.linear2 = nn.Linear(dim_ff, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        query_sine: Tensor,
        memory_mask: Tensor | None,
        self_attn_mask: Tensor | None,
        is_first: bool,
    ) -> Tensor:
        """tgt, query_pos, query_sine: [B, Nq, d]; memory, pos: [B, S, d];
        memory_mask: [B, 1, 1, S] bool (True = attend); self_attn_mask: [Nq, Nq] bool or None."""
        heads = self.nheads
        # --- self-attention: q = content + position, k likewise, v = content
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        v = self.sa_v_proj(tgt)
        q, k, v = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
        sa = self.self_attn(q, k, v, self_attn_mask)
        tgt = self.norm1(tgt + self.dropout(sa))

        # --- cross-attention: per head, q = [content | sine(x, y)], k = [content | pos]
        q_content = self.ca_qcontent_proj(tgt)
        k_content = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if is_first or self.keep_query_pos:
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        q_sine = self.ca_qpos_sine_proj(query_sine)
        q = torch.cat([_split_heads(q_content, heads), _split_heads(q_sine, heads)], dim=-1)
        k = torch.cat([_split_heads(k_content, heads), _split_heads(k_pos, heads)], dim=-1)
        # q: (B, nh, Nq, 2hs), k: (B, nh, S, 2hs), v: (B, nh, S, hs); scale 1/sqrt(2hs) as upstream
        ca = self.cross_attn(q, k, _split_heads(v, heads), memory_mask)
        tgt = self.norm2(tgt + self.dropout(ca))

        ffn = feed_forward(tgt, self.linear1, self.activation, self.dropout, self.linear2)
        return self.norm3(tgt + self.dropout(ffn))


class Decoder(nn.Module):
    """The decoder; what a query's positional part is depends on `query_type`.

    Every layer gets two positional inputs per query: `query_pos` [B, Nq, d] (self-attention,
    and added to the cross-attention content in layer 0) and `query_sine` [B, Nq, d], which
    `ca_qpos_sine_proj` turns into the positional half of each cross-attention head, matched
    against the image position embedding. So in every query type the cross-attention logits are
    a content term plus a positional term (`dabdetr.explain` draws them apart).

    - "dab" (DAB-DETR): the query is an anchor box A = (x, y, w, h). sine = PE(A) [2d];
      query_pos = ref_point_head(sine); query_sine = the (x, y) half of sine, times
      query_scale(output) after layer 0, with the x part times w_ref/w and the y part times
      h_ref/h when modulate_hw_attn is on.
    - "anchor2d" (Conditional / Anchor DETR): the query is a point (x, y). sine = PE(x, y) [d];
      query_pos = ref_point_head(sine); query_sine = sine times query_scale(output) after
      layer 0. There is no w, h to modulate by. Boxes are predicted around the point from a
      neutral size: the reference carries w = h = 0.5 (logit 0), so the box head's w, h are
      sigmoid(delta_wh), as Conditional DETR adds its reference only to the x, y logits.
    - "detr": the query is a learned vector p [d] (DETR's query_pos), no anchor. query_pos = p;
      query_sine = p, times query_scale(output) after layer 0: the learned vector takes the
      place of the anchor's sine embedding, so the positional term is
      ca_qpos_sine_proj(p) . ca_kpos_proj(pos) and the only difference from the anchor types is
      the positional prior. No ref_point_head; boxes are sigmoid(bbox_embed(hs)).

    With refinement (a box head passed in, `iter_update`), each layer's box prediction becomes
    the next layer's anchor (anchor2d keeps only its x, y). The box head is owned by the
    detector and passed in (it is shared with the output head), so it is not duplicated here.
    """

    def __init__(
        self,
        d_model: int,
        nheads: int,
        dim_ff: int,
        dropout: float,
        activation: str,
        num_layers: int,
        query_scale_type: str,
        modulate_hw_attn: bool,
        keep_query_pos: bool,
        query_pe_temperature: float,
        inverse_sigmoid_eps: float,
        query_type: str = "dab",
    ):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, nheads, dim_ff, dropout, activation,
                         has_query_pos_proj=(i == 0 or keep_query_pos),
                         keep_query_pos=keep_query_pos)
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.query_scale_type = query_scale_type
        if query_scale_type == "cond_elewise":
            self.query_scale: nn.Module = MLP(d_model, d_model, d_model, 2)
        elif query_scale_type == "cond_scalar":
            self.query_scale = MLP(d_model, d_model, 1, 2)
        else:  # fix_elewise: one learned vector per layer
            self.query_scale = nn.Embedding(num_layers, d_model)
        self.query_type = query_type
        # the sine of (x, y, w, h) is 2d wide, that of (x, y) d wide; detr has no sine
        sine_width = {"dab": 2 * d_model, "anchor2d": d_model}.get(query_type)
        self.ref_point_head = None if sine_width is None else MLP(sine_width, d_model, d_model, 2)
        if modulate_hw_attn and query_type != "dab":
            raise ValueError(f"modulate_hw_attn needs anchor widths and heights; query_type="
                             f"{query_type!r} has none: set modulate_hw_attn=False")
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None
        self.query_pe_temperature = query_pe_temperature
        self.inverse_sigmoid_eps = inverse_sigmoid_eps

    def initial_anchors(self, queries: Tensor) -> Tensor | None:
        """[B, Nq, 4] normalized cxcywh anchors from the queries (None for "detr"); a 2-D
        point gets w = h = 0.5 (logit 0)."""
        if self.query_type == "detr":
            return None
        logits = box_precision(queries)
        if self.query_type == "anchor2d":
            logits = torch.cat([logits, logits.new_zeros(*logits.shape[:-1], 2)], dim=-1)
        return logits.sigmoid()

    def _as_anchor(self, boxes: Tensor) -> Tensor:
        """A predicted box as the next layer's anchor: anchor2d keeps only its x, y."""
        if self.query_type != "anchor2d":
            return boxes
        return torch.cat([boxes[..., :2], torch.full_like(boxes[..., 2:], 0.5)], dim=-1)

    def positional_queries(self, layer_id: int, output: Tensor, reference: Tensor | None,
                           learned: Tensor) -> tuple[Tensor, Tensor]:
        """(query_pos, query_sine), each [B, Nq, d], of layer `layer_id` (see the class
        docstring). output: [B, Nq, d] the content entering the layer; reference: [B, Nq, 4]
        normalized cxcywh anchors (None for "detr"); learned: [B, Nq, d] the "detr" queries."""
        d = self.d_model
        if reference is None:
            query_pos = sine = learned
        else:
            coords = reference if self.query_type == "dab" else reference[..., :2]
            sine = anchor_sine_embedding(coords, d, self.query_pe_temperature)  # (B, Nq, 2d|d)
            query_pos = self.ref_point_head(sine)
        if self.query_scale_type == "fix_elewise":
            query_sine = sine[..., :d] * self.query_scale.weight[layer_id]
        elif layer_id == 0:
            query_sine = sine[..., :d]
        else:
            query_sine = sine[..., :d] * self.query_scale(output)
        if self.ref_anchor_head is not None:
            # modulated attention: scale the y half by h_ref/h and the x half by w_ref/w
            ref_hw = self.ref_anchor_head(output).sigmoid()  # (B, Nq, 2) = (w_ref, h_ref)
            scale_y = (ref_hw[..., 1] / reference[..., 3]).unsqueeze(-1)
            scale_x = (ref_hw[..., 0] / reference[..., 2]).unsqueeze(-1)
            half = d // 2
            query_sine = torch.cat(
                [query_sine[..., :half] * scale_y, query_sine[..., half:] * scale_x], dim=-1
            )
        return query_pos, query_sine

    def forward(
        self,
        tgt: Tensor,
        queries: Tensor,
        memory: Tensor,
        pos: Tensor,
        memory_mask: Tensor | None,
        bbox_embed: nn.Module | None,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """
        Args:
            tgt: [B, Nq, d] initial content queries (zeros or pattern embeddings).
            queries: the positional queries: [B, Nq, 4] anchors in logit space ("dab"),
                [B, Nq, 2] points in logit space ("anchor2d") or [B, Nq, d] learned vectors
                ("detr").
            memory, pos: [B, S, d] encoder output and image position embedding.
            memory_mask: [B, 1, 1, S] bool, True where attention is allowed.
            bbox_embed: the box head (an MLP, or a ModuleList with one per layer), or None to
                keep the anchors fixed (no iterative refinement).
            self_attn_mask: [Nq, Nq] bool (True = attend) or None; used by denoising queries.
        Returns:
            hs: [L, B, Nq, d] LayerNorm'ed output of every layer.
            references: [L, B, Nq, 4] normalized cxcywh anchors each layer's output refines
                (only [1, B, Nq, 4] without refinement). Not detached after layer 0, as
                upstream. None for "detr" (no anchors).
        """
        reference = self.initial_anchors(queries)
        references = [reference]
        hs = []
        output = tgt
        num_layers = len(self.layers)
        for layer_id, layer in enumerate(self.layers):
            query_pos, query_sine = self.positional_queries(layer_id, output, reference, queries)
            output = layer(output, memory, pos, query_pos, query_sine, memory_mask,
                           self_attn_mask, is_first=(layer_id == 0))
            if reference is not None and bbox_embed is not None:
                head = bbox_embed[layer_id] if isinstance(bbox_embed, nn.ModuleList) else bbox_embed
                delta = head(output)  # on the un-normed output, as upstream
                inv_ref = inverse_sigmoid(reference, self.inverse_sigmoid_eps)
                new_reference = self._as_anchor((delta + inv_ref).sigmoid())
                if layer_id != num_layers - 1:
                    references.append(new_reference)
                reference = new_reference.detach()
            hs.append(self.norm(output))
        if references[0] is None:
            return torch.stack(hs), None
        return torch.stack(hs), torch.stack(references)


class Transformer(nn.Module):
    """Encoder + decoder (+ the pattern embeddings), named as upstream's `transformer.*`."""

    def __init__(self, d_model: int, nheads: int, enc_layers: int, dec_layers: int, dim_ff: int,
                 dropout: float, activation: str, pre_norm: bool, num_patterns: int,
                 query_scale_type: str, modulate_hw_attn: bool, keep_query_pos: bool,
                 query_pe_temperature: float, inverse_sigmoid_eps: float,
                 query_type: str = "dab"):
        super().__init__()
        self.d_model = d_model
        enc_layer = EncoderLayer(d_model, nheads, dim_ff, dropout, activation)
        self.encoder = Encoder(enc_layer, enc_layers, d_model, final_norm=pre_norm)
        self.decoder = Decoder(d_model, nheads, dim_ff, dropout, activation, dec_layers,
                               query_scale_type, modulate_hw_attn, keep_query_pos,
                               query_pe_temperature, inverse_sigmoid_eps, query_type)
        self.num_patterns = num_patterns
        self.patterns = nn.Embedding(num_patterns, d_model) if num_patterns > 0 else None
        # upstream: xavier_uniform on every transformer weight with more than one dimension
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, src: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        """Encoder output [B, S, d] (mask: [B, S] bool, True on padding)."""
        return self.encoder(src, pos, (~mask)[:, None, None, :])

    def decode(self, memory: Tensor, pos: Tensor, mask: Tensor, queries: Tensor,
               bbox_embed: nn.Module | None, extra_queries: tuple[Tensor, Tensor] | None = None,
               self_attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The decoder on encoder output `memory`.

        Args:
            memory: [B, S, d] encoder output; pos: [B, S, d]; mask: [B, S] bool, True on padding.
            queries: [Nq, k] learned positional queries, shared by the batch, or [B, Nq, k] per
                image (query selection): anchors in logit space (k = 4, "dab"; k = 2,
                "anchor2d") or learned vectors (k = d, "detr").
            bbox_embed: the box head, for iterative anchor refinement (None: anchors static).
            extra_queries: optional (content [B, Nd, d], anchors [B, Nd, 4] logit space) put in
                front of the matching queries (denoising queries, training only).
            self_attn_mask: [Nd + Nq', Nq' + Nd] bool (True = attend) for the decoder.
        Returns: (hs [L, B, N, d], references [L, B, N, 4] or None) as Decoder.forward.
        """
        batch = memory.shape[0]
        attn_mask = (~mask)[:, None, None, :]  # (B, 1, 1, S): True where a key may be attended
        if queries.dim() == 2:
            queries = queries[None].expand(batch, -1, -1)
        num_queries = queries.shape[1]
        if self.patterns is None:
            tgt = memory.new_zeros(batch, num_queries, self.d_model)
        else:
            # pattern-major order: query index = p * Nq + q
            tgt = self.patterns.weight[:, None, :].expand(-1, num_queries, -1).flatten(0, 1)
            tgt = tgt[None].expand(batch, -1, -1)
            queries = queries.repeat(1, self.num_patterns, 1)
        if extra_queries is not None:
            tgt = torch.cat([extra_queries[0], tgt], dim=1)
            queries = torch.cat([extra_queries[1], queries], dim=1)
        return self.decoder(tgt, queries, memory, pos, attn_mask, bbox_embed, self_attn_mask)

"""Attention maps split into positional and content parts (`dabdetr.explain`), and the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _util import perturbed_model, tiny_config

import dabdetr
from dabdetr.explain import attention_maps


def _sine(coordinate: torch.Tensor, feats: int, temperature: float) -> torch.Tensor:
    """[N] values in [0, 1] -> [N, feats]: channel i is sin (i even) or cos (i odd) of
    2 pi c / T ** (2 (i // 2) / feats), written out channel by channel in float64."""
    out = torch.empty(coordinate.shape[0], feats, dtype=torch.float64)
    for i in range(feats):
        arg = coordinate.double() * 2 * math.pi / temperature ** (2 * (i // 2) / feats)
        out[:, i] = arg.sin() if i % 2 == 0 else arg.cos()
    return out


def _positional_map(model, layer: int, anchors: torch.Tensor, content: torch.Tensor,
                    pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The positional attention of one image's queries at `layer`, from the paper's recipe
    and the model's parameters: q = ca_qpos_sine_proj(sine(x, y) * query_scale(content),
    modulated by w_ref/w and h_ref/h), k = ca_kpos_proj(pos), per head softmax(q.k / sqrt(2 hs))
    over the valid cells. anchors [Q, 4] cxcywh; content [Q, d] the layer's input content;
    pos [S, d]; valid [S] bool. Returns [Q, heads, S]."""
    cfg = model.config
    d, heads = cfg.hidden_dim, cfg.nheads
    decoder = model.transformer.decoder
    feats, temp = d // 2, cfg.query_pe_temperature
    sine_xy = torch.cat([_sine(anchors[:, 1], feats, temp), _sine(anchors[:, 0], feats, temp)],
                        dim=1).float()  # (Q, d): y half, then x half
    if layer > 0:
        sine_xy = sine_xy * decoder.query_scale(content)
    if cfg.modulate_hw_attn:
        ref = decoder.ref_anchor_head(content).sigmoid()  # (Q, 2): w_ref, h_ref
        sine_xy = torch.cat([sine_xy[:, :feats] * (ref[:, 1] / anchors[:, 3])[:, None],
                             sine_xy[:, feats:] * (ref[:, 0] / anchors[:, 2])[:, None]], dim=1)
    block = decoder.layers[layer]
    q = F.linear(sine_xy, block.ca_qpos_sine_proj.weight, block.ca_qpos_sine_proj.bias)
    k = F.linear(pos, block.ca_kpos_proj.weight, block.ca_kpos_proj.bias)
    hs = d // heads
    q, k = q.view(-1, heads, hs), k.view(-1, heads, hs)
    logits = torch.einsum("qhe,she->qhs", q, k) / math.sqrt(2 * hs)
    return logits.masked_fill(~valid, float("-inf")).softmax(-1)


def _layer_inputs(model, images, mask):
    """The un-normed content each decoder layer receives (zeros for layer 0)."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o))
             for layer in model.transformer.decoder.layers]
    try:
        with torch.no_grad():
            model(images, mask)
    finally:
        for hook in hooks:
            hook.remove()
    return outs


@pytest.mark.parametrize("overrides", [{}, {"modulate_hw_attn": False, "iter_update": False},
                                       {"query_pe_temperature": 20.0}],
                         ids=["dab", "static-unmodulated", "temperature20"])
def test_positional_map_equals_recomputation_from_the_anchor(overrides):
    torch.manual_seed(0)
    model = perturbed_model(tiny_config(dec_layers=3, **overrides))
    images, mask = dabdetr.batch_images([torch.randn(3, 96, 128), torch.randn(3, 64, 96)])
    result = attention_maps(model, images, mask)
    with torch.no_grad():
        _, pos, feat_mask = model.feature_maps(images, mask)
    pos = pos.flatten(2).transpose(1, 2)  # (B, S, d)
    valid = ~feat_mask.flatten(1)
    inputs = _layer_inputs(model, images, mask)
    anchors0 = model.refpoint_embed.weight.sigmoid()
    for layer, maps in enumerate(result.layers):
        if layer == 0 or not model.config.iter_update:
            torch.testing.assert_close(maps.anchors[0], anchors0, atol=0, rtol=0)
        else:  # the previous layer's box prediction, from its un-normed output
            previous = result.layers[layer - 1].anchors
            with torch.no_grad():
                delta = model.bbox_embed(inputs[layer - 1])
            torch.testing.assert_close(maps.anchors, (delta + torch.logit(previous, 1e-3)).sigmoid(),
                                       atol=1e-6, rtol=1e-5)
        for b in range(2):
            content = torch.zeros(8, 64) if layer == 0 else inputs[layer - 1][b]
            with torch.no_grad():
                expected = _positional_map(model, layer, maps.anchors[b], content, pos[b],
                                           valid[b])
            got = maps.positional[b].flatten(2)  # (Q, heads, S)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # the maps differ from layer to layer and from the full attention
    assert (result.layers[0].positional - result.layers[0].full).abs().max() > 1e-3


def test_detr_positional_map_comes_from_the_learned_query():
    model = perturbed_model(tiny_config(query_type="detr"))
    images = torch.randn(1, 3, 64, 96)
    result = attention_maps(model, images)
    assert all(layer.anchors is None for layer in result.layers)
    with torch.no_grad():
        _, pos, _ = model.feature_maps(images, None)
    block = model.transformer.decoder.layers[0]
    q = block.ca_qpos_sine_proj(model.query_embed.weight).view(8, 4, 16)
    k = block.ca_kpos_proj(pos.flatten(2).transpose(1, 2)[0]).view(-1, 4, 16)
    expected = (torch.einsum("qhe,she->qhs", q, k) / math.sqrt(32)).softmax(-1)
    torch.testing.assert_close(result.layers[0].positional[0].flatten(2), expected.detach(),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"query_type": "anchor2d", "num_patterns": 2},
                                       {"query_type": "detr"}, {"two_stage": True}],
                         ids=["dab", "anchor2d-patterns", "detr", "two-stage"])
def test_maps_sum_to_one_over_valid_cells_for_every_head(overrides):
    model = perturbed_model(tiny_config(**overrides))
    images, mask = dabdetr.batch_images([torch.randn(3, 64, 96), torch.randn(3, 40, 50)])
    result = attention_maps(model, images, mask)
    queries = model.config.total_queries
    valid = result.valid  # (B, h, w)
    assert valid.shape == (2, 2, 3) and not valid[1, :, 2:].any()
    for layer in result.layers:
        for maps in (layer.positional, layer.content, layer.full):
            assert maps.shape == (2, queries, 4, 2, 3)
            torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, queries, 4))
            assert maps[~valid[:, None, None].expand_as(maps)].abs().sum() == 0
        if model.config.query_type == "detr":
            assert layer.anchors is None
        else:
            assert layer.anchors.shape == (2, queries, 4)
    with torch.no_grad():
        out = model(images, mask)
    assert torch.equal(out.pred_boxes, result.outputs.pred_boxes)


def test_full_map_is_the_models_attention():
    """The full map, applied to the values, reproduces the layer's attention output."""
    model = perturbed_model(tiny_config())
    images = torch.randn(1, 3, 64, 96)
    captured = {}
    block = model.transformer.decoder.layers[1]
    hook = block.cross_attn.register_forward_hook(
        lambda m, args, out: captured.update(v=args[2], out=out))
    try:
        result = attention_maps(model, images)
    finally:
        hook.remove()
    weights = result.layers[1].full[0].flatten(2).transpose(0, 1)  # (heads, Q, S)
    mixed = (weights @ captured["v"][0]).transpose(0, 1).reshape(8, -1)  # (Q, d)
    with torch.no_grad():
        expected = block.cross_attn.out_proj(mixed)
    torch.testing.assert_close(expected, captured["out"][0], atol=1e-5, rtol=1e-4)


def test_attention_maps_refuses_a_training_model():
    with pytest.raises(ValueError, match="eval"):
        attention_maps(dabdetr.DabDetr(tiny_config()).train(), torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("query_type", ["dab", "anchor2d", "detr"])
def test_explain_cli_draws_queries_by_layers(query_type, tmp_path, capsys):
    from PIL import Image

    from dabdetr.cli import main

    model = dabdetr.DabDetr(tiny_config(query_type=query_type)).eval()
    dabdetr.save_model(model, tmp_path / "w")
    Image.new("RGB", (80, 60), "gray").save(tmp_path / "img.png")
    code = main(["explain", str(tmp_path / "img.png"), "--weights", str(tmp_path / "w"),
                 "--out", str(tmp_path / "out"), "--queries", "3", "--size", "64",
                 "--device", "cpu"])
    assert code == 0
    with Image.open(tmp_path / "out" / "img_explain.png") as grid:
        # 3 rows (queries) x 3 columns (the detection, then 2 decoder layers), 80 x 60 tiles
        assert grid.size == (3 * 84 + 4, 3 * 64 + 4)
    code = main(["explain", str(tmp_path / "img.png"), "--weights", str(tmp_path / "w"),
                 "--out", str(tmp_path / "one"), "--queries", "2", "--layer", "-1",
                 "--size", "64", "--device", "cpu"])
    with Image.open(tmp_path / "one" / "img_explain.png") as grid:
        assert code == 0 and grid.size == (2 * 84 + 4, 2 * 64 + 4)
    code = main(["explain", str(tmp_path / "img.png"), "--weights", str(tmp_path / "w"),
                 "--out", str(tmp_path / "bad"), "--layer", "2", "--size", "64"])
    assert code == 2 and "layer 2 is out of range" in capsys.readouterr().err
    # an existing picture is replaced only with --force
    code = main(["explain", str(tmp_path / "img.png"), "--weights", str(tmp_path / "w"),
                 "--out", str(tmp_path / "one"), "--size", "64", "--device", "cpu"])
    assert code == 2 and "--force" in capsys.readouterr().err


def test_peak_offsets_measure_cells_from_the_reference_in_the_valid_region():
    from dabdetr.explain import AttentionMaps, LayerAttention, peak_offsets

    valid = torch.zeros(1, 4, 6, dtype=torch.bool)
    valid[:, :, :4] = True  # 4 x 4 valid cells, 2 padded columns
    positional = torch.zeros(1, 3, 2, 4, 6)
    positional[0, 0, :, 1, 2] = 1.0  # both heads peak at row 1, column 2
    positional[0, 1, 0, 3, 0] = 0.9  # the heads disagree: the mean peaks at row 3, column 0
    positional[0, 1, 1, 0, 3] = 0.5
    positional[0, 2, :, 0, 0] = 1.0
    # anchors: (cx, cy) in cells of a 4-wide valid region (the padded columns do not count)
    anchors = torch.tensor([[[0.6, 0.3, 0.1, 0.1], [0.99, 0.9, 0.2, 0.2], [0.1, 0.1, 1, 1]]])
    layer = LayerAttention(positional=positional, content=positional, full=positional,
                           anchors=anchors)
    maps = AttentionMaps(outputs=None, layers=[layer], valid=valid)
    # query 0: anchor cell (x 2, y 1) = peak; query 1: anchor (3, 3) vs peak (0, 3): 3 cells;
    # query 2: (0, 0) both
    assert peak_offsets(maps, 0).tolist() == [[0, 3, 0]]
    boxes = torch.tensor([[[0.1, 0.1, 0, 0], [0.3, 0.9, 0, 0], [0.6, 0.6, 0, 0]]])
    assert peak_offsets(maps, 0, boxes).tolist() == [[2, 1, 2]]
    assert peak_offsets(maps, 0, boxes, head=1).tolist() == [[2, 3, 2]]  # head 1 alone
    detr = AttentionMaps(outputs=None, valid=valid,
                         layers=[LayerAttention(positional, positional, positional, None)])
    with pytest.raises(ValueError, match="no anchors"):
        peak_offsets(detr, 0)


def test_peak_offsets_of_a_model_follow_its_maps():
    from dabdetr.explain import peak_offsets

    model = perturbed_model(tiny_config(dec_layers=2))
    images, mask = dabdetr.batch_images([torch.randn(3, 96, 128), torch.randn(3, 64, 96)])
    result = attention_maps(model, images, mask)
    offsets = peak_offsets(result, 1)
    assert offsets.shape == (2, model.config.num_queries)
    for b, (rows, cols) in enumerate([(3, 4), (2, 3)]):
        mean = result.layers[1].positional[b].mean(1)  # (Q, h, w)
        for q in range(model.config.num_queries):
            y, x = divmod(int(mean[q].flatten().argmax()), mean.shape[-1])
            cx, cy = result.layers[1].anchors[b, q, :2].tolist()
            expected = max(abs(x - min(int(cx * cols), cols - 1)),
                           abs(y - min(int(cy * rows), rows - 1)))
            assert offsets[b, q] == expected

"""Query types (dab, anchor2d, detr) and their options: build, train, save, reload, refuse."""

from __future__ import annotations

import pytest
import torch
from _util import perturbed_model, tiny_cfg, tiny_config, tiny_dataset

import dabdetr
from dabdetr.models.box_ops import inverse_sigmoid
from dabdetr.models.criterion import SetCriterion
from dabdetr.models.dab_detr import DabDetr
from dabdetr.models.matcher import HungarianMatcher

VARIANTS = [
    {"query_type": "dab"},
    {"query_type": "dab", "iter_update": False},
    {"query_type": "dab", "modulate_hw_attn": False},
    {"query_type": "dab", "query_pe_temperature": 20.0, "pe_temperature_h": 10.0},
    {"query_type": "anchor2d"},
    {"query_type": "anchor2d", "iter_update": False},
    {"query_type": "anchor2d", "random_refpoints_xy": True, "query_pe_temperature": 20.0},
    {"query_type": "anchor2d", "num_patterns": 2, "query_scale_type": "fix_elewise"},
    {"query_type": "detr"},
    {"query_type": "detr", "num_patterns": 2, "pe_temperature_w": 10.0},
]


def _ids(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items())


def _targets() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[0.5, 0.4, 0.3, 0.2]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[0.3, 0.6, 0.2, 0.4], [0.7, 0.3, 0.1, 0.1]]),
             "labels": torch.tensor([2, 4])}]


@pytest.mark.parametrize("overrides", VARIANTS, ids=_ids)
def test_query_type_trains_a_step_saves_and_reloads(overrides, tmp_path):
    torch.manual_seed(0)
    model = DabDetr(tiny_config(**overrides)).train()
    criterion = SetCriterion(5, HungarianMatcher(), {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(2, 3, 64, 80)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = criterion.weighted_total(criterion(model(images), _targets()))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    optimizer.step()
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("transformer.decoder.") for k in moved)
    if overrides["query_type"] == "detr":
        assert "query_embed.weight" in moved and model.refpoint_embed is None
    elif not overrides.get("random_refpoints_xy"):
        assert "refpoint_embed.weight" in moved

    model.eval()
    dabdetr.save_model(model, tmp_path / "model")
    loaded = dabdetr.load_model(tmp_path / "model")
    assert loaded.config == model.config
    with torch.no_grad():
        ours, theirs = model(images), loaded(images)
    assert torch.equal(ours.pred_boxes, theirs.pred_boxes)
    assert torch.equal(ours.pred_logits, theirs.pred_logits)
    # a bare state dict (no config file) tells its query type by its keys
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "bare.safetensors"))
    bare = dabdetr.load_model(tmp_path / "bare.safetensors",
                              iter_update=model.config.iter_update,
                              query_scale_type=model.config.query_scale_type,
                              nheads=model.config.nheads,
                              query_pe_temperature=model.config.query_pe_temperature,
                              pe_temperature_h=model.config.pe_temperature_h,
                              pe_temperature_w=model.config.pe_temperature_w)
    assert bare.config.query_type == model.config.query_type
    with torch.no_grad():
        assert torch.equal(bare(images).pred_boxes, ours.pred_boxes)


def test_explicit_dab_is_the_default_bit_for_bit():
    torch.manual_seed(0)
    default = perturbed_model(tiny_config())
    torch.manual_seed(0)
    explicit = perturbed_model(tiny_config(query_type="dab", modulate_hw_attn=True,
                                           iter_update=True))
    assert default.config == explicit.config
    assert default.config.modulate_hw_attn is True and default.config.iter_update is True
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        a, b = default(images), explicit(images)
    assert torch.equal(a.pred_logits, b.pred_logits) and torch.equal(a.pred_boxes, b.pred_boxes)
    for x, y in zip(a.aux_outputs, b.aux_outputs, strict=True):
        assert torch.equal(x.pred_boxes, y.pred_boxes)


@pytest.mark.parametrize("overrides,named", [
    ({"query_type": "detr", "modulate_hw_attn": True}, "modulate_hw_attn=True"),
    ({"query_type": "anchor2d", "modulate_hw_attn": True}, "modulate_hw_attn=True"),
    ({"query_type": "detr", "iter_update": True}, "iter_update=True"),
    ({"query_type": "detr", "random_refpoints_xy": True}, "random_refpoints_xy"),
    ({"query_type": "anchor2d", "two_stage": True}, "two_stage=True"),
    ({"query_type": "detr", "dn_groups": 2}, "dn_groups"),
    ({"query_type": "dab4"}, "query_type='dab4'"),
], ids=lambda v: v if isinstance(v, str) else _ids(v))
def test_meaningless_combinations_are_refused(overrides, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")) as err:
        tiny_config(**overrides)
    assert "query_type" in str(err.value)


def test_query_type_defaults_follow_the_type():
    assert (tiny_config(query_type="anchor2d").modulate_hw_attn,
            tiny_config(query_type="anchor2d").iter_update) == (False, True)
    assert (tiny_config(query_type="detr").modulate_hw_attn,
            tiny_config(query_type="detr").iter_update) == (False, False)
    # a preset with a query-type override (how `--set query_type=detr` reaches the model)
    from dabdetr.presets import preset_config

    assert preset_config("cpu-tiny", two_stage=False, query_type="detr").iter_update is False


def _decode(model: DabDetr, images: torch.Tensor):
    """The decoder's (hs, references) of a model, by a hook on its decoder."""
    captured = {}
    hook = model.transformer.decoder.register_forward_hook(
        lambda module, args, output: captured.update(out=output))
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        hook.remove()
    return out, *captured["out"]


def test_anchor2d_boxes_grow_from_points_with_neutral_size():
    model = perturbed_model(tiny_config(query_type="anchor2d"))
    layer0 = {}
    hook = model.transformer.decoder.layers[0].register_forward_hook(
        lambda module, args, output: layer0.update(out=output))
    try:
        out, hs, references = _decode(model, torch.randn(1, 3, 64, 80))
    finally:
        hook.remove()
    assert references.shape == (2, 1, 8, 4)
    points = model.refpoint_embed.weight.sigmoid()  # [Q, 2]
    torch.testing.assert_close(references[0, 0, :, :2], points, atol=0, rtol=0)
    assert (references[..., 2:] == 0.5).all()  # no width or height in the anchor
    # layer 1's point is the centre layer 0 predicts (from its un-normed output, as upstream)
    with torch.no_grad():
        delta = model.bbox_embed(layer0["out"][0])
    centre = (delta[:, :2] + inverse_sigmoid(points)).sigmoid()
    torch.testing.assert_close(references[1, 0, :, :2], centre, atol=1e-6, rtol=0)
    logits = model.bbox_embed(hs[-1, 0])
    expected = (logits + torch.cat([inverse_sigmoid(references[-1, 0, :, :2]),
                                    torch.zeros(8, 2)], -1)).sigmoid()
    torch.testing.assert_close(out.pred_boxes[0], expected, atol=1e-6, rtol=0)


def test_detr_boxes_come_from_the_head_alone():
    model = perturbed_model(tiny_config(query_type="detr"))
    out, hs, references = _decode(model, torch.randn(1, 3, 64, 80))
    assert references is None and model.transformer.decoder.ref_point_head is None
    torch.testing.assert_close(out.pred_boxes[0], model.bbox_embed(hs[-1, 0]).sigmoid(),
                               atol=1e-6, rtol=0)
    # the positional queries are the learned vectors: moving one query's vector changes that
    # query's content path, not by way of any anchor
    with torch.no_grad():
        model.query_embed.weight[3] += 1.0
    moved = model(torch.zeros(1, 3, 64, 80))
    with torch.no_grad():
        model.query_embed.weight[3] -= 1.0
    still = model(torch.zeros(1, 3, 64, 80))
    assert (moved.pred_boxes[0, 3] - still.pred_boxes[0, 3]).abs().max() > 1e-4


def test_static_anchors_stay_put():
    for query_type in ("dab", "anchor2d"):
        model = perturbed_model(tiny_config(query_type=query_type, iter_update=False))
        _, hs, references = _decode(model, torch.randn(1, 3, 64, 80))
        assert references.shape[0] == 1 and hs.shape[0] == 2


def test_hugging_face_export_refuses_other_query_types(tmp_path):
    model = DabDetr(tiny_config(query_type="anchor2d"))
    with pytest.raises(ValueError, match="query_type='anchor2d'"):
        dabdetr.export_huggingface(model, tmp_path / "hf")


@pytest.mark.parametrize("query_type", ["anchor2d", "detr"])
def test_query_types_train_and_evaluate_through_the_engine(query_type, tmp_path):
    from dabdetr.engine.train import Trainer

    data = tiny_dataset(tmp_path / "data")
    cfg = tiny_cfg(data, tmp_path / "run", max_steps=2,
                   model_overrides={"num_queries": 10, "two_stage": False,
                                    "query_type": query_type})
    trainer = Trainer(cfg, device="cpu")
    summary = trainer.fit()
    assert summary["steps"] == 2 and trainer.model.config.query_type == query_type
    assert summary["last"]["AP50"] is not None
    reloaded = dabdetr.load_model(tmp_path / "run" / "last.pt")
    assert reloaded.config.query_type == query_type


# one dynamo export each (tens of seconds on 2 cores): "detr" (no anchors at all) with the fast
# tests, "anchor2d" with the slow ones; "dab" is the export tests' base model
@pytest.mark.parametrize("query_type", ["detr", pytest.param("anchor2d", marks=pytest.mark.slow)])
def test_query_type_exports_to_onnx(query_type, tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra (pip install dabdetr[export])")
    from dabdetr.export import PARITY_TOLERANCE, check_parity, export_onnx
    from dabdetr.runtime import OnnxDetector

    torch.manual_seed(0)
    model = perturbed_model(tiny_config(query_type=query_type, num_patterns=2))
    path = export_onnx(model, tmp_path / "m.onnx", postprocess=True, num_select=10)
    detector = OnnxDetector(path)
    assert detector.config == model.config and detector.config.query_type == query_type
    # a padded batch of two, and one unpadded image of another size
    reports = check_parity(model, detector.run, postprocess=True, num_select=10)
    assert len(reports) == 2
    assert max(max(r.values()) for r in reports) <= PARITY_TOLERANCE, reports

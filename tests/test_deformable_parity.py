"""DAB-Deformable-DETR parity with the authors' code (golden vectors of their R50 model with
2 encoder and 3 decoder layers, 30 queries), and its checkpoint formats."""

from __future__ import annotations

import pytest
import torch
from _util import tiny_deformable_config

import dabdetr
from dabdetr.models.criterion import SetCriterion
from dabdetr.models.dab_deformable_detr import DabDeformableDetr
from dabdetr.models.matcher import HungarianMatcher
from dabdetr.postprocessing import default_num_select
from dabdetr.weights import deformable

TOL = 1e-4


@pytest.fixture(scope="module")
def golden(deform_golden_dir):
    """(io, loaded model, its outputs on the golden batch): one forward for all tests."""
    io = torch.load(deform_golden_dir / "io.pt", weights_only=True)
    model = dabdetr.load_model(deform_golden_dir / "checkpoint.pth")
    images, mask = dabdetr.batch_images(io["images"])
    with torch.no_grad():
        out = model(images, mask)
    return io, model, out


def _close(ours, ref):
    torch.testing.assert_close(ours, ref.detach(), atol=TOL, rtol=0)


def test_golden_outputs_every_layer(golden):
    io, model, out = golden
    assert isinstance(model, DabDeformableDetr) and not model.training
    _close(out.pred_logits, io["pred_logits"])
    _close(out.pred_boxes, io["pred_boxes"])
    assert len(out.aux_outputs) == len(io["aux_outputs"]) == 2
    for ours, ref in zip(out.aux_outputs, io["aux_outputs"], strict=True):
        _close(ours.pred_logits, ref["pred_logits"])
        _close(ours.pred_boxes, ref["pred_boxes"])


def test_golden_postprocess_top100(golden):
    io, model, out = golden
    assert default_num_select(model.config) == io["num_select"] == 100
    results = dabdetr.postprocess(out, io["target_sizes"], num_select=100)
    for ours, ref, (h, w) in zip(results, io["results"], io["target_sizes"].tolist(), strict=True):
        assert ours["scores"].shape == (100,)
        _close(ours["scores"], ref["scores"])
        assert torch.equal(ours["labels"], ref["labels"])
        # pixel boxes, compared relative to the image size (float32 rounding of ~500 px is 3e-5)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        _close(ours["boxes"] / scale, ref["boxes"] / scale)


def test_golden_matcher_and_losses(golden):
    io, _, out = golden
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, focal_alpha=0.25)
    indices = matcher(out, io["targets"])
    assert [(q.tolist(), t.tolist()) for q, t in indices] == \
        [(list(q), list(t)) for q, t in io["matches"]]
    criterion = SetCriterion(91, matcher)
    losses = criterion(out, io["targets"])
    assert set(losses) == set(io["losses"])
    for key, expected in io["losses"].items():  # the golden terms are weighted
        weighted = float(losses[key] * criterion.weight(key))
        assert weighted == pytest.approx(float(expected), rel=TOL), key
    total = criterion.weighted_total(losses)
    assert float(total) == pytest.approx(float(io["loss_total"]), rel=TOL)


def test_golden_config_inferred(golden):
    _, model, _ = golden
    cfg = model.config
    assert (cfg.backbone, cfg.enc_layers, cfg.dec_layers, cfg.num_queries) == ("resnet50", 2, 3, 30)
    assert (cfg.dim_feedforward, cfg.num_feature_levels, cfg.enc_n_points) == (512, 4, 4)
    assert (cfg.num_classes, cfg.two_stage, cfg.num_patterns) == (91, False, 0)
    assert cfg.label_name(1) == "person"


def test_bare_state_dict_and_native_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DabDeformableDetr(tiny_deformable_config(num_patterns=2)).eval()
    # the authors' naming without args, as a bare float16 .pth: recognised by its keys
    theirs = deformable.ours_to_official(model.state_dict())
    assert "transformer.decoder.bbox_embed.0.layers.0.weight" in theirs
    torch.save({k: v.half() for k, v in theirs.items()}, tmp_path / "bare.pth")
    bare = dabdetr.load_model(tmp_path / "bare.pth", backbone="resnet18", nheads=4)
    assert isinstance(bare, DabDeformableDetr)
    assert (bare.config.num_queries, bare.config.num_patterns) == (6, 2)
    for key, value in model.state_dict().items():
        assert torch.equal(bare.state_dict()[key], value.half().float()), key
    # our format keeps the model type and every tensor exactly
    dabdetr.save_model(model, tmp_path / "native")
    again = dabdetr.load_model(tmp_path / "native")
    assert isinstance(again, DabDeformableDetr) and again.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_two_stage_keys_round_trip():
    model = DabDeformableDetr(tiny_deformable_config(two_stage=True))
    theirs = deformable.ours_to_official(model.state_dict())
    assert "transformer.enc_output.weight" in theirs
    assert "transformer.decoder.class_embed.2.weight" in theirs  # dec_layers 2 + proposal head
    ours = deformable.official_to_ours(theirs)
    assert set(ours) == set(model.state_dict())
    config = deformable.infer_config(ours, {"nheads": 4, "num_queries": 6})
    assert config == model.config.replace(id2label={})


def test_bare_checkpoint_with_inconsistent_head_copy_is_refused(tmp_path):
    model = DabDeformableDetr(tiny_deformable_config())
    theirs = deformable.ours_to_official(model.state_dict())
    theirs["transformer.decoder.bbox_embed.0.layers.0.bias"] = torch.ones(64)
    torch.save(theirs, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="differs"):
        dabdetr.load_model(tmp_path / "bad.pth")

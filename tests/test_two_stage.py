"""Query selection (config.two_stage): anchors from encoder proposals, their loss, batching."""

from __future__ import annotations

import math

import pytest
import torch
from _util import tiny_config

import dabdetr
from dabdetr.models.box_ops import inverse_sigmoid
from dabdetr.models.criterion import SetCriterion
from dabdetr.models.dab_detr import DabDetr
from dabdetr.weights.loading import export_huggingface, load_model, save_model


def _targets():
    return [
        {"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]),
         "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "labels": torch.tensor([4])},
    ]


def _model(**overrides) -> DabDetr:
    torch.manual_seed(0)
    model = DabDetr(tiny_config(two_stage=True, **overrides))
    # make the proposal scores image-dependent and non-trivial
    with torch.no_grad():
        model.query_selection.class_embed.weight.normal_(0, 1.0)
        model.query_selection.bbox_embed.layers[-1].weight.normal_(0, 0.1)
    return model


def test_anchors_are_the_best_scoring_cell_boxes():
    model = _model().eval()
    assert model.refpoint_embed is None and "refpoint_embed.weight" not in model.state_dict()
    images = torch.randn(2, 3, 128, 128)  # stride 32: 4 x 4 = 16 cells >= 8 queries
    src, pos, mask = model.encode_image(images, None)
    memory = model.transformer.encode(src, pos, mask)
    enc, anchors = model.query_selection(memory, mask, 4, 4)
    assert enc.pred_logits.shape == (2, 16, 5) and enc.pred_boxes.shape == (2, 16, 4)
    assert anchors.shape == (2, 8, 4) and not anchors.requires_grad
    for b in range(2):
        best = enc.pred_logits[b].amax(-1).topk(8).indices
        expected = inverse_sigmoid(enc.pred_boxes[b, best], 1e-3)
        torch.testing.assert_close(anchors[b], expected, atol=1e-4, rtol=1e-4)
    # proposals are centred on their cells, relative to the image
    props = model.query_selection.proposals(mask, 4, 4)
    assert torch.allclose(props[0, :4, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(props[0, ::4, 1], torch.tensor([0.125, 0.375, 0.625, 0.875]))


def test_padded_cells_are_never_selected_and_batches_are_invariant():
    model = _model(pad_invariant=True).eval()
    imgs = [torch.randn(3, 160, 160), torch.randn(3, 96, 128)]
    batch, mask = dabdetr.batch_images(imgs)
    with torch.no_grad():
        out = model(batch, mask)
        enc = out.enc_outputs
        # image 1 has 3 x 4 real cells out of 5 x 5: the others can't score
        padded = enc.pred_logits[1].amax(-1) < -1e3
        assert int(padded.sum()) == 25 - 12
        for i, img in enumerate(imgs):
            single = model(img[None])
            torch.testing.assert_close(out.pred_logits[i], single.pred_logits[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(out.pred_boxes[i], single.pred_boxes[0], atol=1e-4, rtol=0)


def test_fewer_cells_than_queries_fills_with_centred_anchors():
    """2 x 2 cells for 8 queries: the 4 cell boxes, best first, then 4 anchors (0.5, 0.5, 0.1,
    0.1) (the proposal size) in logit space: (0, 0, log(1/9), log(1/9))."""
    model = _model().eval()
    with torch.no_grad():
        src, pos, mask = model.encode_image(torch.randn(1, 3, 64, 64), None)
        memory = model.transformer.encode(src, pos, mask)
        enc, anchors = model.query_selection(memory, mask, 2, 2)
        out = model(torch.randn(1, 3, 64, 64))
    assert anchors.shape == (1, 8, 4) and out.pred_boxes.shape == (1, 8, 4)
    best = enc.pred_logits[0].amax(-1).topk(4).indices
    torch.testing.assert_close(anchors[0, :4], inverse_sigmoid(enc.pred_boxes[0, best], 1e-3),
                               atol=1e-4, rtol=1e-4)
    fill = torch.tensor([0.0, 0.0, math.log(1 / 9), math.log(1 / 9)]).expand(4, 4)
    torch.testing.assert_close(anchors[0, 4:], fill, atol=1e-6, rtol=0)


def test_small_image_beside_a_large_one_gets_centred_anchors_for_padded_picks():
    """A 64 x 64 image (2 x 2 real cells) padded to 160 x 160 (5 x 5) beside a full one: its
    top-8 includes padded cells, which become the centred default anchor, exactly as when
    the small image has only its 4 cells and the fill."""
    model = _model(pad_invariant=True).eval()
    imgs = [torch.randn(3, 160, 160), torch.randn(3, 64, 64)]
    batch, mask = dabdetr.batch_images(imgs)
    with torch.no_grad():
        src, pos, cell_mask = model.encode_image(batch, mask)
        memory = model.transformer.encode(src, pos, cell_mask)
        enc, anchors = model.query_selection(memory, cell_mask, 5, 5)
        out = model(batch, mask)
        single = model(imgs[1][None])
    assert int((~cell_mask[1]).sum()) == 4
    fill = torch.tensor([0.0, 0.0, math.log(1 / 9), math.log(1 / 9)]).expand(4, 4)
    torch.testing.assert_close(anchors[1, 4:], fill, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.pred_boxes[1], single.pred_boxes[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.pred_logits[1], single.pred_logits[0], atol=1e-4, rtol=0)


def test_encoder_losses_are_weighted_and_train_the_selection_heads():
    model = _model(dn_groups=2).train()
    criterion = SetCriterion(5)
    out = model(torch.randn(2, 3, 128, 128), targets=_targets())
    losses = criterion(out, _targets())
    for key in ("loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "loss_ce_dn", "loss_ce_0"):
        base = "_".join(key.split("_")[:2])  # loss_ce_enc -> loss_ce
        assert key in losses and criterion.weight(key) == criterion.weight_dict[base]
    assert criterion.weight("loss_giou_enc") == criterion.weight_dict["loss_giou"] == 2.0
    criterion.weighted_total(losses).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
    assert model.query_selection.bbox_embed.layers[-1].weight.grad.abs().sum() > 0


def test_save_load_round_trip_and_clear_export_refusal(tmp_path):
    model = _model().eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.two_stage
    images = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).pred_boxes, model(images).pred_boxes,
                                   atol=0, rtol=0)
    with pytest.raises(ValueError, match="two_stage"):
        export_huggingface(model, tmp_path / "hf")


def test_proposal_size_is_validated():
    with pytest.raises(ValueError, match="two_stage_proposal_size"):
        tiny_config(two_stage=True, two_stage_proposal_size=1.5)


def test_attention_maps_of_selected_queries():
    from dabdetr.visualize import query_attention

    model = _model(backbone_return_layer="layer2").eval()
    with torch.no_grad():
        out, maps = query_attention(model, torch.randn(1, 3, 64, 96))
    assert maps.shape == (1, 8, 8, 12) and out.enc_outputs.pred_logits.shape == (1, 96, 5)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(1, 8), atol=1e-5, rtol=0)


def test_one_to_many_matching_of_encoder_proposals():
    from dabdetr.models.matcher import HungarianMatcher

    calls = []

    matched = {}

    class Recording(HungarianMatcher):
        def forward(self, outputs, targets):
            indices = super().forward(outputs, targets)
            calls.append((outputs.pred_logits.shape[1], [len(q) for q, _ in indices]))
            matched[outputs.pred_logits.shape[1]] = (indices, targets)
            return indices

    model = _model().train()
    out = model(torch.randn(2, 3, 128, 128))
    losses = SetCriterion(5, Recording(), enc_match_repeat=3)(out, _targets())
    enc_calls = [c for c in calls if c[0] == 16]  # 4 x 4 cells
    assert enc_calls == [(16, [6, 3])]  # each target matched to 3 distinct cells
    assert all(c[1] == [2, 1] for c in calls if c[0] == 8)  # decoder layers stay one-to-one
    # the encoder's L1 term is the mean over its 3 x 3 matches, not their sum over 3 boxes
    indices, repeated = matched[16]
    l1 = sum(float((out.enc_outputs.pred_boxes[b, q] - repeated[b]["boxes"][t]).abs().sum())
             for b, (q, t) in enumerate(indices))
    assert float(losses["loss_bbox_enc"]) == pytest.approx(l1 / (3 * 3), rel=1e-5)


def test_layer2_output_refuses_dilation():
    with pytest.raises(ValueError, match="cannot be used with layer2"):
        DabDetr(tiny_config(backbone_return_layer="layer2", dilation=True))
    from dabdetr.models.backbone import Backbone

    with pytest.raises(ValueError, match="cannot be used with layer2"):  # built directly
        Backbone("resnet18", dilation=True, return_layer="layer2")


def test_deformable_encoder_loss_is_class_agnostic():
    """DAB-Deformable-DETR's proposals are ranked by class 0 alone, so (as the authors'
    criterion) their loss matches and classifies every target as class 0; DAB-DETR's own
    selection ranks by the best class and keeps the labels. Values against the focal loss
    of explicit one-hot targets."""
    from torchvision.ops import sigmoid_focal_loss

    from dabdetr.config import DabDeformableDetrConfig, DabDetrConfig
    from dabdetr.model_types import class_agnostic_proposals
    from dabdetr.models.outputs import DetectionOutput

    assert class_agnostic_proposals(DabDeformableDetrConfig())
    assert not class_agnostic_proposals(DabDetrConfig())
    generator = torch.Generator().manual_seed(0)
    target_box = torch.tensor([0.3, 0.4, 0.2, 0.3])
    targets = [{"boxes": target_box[None], "labels": torch.tensor([2])}]
    # three cells; cell 1 sits exactly on the target, the others far from it
    cell_boxes = torch.tensor([[[0.8, 0.8, 0.1, 0.1], target_box.tolist(), [0.9, 0.1, 0.1, 0.1]]])
    cell_logits = torch.randn(1, 3, 3, generator=generator)
    out = DetectionOutput(torch.randn(1, 2, 3, generator=generator),
                          torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]]),
                          enc_outputs=DetectionOutput(cell_logits, cell_boxes))

    def expected(label: int) -> torch.Tensor:
        onehot = torch.zeros_like(cell_logits)
        onehot[0, 1, label] = 1.0
        return sigmoid_focal_loss(cell_logits, onehot, reduction="sum")  # / 1 box

    agnostic = SetCriterion(3, enc_class_agnostic=True)(out, targets)
    torch.testing.assert_close(agnostic["loss_ce_enc"], expected(0), atol=1e-6, rtol=1e-6)
    # the cell on the target is the match (1 - GIoU is off zero only by torchvision's eps)
    assert agnostic["loss_bbox_enc"] == 0 and abs(agnostic["loss_giou_enc"]) < 1e-5
    assert torch.equal(targets[0]["labels"], torch.tensor([2]))  # targets not modified
    aware = SetCriterion(3)(out, targets)
    torch.testing.assert_close(aware["loss_ce_enc"], expected(2), atol=1e-6, rtol=1e-6)
    assert abs(float(expected(0) - expected(2))) > 1e-2  # the two rules are told apart
    # the decoder layers keep the real labels either way
    torch.testing.assert_close(agnostic["loss_ce"], aware["loss_ce"], atol=0, rtol=0)

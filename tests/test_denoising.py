"""Denoising queries (DN-DETR): mask semantics, unchanged inference, losses."""

from __future__ import annotations

import torch
from _util import perturbed_model, tiny_config

from dabdetr.models.criterion import SetCriterion
from dabdetr.models.dab_detr import DabDetr
from dabdetr.models.denoising import build_denoising_queries


def _targets():
    return [
        {"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]),
         "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "labels": torch.tensor([4])},
    ]


def test_attention_mask_blocks_matching_from_denoising():
    embed = torch.nn.Embedding(5, 16)
    dn = build_denoising_queries(_targets(), embed, num_matching=8, groups=3, label_noise=0.5,
                                 box_noise=0.4, eps=1e-3)
    total = 3 * 2  # groups x max objects
    allowed = dn.attn_mask
    assert allowed.shape == (total + 8, total + 8)
    assert not allowed[total:, :total].any()  # matching never sees denoising
    assert allowed[total:, total:].all()
    assert allowed[:2, :2].all() and not allowed[:2, 2:total].any()  # group 0 sees only itself
    assert allowed[:total, total:].all()  # denoising sees the matching queries
    assert dn.meta["valid"][1].sum() == 3 and dn.meta["valid"][0].sum() == 6


def _pair():
    torch.manual_seed(0)
    with_dn = DabDetr(tiny_config(dn_groups=3, dropout=0.0))
    without = DabDetr(tiny_config())
    state = {k: v for k, v in with_dn.state_dict().items() if not k.startswith("label_enc.")}
    without.load_state_dict(state)
    return with_dn, without


def test_matching_outputs_unchanged_by_denoising_in_training():
    with_dn, without = _pair()
    with_dn.train()
    without.train()
    images = torch.randn(2, 3, 64, 64)
    out_dn = with_dn(images, targets=_targets())
    out = without(images, targets=_targets())
    assert out_dn.dn_outputs is not None and out_dn.dn_outputs.pred_logits.shape == (2, 6, 5)
    torch.testing.assert_close(out_dn.pred_logits, out.pred_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_dn.pred_boxes, out.pred_boxes, atol=1e-5, rtol=0)
    for a, b in zip(out_dn.aux_outputs, out.aux_outputs, strict=True):
        torch.testing.assert_close(a.pred_boxes, b.pred_boxes, atol=1e-5, rtol=0)


def test_same_weights_same_inference_with_switch_on_or_off():
    with_dn, without = _pair()
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        a = with_dn.eval()(images, targets=_targets())
        b = without.eval()(images)
    assert a.dn_outputs is None
    torch.testing.assert_close(a.pred_logits, b.pred_logits, atol=0, rtol=0)
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes, atol=0, rtol=0)


def test_denoising_losses_named_weighted_and_trained():
    with_dn, _ = _pair()
    with_dn.train()
    criterion = SetCriterion(5)
    out = with_dn(torch.randn(2, 3, 64, 64), targets=_targets())
    losses = criterion(out, _targets())
    for key in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_ce_dn_0"):
        assert key in losses and criterion.weight(key) > 0
    criterion.weighted_total(losses).backward()
    assert with_dn.label_enc.weight.grad is not None
    assert with_dn.label_enc.weight.grad.abs().sum() > 0


def test_no_objects_means_no_denoising_queries():
    with_dn, _ = _pair()
    with_dn.train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    out = with_dn(torch.randn(2, 3, 64, 64), targets=empty)
    assert out.dn_outputs is None
    assert "loss_ce_dn" not in SetCriterion(5)(out, empty)


def test_denoising_losses_are_averaged_over_groups():
    """Without noise every group holds the same queries and (the groups cannot see each other)
    gets the same outputs: 1 group or 3 give the same denoising losses, each group's loss
    divided by the number of groups."""
    one = perturbed_model(tiny_config(dn_groups=1, dn_label_noise=0.0, dn_box_noise=0.0))
    one.train()  # denoising runs in training; the perturbed box head does not reproduce them
    three = DabDetr(tiny_config(dn_groups=3, dn_label_noise=0.0, dn_box_noise=0.0)).train()
    three.load_state_dict(one.state_dict())
    images = torch.randn(2, 3, 64, 64)
    criterion = SetCriterion(5)
    with torch.no_grad():
        losses_one = criterion(one(images, targets=_targets()), _targets())
        losses_three = criterion(three(images, targets=_targets()), _targets())
    dn_keys = [k for k in losses_one if "_dn" in k]
    assert len(dn_keys) == 6  # 3 terms x (last layer + 1 auxiliary layer)
    for key in dn_keys:
        assert float(losses_one[key]) > 0.01, key
        torch.testing.assert_close(losses_three[key], losses_one[key], atol=1e-5, rtol=1e-5,
                                   msg=key)


def test_denoising_queries_are_their_targets_with_bounded_noise():
    """Without noise each denoising query is its own target's box and label, and
    `dn_match_indices` pairs it with that target; with box noise s the centre moves by at most
    s * (w/2, h/2) and w, h by at most s * (w, h), and the moves reach near those bounds."""
    from dabdetr.models.denoising import dn_match_indices

    torch.manual_seed(0)
    embed = torch.nn.Embedding(5, 8)
    targets = [{"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2],
                                       [0.5, 0.6, 0.1, 0.4]]),
                "labels": torch.tensor([1, 3, 2])},
               {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "labels": torch.tensor([4])}]
    exact = build_denoising_queries(targets, embed, 10, 3, 0.0, 0.0, 1e-5)
    for b, (queries, index) in enumerate(dn_match_indices(exact.meta)):
        boxes = exact.anchors[b, queries].sigmoid()
        torch.testing.assert_close(boxes, targets[b]["boxes"][index], atol=1e-5, rtol=0)
        torch.testing.assert_close(exact.content[b, queries], embed(targets[b]["labels"][index]))
    # box noise: many groups of one well-inside box, so the clamp never acts
    box = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    noisy = build_denoising_queries([{"boxes": box, "labels": torch.tensor([0])}], embed, 10,
                                    400, 0.0, 0.5, 1e-5)
    moved = (noisy.anchors[0].sigmoid() - box).abs()  # (400, 4)
    bound = 0.5 * torch.tensor([0.1, 0.2, 0.2, 0.4])  # s * (w/2, h/2, w, h)
    assert (moved <= bound + 1e-5).all()
    assert (moved.amax(0) > 0.9 * bound).all()

"""Hungarian matcher and set criterion: golden parity with the official code, and properties."""

from __future__ import annotations

import copy

import pytest
import torch

from dabdetr.models.criterion import SetCriterion
from dabdetr.models.matcher import HungarianMatcher
from dabdetr.models.outputs import DetectionOutput

NUM_CLASSES = 91


@pytest.fixture(scope="module")
def golden(golden_dir) -> dict:
    return torch.load(golden_dir / "io.pt", weights_only=True)


def golden_outputs(io: dict) -> DetectionOutput:
    aux = [DetectionOutput(a["pred_logits"], a["pred_boxes"]) for a in io["aux_outputs"]]
    return DetectionOutput(io["pred_logits"], io["pred_boxes"], aux_outputs=aux)


def random_batch(
    sizes: list[int], num_queries: int = 12, num_classes: int = 5, num_aux: int = 1, seed: int = 0
) -> tuple[DetectionOutput, list[dict]]:
    g = torch.Generator().manual_seed(seed)

    def layer() -> DetectionOutput:
        logits = torch.randn(len(sizes), num_queries, num_classes, generator=g)
        boxes = torch.rand(len(sizes), num_queries, 4, generator=g) * 0.5 + 0.25
        return DetectionOutput(logits.requires_grad_(), boxes.requires_grad_())

    out = layer()
    out.aux_outputs = [layer() for _ in range(num_aux)]
    targets = [
        {
            "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25,
            "labels": torch.randint(0, num_classes, (n,), generator=g),
        }
        for n in sizes
    ]
    return out, targets


def as_lists(indices) -> list[tuple[list[int], list[int]]]:
    return [(q.tolist(), t.tolist()) for q, t in indices]


# --- golden parity -------------------------------------------------------------------------------


def test_matcher_matches_golden(golden):
    indices = HungarianMatcher()(golden_outputs(golden), golden["targets"])
    assert as_lists(indices) == [(list(q), list(t)) for q, t in golden["matches"]]
    for q, t in indices:
        assert q.dtype == t.dtype == torch.int64


def test_criterion_matches_golden(golden):
    criterion = SetCriterion(NUM_CLASSES)
    losses = criterion(golden_outputs(golden), golden["targets"])
    assert set(losses) == set(golden["losses"])
    for key, expected in golden["losses"].items():
        weighted = (losses[key] * criterion.weight(key)).item()
        assert weighted == pytest.approx(expected, rel=1e-4), key
    total = criterion.weighted_total(losses).item()
    assert total == pytest.approx(float(golden["loss_total"]), rel=1e-4)


def test_dict_and_dataclass_inputs_agree(golden):
    as_dict = {
        "pred_logits": golden["pred_logits"],
        "pred_boxes": golden["pred_boxes"],
        "aux_outputs": golden["aux_outputs"],
    }
    matcher, criterion = HungarianMatcher(), SetCriterion(NUM_CLASSES)
    outputs = golden_outputs(golden)
    assert as_lists(matcher(as_dict, golden["targets"])) == as_lists(
        matcher(outputs, golden["targets"])
    )
    a, b = criterion(as_dict, golden["targets"]), criterion(outputs, golden["targets"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# --- matcher properties --------------------------------------------------------------------------


def _reference_matches(out: DetectionOutput, targets: list[dict], alpha: float, gamma: float
                       ) -> list[tuple[list[int], list[int]]]:
    """The matching cost written out per image in float64 (class 2, L1 5, GIoU 2, the focal
    class terms with `alpha` and `gamma`), solved by scipy."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_convert, generalized_box_iou

    result = []
    for logits, boxes, t in zip(out.pred_logits.double(), out.pred_boxes.double(), targets,
                                strict=True):
        p = logits.sigmoid()[:, t["labels"]]  # (Q, N)
        pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
        neg = (1 - alpha) * p**gamma * -(1 - p + 1e-8).log()
        tgt = t["boxes"].double()
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                   box_convert(tgt, "cxcywh", "xyxy"))
        cost = 2 * (pos - neg) + 5 * torch.cdist(boxes, tgt, p=1) - 2 * giou
        q, j = linear_sum_assignment(cost.detach().numpy())
        result.append((q.tolist(), j.tolist()))
    return result


def test_matcher_uses_focal_alpha_and_gamma():
    """The default matcher's assignments are those of the focal cost with alpha 0.25 and gamma
    2 (the authors'), on a batch where another alpha or gamma assigns differently."""
    out, targets = random_batch([4] * 64, num_queries=6, num_classes=3, num_aux=0, seed=7)
    with torch.no_grad():
        out.pred_logits.mul_(3)  # confident scores: the focal terms decide between queries
    expected = _reference_matches(out, targets, alpha=0.25, gamma=2.0)
    assert as_lists(HungarianMatcher()(out, targets)) == expected
    for alpha, gamma in ((0.5, 2.0), (0.75, 2.0), (0.25, 1.0), (0.25, 0.0), (0.25, 3.0)):
        assert _reference_matches(out, targets, alpha, gamma) != expected, (alpha, gamma)
    custom = HungarianMatcher(focal_alpha=0.5, focal_gamma=1.0)
    assert as_lists(custom(out, targets)) == _reference_matches(out, targets, 0.5, 1.0)


def test_matcher_batched_equals_one_by_one():
    out, targets = random_batch([3, 0, 5], num_aux=0)
    batched = as_lists(HungarianMatcher()(out, targets))
    for i, t in enumerate(targets):
        single = DetectionOutput(out.pred_logits[i : i + 1], out.pred_boxes[i : i + 1])
        assert as_lists(HungarianMatcher()(single, [t]))[0] == batched[i]


def test_query_permutation_permutes_matches():
    out, targets = random_batch([4, 6], num_aux=0)
    perm = torch.randperm(out.pred_logits.shape[1], generator=torch.Generator().manual_seed(1))
    permuted = DetectionOutput(out.pred_logits[:, perm], out.pred_boxes[:, perm])
    matcher = HungarianMatcher()
    for (q, t), (pq, pt) in zip(matcher(out, targets), matcher(permuted, targets), strict=True):
        assert pq.tolist() == sorted(pq.tolist())
        # Permuted query p is original query perm[p]: same target assignment.
        assert dict(zip(perm[pq].tolist(), pt.tolist(), strict=True)) == dict(
            zip(q.tolist(), t.tolist(), strict=True)
        )


def test_matcher_empty_targets():
    out, targets = random_batch([0, 2, 0], num_aux=0)
    indices = HungarianMatcher()(out, targets)
    assert [len(q) for q, _ in indices] == [0, 2, 0]
    assert all(q.dtype == torch.int64 and t.dtype == torch.int64 for q, t in indices)
    out, targets = random_batch([0, 0], num_aux=0)
    assert [len(q) + len(t) for q, t in HungarianMatcher()(out, targets)] == [0, 0]


def test_matcher_more_targets_than_queries():
    out, targets = random_batch([7], num_queries=4, num_aux=0)
    ((q, t),) = HungarianMatcher()(out, targets)
    assert q.tolist() == [0, 1, 2, 3] and len(set(t.tolist())) == 4


def test_matcher_non_finite_cost_names_image():
    out, targets = random_batch([2, 2], num_aux=0)
    out.pred_boxes.data[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="image 1"):
        HungarianMatcher()(out, targets)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"labels": torch.tensor([0])}, "'boxes'"),
        ({"boxes": torch.rand(2, 3), "labels": torch.tensor([0, 1])}, r"\[N, 4\]"),
        ({"boxes": torch.rand(2, 4), "labels": torch.tensor([0])}, "one per box"),
        ({"boxes": torch.rand(1, 4), "labels": torch.tensor([0.0])}, "int64"),
    ],
)
def test_malformed_targets(bad, match):
    out, targets = random_batch([1, 1], num_aux=0)
    with pytest.raises(ValueError, match=match):
        HungarianMatcher()(out, [targets[0], bad])


# --- criterion properties ------------------------------------------------------------------------


def test_out_of_range_label_is_named():
    out, targets = random_batch([2, 1], num_classes=5)
    targets[1]["labels"] = torch.tensor([7])
    with pytest.raises(ValueError, match=r"targets\[1\].*\[7\]"):
        SetCriterion(5)(out, targets)
    with pytest.raises(ValueError, match=r"\[7\]"):
        HungarianMatcher()(out, targets)
    # the first offending image is named, negative indices too, and empty images pass over
    out, targets = random_batch([0, 2, 1], num_classes=5)
    targets[1]["labels"] = torch.tensor([4, -1])
    targets[2]["labels"] = torch.tensor([5])
    with pytest.raises(ValueError, match=r"targets\[1\].*\[-1\]"):
        SetCriterion(5)(out, targets)
    targets[1]["labels"] = torch.tensor([4, 0])
    with pytest.raises(ValueError, match=r"targets\[2\].*\[5\]"):
        SetCriterion(5)(out, targets)


def test_weight_dict_covers_every_key_and_extra_keys_ignored():
    for num_aux in (0, 1, 4):
        out, targets = random_batch([2, 3], num_aux=num_aux)
        for t in targets:
            t.update(image_id=torch.tensor(3), size=torch.tensor([10, 20]))
        criterion = SetCriterion(5)
        losses = criterion(out, targets)
        assert set(losses) == set(criterion.weight_dict_for(num_aux))
        assert all(criterion.weight(k) == criterion.weight_dict_for(num_aux)[k] for k in losses)
        assert len(losses) == 3 * (num_aux + 1)
    with pytest.raises(ValueError, match="no weight"):
        SetCriterion(5).weighted_total({"loss_mask_9": torch.tensor(1.0)})


def test_gradients_reach_every_layer():
    out, targets = random_batch([3, 2], num_aux=2)
    criterion = SetCriterion(5)
    criterion.weighted_total(criterion(out, targets)).backward()
    for layer in [out, *out.aux_outputs]:
        for t in (layer.pred_logits, layer.pred_boxes):
            assert t.grad is not None and t.grad.abs().sum() > 0 and t.grad.isfinite().all()


def test_empty_targets_push_towards_background():
    out, targets = random_batch([0, 0], num_aux=1)
    criterion = SetCriterion(5)
    losses = criterion(out, targets)
    for k in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"):
        assert losses[k].item() == 0.0
    assert losses["loss_ce"].item() > 0
    losses["loss_ce"].backward()
    assert (out.pred_logits.grad > 0).all()  # lowering every logit lowers the loss


def test_mixed_empty_targets():
    out, targets = random_batch([0, 3], num_aux=1)
    losses = SetCriterion(5)(out, targets)
    assert all(v.isfinite() for v in losses.values())
    assert losses["loss_bbox"] > 0


def test_perfect_prediction_has_zero_box_losses():
    out, targets = random_batch([3, 2], num_queries=6, num_aux=0)
    boxes = out.pred_boxes.detach().clone()
    for i, t in enumerate(targets):
        boxes[i, : len(t["boxes"])] = t["boxes"]
    losses = SetCriterion(5)(DetectionOutput(out.pred_logits, boxes), targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-5)


def test_num_boxes_clamp_and_normalization():
    assert SetCriterion.num_boxes([{"labels": torch.zeros(0)}] * 2, torch.device("cpu")) == 1.0
    assert SetCriterion.num_boxes([{"labels": torch.zeros(2)}] * 3, torch.device("cpu")) == 6.0
    # One box: the clamp leaves num_boxes = 1, so loss_bbox is the plain L1 sum of the match.
    out, targets = random_batch([1], num_aux=0)
    ((q, t),) = HungarianMatcher()(out, targets)
    expected = (out.pred_boxes[0, q] - targets[0]["boxes"][t]).abs().sum()
    torch.testing.assert_close(SetCriterion(5)(out, targets)["loss_bbox"], expected)


def test_inputs_not_mutated():
    out, targets = random_batch([2, 3], num_aux=1)
    before = copy.deepcopy(targets), out.pred_logits.detach().clone()
    SetCriterion(5)(out, targets)
    for t, b in zip(targets, before[0], strict=True):
        assert t.keys() == b.keys() and all(torch.equal(t[k], b[k]) for k in t)
    assert torch.equal(out.pred_logits, before[1])


def test_match_repeat_assigns_each_target_k_times():
    out, targets = random_batch([2, 3], num_queries=12, num_aux=1)
    one_to_one = SetCriterion(5)(out, targets)
    with torch.no_grad():
        torch.testing.assert_close(SetCriterion(5, match_repeat=1)(out, targets), one_to_one)
        # Only the last layer (decoder layer 1) repeats: aux layer 0 is unchanged.
        repeated = SetCriterion(5, match_repeat=3, match_repeat_layers=[1])(out, targets)
    torch.testing.assert_close(repeated["loss_ce_0"], one_to_one["loss_ce_0"])
    assert not torch.equal(repeated["loss_ce"], one_to_one["loss_ce"])


def test_match_repeat_matches_each_target_k_times():
    class RecordingMatcher(HungarianMatcher):
        def forward(self, outputs, targets):
            indices = super().forward(outputs, targets)
            self.calls.append((indices, [len(t["labels"]) for t in targets]))
            return indices

    matcher = RecordingMatcher()
    matcher.calls = []
    out, targets = random_batch([2, 3], num_queries=12, num_aux=0)
    SetCriterion(5, matcher=matcher, match_repeat=3)(out, targets)
    ((indices, repeated_sizes),) = matcher.calls
    assert repeated_sizes == [6, 9]
    for (q, t), n in zip(indices, [2, 3], strict=True):
        assert len(set(q.tolist())) == 3 * n  # distinct queries
        assert sorted((t % n).tolist()) == sorted(list(range(n)) * 3)


def test_weights_are_fixed_at_construction():
    """forward never edits the weight table: the same weights before and after, for any
    number of auxiliary layers, and the table cannot be edited from outside."""
    criterion = SetCriterion(5, weight_dict={"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    before = dict(criterion.weight_dict)
    for num_aux in (0, 3):
        out, targets = random_batch([2, 1], num_aux=num_aux)
        losses = criterion(out, targets)
        assert dict(criterion.weight_dict) == before
        assert criterion.weight("loss_ce_2" if num_aux else "loss_ce") == 2.0
        total = sum(v * before["_".join(k.split("_")[:2])] for k, v in losses.items())
        torch.testing.assert_close(criterion.weighted_total(losses), total)
    with pytest.raises(TypeError):
        criterion.weight_dict["loss_ce"] = 1.0
    with pytest.raises(KeyError):
        criterion.weight("loss_mask")

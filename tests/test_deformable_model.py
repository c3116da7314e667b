"""DAB-Deformable-DETR on tiny random models: shapes, options, properties, errors."""

from __future__ import annotations

import pytest
import torch
from _util import tiny_deformable_config

import dabdetr
from dabdetr.config import DabDeformableDetrConfig
from dabdetr.model_types import build_model
from dabdetr.models.criterion import SetCriterion
from dabdetr.models.dab_deformable_detr import DabDeformableDetr
from dabdetr.models.deformable_transformer import encoder_reference_points, valid_ratios_of


def _batch():
    torch.manual_seed(1)
    return dabdetr.batch_images([torch.randn(3, 96, 128), torch.randn(3, 64, 100)])


def _targets():
    return [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[0.3, 0.4, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2]]),
             "labels": torch.tensor([2, 4])}]


@pytest.mark.parametrize("variant", [{}, {"num_patterns": 2}, {"num_feature_levels": 1},
                                     {"num_feature_levels": 5}, {"two_stage": True}],
                         ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "base")
def test_forward_shapes_and_training_step(variant):
    model = DabDeformableDetr(tiny_deformable_config(**variant))
    images, mask = _batch()
    before = images.clone()
    out = model(images, mask)
    n = 6 * max(1, variant.get("num_patterns", 0))
    assert out.pred_logits.shape == (2, n, 5) and out.pred_boxes.shape == (2, n, 4)
    assert len(out.aux_outputs) == 1
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()
    assert torch.equal(images, before)
    assert (out.enc_outputs is not None) == bool(variant.get("two_stage"))
    criterion = SetCriterion(5)
    losses = criterion(out, _targets())
    criterion.weighted_total(losses).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "transformer.encoder.layers.0.self_attn.sampling_offsets.weight" in grads
    assert "bbox_embed.0.layers.2.weight" in grads  # box head 0 trained through its outputs


def test_padding_fills_nothing_when_image_fills_batch():
    """An unpadded batch of one gives the same result with mask None and an all-False mask."""
    model = DabDeformableDetr(tiny_deformable_config()).eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a = model(image)
        b = model(image, torch.zeros(1, 64, 96, dtype=torch.bool))
    torch.testing.assert_close(a.pred_logits, b.pred_logits, rtol=0, atol=0)


def test_init_follows_upstream():
    model = DabDeformableDetr(tiny_deformable_config())
    torch.testing.assert_close(model.class_embed[1].weight, model.class_embed[0].weight)
    assert torch.all(model.bbox_embed[0].layers[-1].bias[2:] == -2)
    assert torch.all(model.bbox_embed[1].layers[-1].bias == 0)
    two = DabDeformableDetr(tiny_deformable_config(two_stage=True))
    assert torch.all(two.bbox_embed[0].layers[-1].bias == 0) and len(two.class_embed) == 3


def test_reference_points_and_valid_ratios():
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 3:] = True
    ratios = valid_ratios_of(mask)
    torch.testing.assert_close(ratios, torch.tensor([[1.0, 1.0], [0.5, 0.75]]))
    ref = encoder_reference_points(torch.tensor([[4, 6]]), ratios[:, None])
    assert ref.shape == (2, 24, 1, 2)
    # after scaling by the valid ratio again, cell (i, j) sits at its centre of the full map
    torch.testing.assert_close(ref[1, 7, 0], torch.tensor([1.5 / 6, 1.5 / 4]))


def test_build_model_and_config_errors():
    assert isinstance(build_model(tiny_deformable_config()), DabDeformableDetr)
    with pytest.raises(ValueError, match="multiple of 32"):
        DabDeformableDetrConfig(hidden_dim=48, nheads=4)
    with pytest.raises(ValueError, match="num_patterns"):
        DabDeformableDetrConfig(two_stage=True, num_patterns=2)
    model = DabDeformableDetr(tiny_deformable_config())
    with pytest.raises(ValueError, match="images must be"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="mask must be"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, 16, 16, dtype=torch.bool))


def test_huggingface_export_refused(tmp_path):
    model = DabDeformableDetr(tiny_deformable_config())
    with pytest.raises(ValueError, match="transformers has no dab-deformable-detr"):
        dabdetr.export_huggingface(model, tmp_path / "x")


def test_two_stage_needs_enough_cells():
    model = DabDeformableDetr(tiny_deformable_config(two_stage=True, num_queries=100)).eval()
    with pytest.raises(ValueError, match="encoder cells"):
        model(torch.randn(1, 3, 64, 64))  # 8x8 + 4x4 + 2x2 + 1x1 = 85 cells


def test_bf16_autocast_keeps_outputs_float32():
    model = DabDeformableDetr(tiny_deformable_config()).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 80))
    assert out.pred_logits.dtype == out.pred_boxes.dtype == torch.float32


def test_attention_maps_refused_clearly():
    from dabdetr.visualize import query_attention

    model = DabDeformableDetr(tiny_deformable_config()).eval()
    with pytest.raises(ValueError, match="without --explain"):
        query_attention(model, torch.randn(1, 3, 64, 64))

"""Parity with the authors' code (golden vectors) and with transformers' DabDetr."""

from __future__ import annotations

import warnings

import pytest
import torch
from _util import import_oracle, tiny_config

import dabdetr
from dabdetr.weights import huggingface

transformers = import_oracle("transformers")

TOL = 1e-4  # the authors' golden vectors (their README: outputs agree to about 1e-5)
HF_TOL = 1e-5  # transformers, same float32 arithmetic on this machine


def test_golden_outputs_and_postprocess(golden_dir):
    io = torch.load(golden_dir / "io.pt", weights_only=True)
    model = dabdetr.load_model(golden_dir / "checkpoint.pth")
    assert not model.training
    images, mask = dabdetr.batch_images(io["images"])
    assert images.shape == (2, 3, 160, 224)
    with torch.no_grad():
        out = model(images, mask)
    torch.testing.assert_close(out.pred_logits, io["pred_logits"], atol=TOL, rtol=0)
    torch.testing.assert_close(out.pred_boxes, io["pred_boxes"], atol=TOL, rtol=0)
    assert len(out.aux_outputs) == len(io["aux_outputs"]) == 2
    for ours, ref in zip(out.aux_outputs, io["aux_outputs"], strict=True):
        torch.testing.assert_close(ours.pred_logits, ref["pred_logits"], atol=TOL, rtol=0)
        torch.testing.assert_close(ours.pred_boxes, ref["pred_boxes"], atol=TOL, rtol=0)
    results = dabdetr.postprocess(out, io["target_sizes"], num_select=io["num_select"])
    for ours, ref in zip(results, io["results"], strict=True):
        torch.testing.assert_close(ours["scores"], ref["scores"], atol=TOL, rtol=0)
        assert torch.equal(ours["labels"], ref["labels"])
        torch.testing.assert_close(ours["boxes"], ref["boxes"], atol=1e-3, rtol=1e-6)


def test_golden_config_inferred(golden_dir):
    model = dabdetr.load_model(golden_dir / "checkpoint.pth")
    cfg = model.config
    assert (cfg.backbone, cfg.enc_layers, cfg.dec_layers, cfg.num_queries) == ("resnet18", 2, 3, 20)
    assert (cfg.dim_feedforward, cfg.num_classes, cfg.activation) == (256, 91, "prelu")
    assert cfg.label_name(1) == "person" and cfg.label_name(90) == "toothbrush"


def _random_hf(seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.DabDetrConfig(
        backbone="resnet18", encoder_layers=2, decoder_layers=3, num_queries=7,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=5, auxiliary_loss=True, dropout=0.0,
        **kw)
    model = transformers.DabDetrForObjectDetection(cfg).eval()
    with torch.no_grad():  # perturb so no zero-initialised layer hides a mistake
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, buf in model.named_buffers():
            if "running_var" in name:
                buf.uniform_(0.5, 1.5)
            elif buf.is_floating_point():
                buf.add_(torch.randn_like(buf) * 0.1)
        # anchors spread over the logit range (std 1), not the near-0.5 default boxes, so a
        # swapped width/height modulation or a mixed-up coordinate changes the output visibly
        anchors = model.model.query_refpoint_embeddings.weight
        anchors.copy_(torch.randn_like(anchors))
    return model


def _padded_batch():
    torch.manual_seed(1)
    return dabdetr.batch_images([torch.randn(3, 96, 128), torch.randn(3, 64, 100)])


def _hf_forward(model, images, mask):
    with torch.no_grad():
        return model(pixel_values=images, pixel_mask=(~mask).long())


VARIANTS = [{}, {"num_patterns": 2}, {"dilation": True}, {"keep_query_pos": True},
            {"temperature_height": 10, "temperature_width": 40}, {"random_refpoints_xy": True},
            {"activation_function": "relu"}]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(v) or "base")
def test_transformers_to_ours_and_back(tmp_path, variant):
    hf = _random_hf(**variant)
    hf.save_pretrained(tmp_path / "hf")
    ours = dabdetr.load_model(tmp_path / "hf")
    assert ours.config.inverse_sigmoid_eps == 1e-5
    images, mask = _padded_batch()
    with torch.no_grad():
        out = ours(images, mask)
    ref = _hf_forward(hf, images, mask)
    torch.testing.assert_close(out.pred_logits, ref.logits, atol=HF_TOL, rtol=0)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=HF_TOL, rtol=0)
    # auxiliary layers: transformers exposes them through its heads on intermediate states
    with torch.no_grad():
        inner = hf.model(pixel_values=images, pixel_mask=(~mask).long())
        hs = inner.intermediate_hidden_states
        aux_logits = hf.class_embed(hs)
    for i, aux in enumerate(out.aux_outputs):
        torch.testing.assert_close(aux.pred_logits, aux_logits[i], atol=HF_TOL, rtol=0)

    # ours -> HF directory -> transformers gives the same outputs
    dabdetr.export_huggingface(ours, tmp_path / "exported")
    hf2 = transformers.DabDetrForObjectDetection.from_pretrained(tmp_path / "exported").eval()
    ref2 = _hf_forward(hf2, images, mask)
    torch.testing.assert_close(out.pred_logits, ref2.logits, atol=HF_TOL, rtol=0)
    torch.testing.assert_close(out.pred_boxes, ref2.pred_boxes, atol=HF_TOL, rtol=0)

    # lossless round trips: HF -> ours -> HF, ours -> native -> ours
    original = hf.state_dict()
    for key, value in hf2.state_dict().items():
        assert torch.equal(value, original[key]), key
    dabdetr.save_model(ours, tmp_path / "native")
    again = dabdetr.load_model(tmp_path / "native")
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    assert again.config == ours.config


def test_export_refuses_what_transformers_cannot_express(tmp_path):
    model = dabdetr.DabDetr(tiny_config(query_scale_type="cond_scalar"))
    with pytest.raises(ValueError, match="cond_scalar"):
        dabdetr.export_huggingface(model, tmp_path / "x")


def test_export_warns_on_eps_difference(tmp_path):
    model = dabdetr.DabDetr(tiny_config())  # eps 1e-3 (upstream)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dabdetr.export_huggingface(model, tmp_path / "x")
    assert any("eps" in str(w.message) for w in caught)


def test_key_table_round_trip_is_identity():
    hf = _random_hf(num_patterns=2)
    ours, unknown = huggingface.hf_to_ours(hf.state_dict())
    assert unknown == []
    back = huggingface.ours_to_hf(ours)
    assert set(back) == set(hf.state_dict())

"""Model properties: batching, options, input safety, the fixxy freeze."""

from __future__ import annotations

import math

import pytest
import torch
from _util import perturbed_model, tiny_config

import dabdetr
from dabdetr.models.dab_detr import DabDetr


def _images():
    return [torch.randn(3, 70, 90), torch.randn(3, 96, 64), torch.randn(3, 64, 64)]


def test_batch_images_layout():
    imgs = _images()
    batch, mask = dabdetr.batch_images(imgs)
    assert batch.shape == (3, 3, 96, 90) and mask.shape == (3, 96, 90) and mask.dtype == torch.bool
    assert torch.equal(batch[0, :, :70, :90], imgs[0])
    assert batch[0, :, 70:].abs().sum() == 0 and mask[0, 70:].all() and not mask[0, :70, :90].any()
    with pytest.raises(ValueError, match="empty"):
        dabdetr.batch_images([])
    with pytest.raises(ValueError, match="image 0"):
        dabdetr.batch_images([torch.randn(96, 64)])


def test_padded_batch_equals_single_images():
    model = DabDetr(tiny_config(pad_invariant=True)).eval()
    # perturb the frozen batch norms so padding would leak if the backbone saw it
    for buf in model.backbone.buffers():
        buf.add_(torch.rand_like(buf) * 0.1)
    imgs = _images()
    batch, mask = dabdetr.batch_images(imgs)
    with torch.no_grad():
        out = model(batch, mask)
        for i, img in enumerate(imgs):
            single = model(img[None])
            torch.testing.assert_close(out.pred_logits[i], single.pred_logits[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(out.pred_boxes[i], single.pred_boxes[0], atol=1e-4, rtol=0)


def test_upstream_batching_differs_but_matches_pad_invariant_on_full_size_image():
    """Upstream semantics: the largest image (no padding) is unaffected either way; a padded one
    is changed by its padding (through the batch norms' non-trivial statistics)."""
    model = perturbed_model(tiny_config())
    imgs = [torch.randn(3, 96, 96), torch.randn(3, 64, 70)]
    batch, mask = dabdetr.batch_images(imgs)
    invariant_model = DabDetr(tiny_config(pad_invariant=True)).eval()
    invariant_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        upstream = model(batch, mask)
        invariant = invariant_model(batch, mask)
        alone = model(batch[1:, :, :64, :70])
    torch.testing.assert_close(upstream.pred_boxes[0], invariant.pred_boxes[0], atol=1e-5, rtol=0)
    # the padded image: upstream's backbone sees the padding, so its output differs from the
    # image alone; the pad-invariant model gives the image-alone output
    torch.testing.assert_close(invariant.pred_boxes[1], alone.pred_boxes[0], atol=1e-4, rtol=0)
    assert (upstream.pred_boxes[1] - alone.pred_boxes[0]).abs().max() > 1e-3


def test_model_does_not_mutate_input():
    model = DabDetr(tiny_config()).eval()
    batch, mask = dabdetr.batch_images(_images())
    before, mask_before = batch.clone(), mask.clone()
    model(batch, mask)
    assert torch.equal(batch, before) and torch.equal(mask, mask_before)


@pytest.mark.parametrize("hidden_dim,nheads", [(128, 8), (96, 4), (48, 6)])
def test_any_hidden_dim_divisible_by_heads(hidden_dim, nheads):
    model = DabDetr(tiny_config(hidden_dim=hidden_dim, nheads=nheads)).eval()
    out = model(torch.randn(1, 3, 64, 96))
    assert out.pred_logits.shape == (1, 8, 5) and out.pred_boxes.shape == (1, 8, 4)
    assert all(a.pred_logits.shape == (1, 8, 5) for a in out.aux_outputs)


@pytest.mark.parametrize("overrides", [
    {"query_scale_type": "cond_scalar"},
    {"query_scale_type": "fix_elewise"},
    {"modulate_hw_attn": False},
    {"keep_query_pos": True},
    {"bbox_embed_diff_each_layer": True},
    {"iter_update": False},
    {"activation": "relu"},
    {"activation": "gelu"},
    {"pre_norm": True},
    {"position_embedding": "learned"},
    {"num_patterns": 3},
    {"random_refpoints_xy": True},
    {"aux_loss": False},
    {"dilation": True},
    {"backbone_return_layer": "layer3"},
    {"backbone_return_layer": "layer2"},
    {"two_stage": True, "num_patterns": 3},
    {"backbone_norm": "batch", "backbone_trainable_layers": 5},
    {"query_pe_temperature": 20.0, "pe_temperature_h": 10.0, "pe_temperature_w": 10.0},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options_run_and_train(overrides):
    """Each option changes what the model computes (with the default model's weights wherever
    names and shapes agree), except the two that only change initialization or what is
    returned, and every trainable parameter gets a gradient."""
    base = perturbed_model(tiny_config()).train()  # no zero-initialized head hides an option
    model = perturbed_model(tiny_config(**overrides)).train()
    shared = {k: v for k, v in base.state_dict().items()
              if k in model.state_dict() and model.state_dict()[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = base(images)
    out = model(images)
    patterns = overrides.get("num_patterns", 0)
    assert out.pred_logits.shape == (2, 8 * max(1, patterns), 5)
    assert len(out.aux_outputs) == (0 if overrides.get("aux_loss") is False else 1)
    if patterns:  # the pattern groups share anchors but not content: their outputs differ
        assert (out.pred_boxes[:, :8] - out.pred_boxes[:, 8:16]).abs().max() > 1e-4
    elif "aux_loss" in overrides or "random_refpoints_xy" in overrides:
        torch.testing.assert_close(out.pred_logits, ref.pred_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=1e-6, rtol=0)
    else:
        assert (out.pred_logits - ref.pred_logits).abs().max() > 1e-4
        assert (out.pred_boxes - ref.pred_boxes).abs().max() > 1e-4
    heads = [out] if out.enc_outputs is None else [out, out.enc_outputs]
    sum(h.pred_logits.sum() + h.pred_boxes.sum() for h in heads).backward()
    assert model.class_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _sine_hw_reference(height: int, width: int, hidden_dim: int, temp_h: float,
                       temp_w: float) -> torch.Tensor:
    """The DAB-DETR image embedding of an unpadded height x width map, written out in float64:
    channel k of the y half is sin (k even) or cos (k odd) of y / temp_h ** (2 * (k // 2) / F)
    with y = 2 pi (row + 1) / height, F = hidden_dim / 2; the x half likewise with temp_w."""
    feats = hidden_dim // 2
    out = torch.zeros(hidden_dim, height, width, dtype=torch.float64)
    for k in range(feats):
        fn = math.sin if k % 2 == 0 else math.cos
        for i in range(height):
            out[k, i, :] = fn(2 * math.pi * (i + 1) / height / temp_h ** (2 * (k // 2) / feats))
        for j in range(width):
            out[feats + k, :, j] = fn(
                2 * math.pi * (j + 1) / width / temp_w ** (2 * (k // 2) / feats))
    return out


def test_image_position_embedding_uses_height_and_width_temperatures():
    """Rows use pe_temperature_h and columns pe_temperature_w, in the module and in the model
    built from a config where the two differ."""
    from dabdetr.models.position_encoding import PositionEmbeddingSineHW

    expected = _sine_hw_reference(3, 5, 16, 10.0, 1000.0).float()
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    module = PositionEmbeddingSineHW(16, temperature_h=10.0, temperature_w=1000.0)
    torch.testing.assert_close(module(mask)[0], expected, atol=1e-5, rtol=0)
    model = DabDetr(tiny_config(hidden_dim=16, nheads=2, pe_temperature_h=10.0,
                                pe_temperature_w=1000.0))
    torch.testing.assert_close(model.position_embedding(mask)[0], expected, atol=1e-5, rtol=0)


def test_inverse_sigmoid_clamps_at_its_eps():
    """log(x / (1 - x)) with both terms clamped to >= eps: 1e-3 by default (the authors')."""
    from dabdetr.models import box_ops

    x = torch.tensor([0.0, 1e-4, 0.3, 1 - 1e-4, 1.0], dtype=torch.float64)
    expected = [math.log(1e-3), math.log(1e-3 / (1 - 1e-4)), math.log(0.3 / 0.7),
                math.log((1 - 1e-4) / 1e-3), -math.log(1e-3)]
    torch.testing.assert_close(box_ops.inverse_sigmoid(x).tolist(), expected)
    expected_1e5 = [math.log(1e-5), math.log(1e-4 / (1 - 1e-4)), math.log(0.3 / 0.7),
                    math.log((1 - 1e-4) / 1e-4), -math.log(1e-5)]
    torch.testing.assert_close(box_ops.inverse_sigmoid(x, 1e-5).tolist(), expected_1e5)


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_boxes_use_the_configured_inverse_sigmoid_eps(eps):
    """With the box heads' last layers at their zero initialization, each decoder layer's box
    is sigmoid(inverse_sigmoid(its reference, eps)) and the next layer's reference: from an
    anchor of sigmoid(-8) = 3.4e-4, eps 1e-5 keeps it and eps 1e-3 lifts it to about 1e-3."""
    model = DabDetr(tiny_config(inverse_sigmoid_eps=eps)).eval()
    with torch.no_grad():
        model.refpoint_embed.weight.fill_(-8.0)
        out = model(torch.randn(1, 3, 64, 64))
    reference = 1 / (1 + math.exp(8.0))
    for layer in (*out.aux_outputs, out):
        logit = math.log(max(reference, eps) / max(1 - reference, eps))
        reference = 1 / (1 + math.exp(-logit))
        torch.testing.assert_close(layer.pred_boxes, torch.full_like(layer.pred_boxes, reference),
                                   atol=1e-8, rtol=1e-5)


def test_options_survive_save_and_load(tmp_path):
    cfg = tiny_config(query_scale_type="fix_elewise", bbox_embed_diff_each_layer=True,
                      num_patterns=2, keep_query_pos=True, activation="gelu",
                      position_embedding="learned", pre_norm=True)
    model = DabDetr(cfg).eval()
    dabdetr.save_model(model, tmp_path / "m")
    loaded = dabdetr.load_model(tmp_path / "m")
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x).pred_boxes, loaded(x).pred_boxes)


@pytest.mark.parametrize("backbone", ["resnet34", "resnet50", "resnet101"])
def test_backbones_build(backbone):
    model = DabDetr(tiny_config(backbone=backbone))
    assert model.backbone.num_channels == (512 if backbone == "resnet34" else 2048)
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("body.conv1", "body.layer1")) for n in frozen)
    assert all(p.requires_grad for n, p in model.backbone.named_parameters()
               if n.startswith(("body.layer2", "body.layer3", "body.layer4")))


def test_fixxy_freeze_keeps_xy_and_moves_wh():
    model = DabDetr(tiny_config(random_refpoints_xy=True))
    before = model.refpoint_embed.weight.detach().clone()
    assert ((before[:, :2].sigmoid() > 0) & (before[:, :2].sigmoid() < 1)).all()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-1)
    for _ in range(2):
        out = model(torch.randn(1, 3, 64, 64))
        (out.pred_boxes.sum() + sum(a.pred_boxes.sum() for a in out.aux_outputs)).backward()
        opt.step()
        opt.zero_grad()
    after = model.refpoint_embed.weight.detach()
    assert torch.equal(after[:, :2], before[:, :2])
    assert not torch.allclose(after[:, 2:], before[:, 2:])
    assert list(model.state_dict()).count("refpoint_embed.weight") == 1


def test_fixxy_upstream_behaviour_trains_xy():
    model = DabDetr(tiny_config(random_refpoints_xy=True, freeze_refpoints_xy=False))
    before = model.refpoint_embed.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(torch.randn(1, 3, 64, 64))
    out.pred_boxes.sum().backward()
    opt.step()
    assert not torch.allclose(model.refpoint_embed.weight[:, :2], before[:, :2])


def test_bad_config_values():
    with pytest.raises(ValueError, match="multiple of nheads"):
        tiny_config(hidden_dim=66, nheads=4)
    with pytest.raises(ValueError, match="backbone"):
        tiny_config(backbone="vgg16")
    with pytest.raises(ValueError, match="unknown"):
        tiny_config().replace(hidden_size=3)
    # refused by the config itself, before any model is built
    with pytest.raises(ValueError, match="DC5.*cannot be used with layer3 output"):
        tiny_config(dilation=True, backbone_return_layer="layer3")


def test_bad_model_input():
    model = DabDetr(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="mask"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64))


def test_postprocess_threshold_and_shapes():
    model = DabDetr(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    res = dabdetr.postprocess(out, [[100, 200], [50, 60]], num_select=10)
    assert [len(r["scores"]) for r in res] == [10, 10]
    # top-1 of image 0 by hand: query = index // C, label = index % C, cxcywh -> xyxy * (w, h)
    flat = out.pred_logits[0].sigmoid().flatten().argmax()
    query, label = divmod(int(flat), 5)
    cx, cy, w, h = out.pred_boxes[0, query].tolist()
    expected = torch.tensor([(cx - w / 2) * 200, (cy - h / 2) * 100, (cx + w / 2) * 200,
                             (cy + h / 2) * 100])
    assert int(res[0]["labels"][0]) == label
    torch.testing.assert_close(res[0]["boxes"][0], expected, atol=1e-3, rtol=1e-5)
    assert (res[0]["scores"][:-1] >= res[0]["scores"][1:]).all()
    cut = float(res[0]["scores"][4])
    kept = dabdetr.postprocess(out, [[100, 200], [50, 60]], num_select=10, threshold=cut)
    assert (kept[0]["scores"] >= cut).all() and len(kept[0]["scores"]) >= 5
    with pytest.raises(ValueError, match="target_sizes"):
        dabdetr.postprocess(out, [[100, 200]])


def test_query_attention_maps():
    from dabdetr.visualize import query_attention

    model = DabDetr(tiny_config()).eval()
    batch, mask = dabdetr.batch_images([torch.randn(3, 64, 96), torch.randn(3, 48, 64)])
    out, maps = query_attention(model, batch, mask)
    assert maps.shape == (2, 8, 2, 3)  # stride 32 on a 64 x 96 padded batch
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 8))
    assert maps[1, :, :, 2:].abs().sum() == 0  # the 64 px wide image's padded column
    with torch.no_grad():
        torch.testing.assert_close(out.pred_boxes, model(batch, mask).pred_boxes)


def test_predict_cli_explain_writes_attention_grid(tmp_path):
    from PIL import Image

    from dabdetr.cli import main

    model = DabDetr(tiny_config()).eval()
    dabdetr.save_model(model, tmp_path / "w")
    Image.new("RGB", (80, 60), "gray").save(tmp_path / "img.png")
    code = main(["predict", str(tmp_path / "img.png"), "--weights", str(tmp_path / "w"),
                 "--out", str(tmp_path / "out"), "--explain", "3", "--size", "64"])
    assert code == 0
    with Image.open(tmp_path / "out" / "images" / "img_attention.jpg") as grid:
        assert grid.width > 3 * 80


def test_explain_runs_the_eager_forward_of_a_cuda_graphed_model(monkeypatch):
    """Attention hooks never fire in a graph replay: --explain with --optimize cudagraph draws
    from the wrapped model's eager forward (here on the CPU; explain never replays)."""
    from PIL import Image

    from dabdetr import optimize
    from dabdetr.explain import explain_image
    from dabdetr.inference import Predictor

    monkeypatch.setattr(optimize, "_check_cuda", lambda model: None)
    graphed = optimize.CUDAGraphed(DabDetr(tiny_config()).eval())
    predictor = Predictor(graphed, size=64, device="cpu")
    grid = explain_image(graphed, predictor, Image.new("RGB", (80, 60), "gray"), 3)
    assert grid.width > 3 * 80 and graphed.captures == 0


@pytest.mark.parametrize("overrides", [
    {},
    {"two_stage": True},
    {"num_patterns": 3},
    {"dn_groups": 2},
    {"query_scale_type": "fix_elewise", "bbox_embed_diff_each_layer": True},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_bf16_autocast_keeps_boxes_and_outputs_in_float32(overrides):
    """Under CPU bf16 autocast the matrix products run in bfloat16, but every output (and the
    anchors the decoder embeds) stays float32, close to the float32 model's; training works."""
    torch.manual_seed(0)
    model = DabDetr(tiny_config(**overrides))
    images = torch.randn(2, 3, 64, 80)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "labels": torch.tensor([1])}] * 2
    model.eval()
    with torch.no_grad():
        ref = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    if ref.enc_outputs is not None:
        # query selection is a top-k over near-tied random scores, which rounding reorders;
        # compare the per-cell proposals it selects from
        ref, low = ref.enc_outputs, low.enc_outputs
    torch.testing.assert_close(low.pred_boxes, ref.pred_boxes, atol=2e-2, rtol=0)
    torch.testing.assert_close(low.pred_logits, ref.pred_logits, atol=0.1, rtol=0.05)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, None, targets)
    heads = [out, *out.aux_outputs]
    heads += [h for h in (out.enc_outputs, out.dn_outputs) if h is not None]
    for head in heads:
        assert head.pred_logits.dtype == torch.float32 and head.pred_boxes.dtype == torch.float32
    (out.pred_logits.sum() + out.pred_boxes.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and g.isfinite().all() for g in grads)

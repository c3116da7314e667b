"""Weight files: the authors' layout, safety of unpickling, strict reports, CLI convert."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch
from _util import tiny_config
from safetensors.torch import save_file

import dabdetr
from dabdetr.cli import main
from dabdetr.models.dab_detr import DabDetr
from dabdetr.weights.loading import load_model_with_report


def _official_layout(model: DabDetr, args: dict) -> dict:
    """Our state dict written the way the authors' code saves it."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            key = "backbone.0." + key.removeprefix("backbone.")
        state[key] = value
        if key.startswith("bbox_embed."):
            state["transformer.decoder." + key] = value
    return {"model": state, "args": argparse.Namespace(**args), "epoch": 3}


@pytest.mark.parametrize("options", [
    {},
    {"dilation": True, "num_patterns": 2},
    {"random_refpoints_xy": True, "keep_query_pos": True, "query_scale_type": "fix_elewise"},
])
def test_official_layout_round_trip(tmp_path, options):
    model = DabDetr(tiny_config(**options)).eval()
    args = {"backbone": "resnet18", "dilation": options.get("dilation", False), "nheads": 4,
            "pe_temperatureH": 20, "pe_temperatureW": 20, "transformer_activation": "prelu",
            "random_refpoints_xy": options.get("random_refpoints_xy", False)}
    torch.save(_official_layout(model, args), tmp_path / "ckpt.pth")
    loaded = dabdetr.load_model(tmp_path / "ckpt.pth")
    assert loaded.config.dilation == options.get("dilation", False)
    assert loaded.config.query_scale_type == options.get("query_scale_type", "cond_elewise")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pred_logits, model(x).pred_logits)


def test_state_dict_only_needs_overrides(tmp_path):
    model = DabDetr(tiny_config(dilation=True)).eval()
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    # a bare state dict cannot tell dilation or head count: the override supplies them
    loaded = dabdetr.load_model(tmp_path / "sd.pth", dilation=True, nheads=4)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pred_boxes, model(x).pred_boxes)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": {}, "args": Evil()}, f, protocol=2)  # torch.save's protocol
    with pytest.raises(ValueError, match="refused.*system"):
        dabdetr.load_model(tmp_path / "evil.pth")
    assert not marker.exists()


def test_corrupt_and_unknown_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        dabdetr.load_model(tmp_path / "junk.pth")
    torch.save({"optimizer": {"lr": 1.0}, "step": 3}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DAB-DETR checkpoint.*optimizer"):
        dabdetr.load_model(tmp_path / "other.pth")
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="does not look like DAB-DETR"):
        dabdetr.load_model(tmp_path / "resnet.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(ValueError, match="safetensors"):
        dabdetr.load_model(tmp_path / "bad.safetensors")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        dabdetr.load_model(tmp_path / "emptydir")
    with pytest.raises(ValueError, match="missing.pth.* not found"):
        dabdetr.load_model(tmp_path / "missing.pth")


def test_strict_load_reports_every_problem(tmp_path):
    model = DabDetr(tiny_config())
    state = model.state_dict()
    state.pop("class_embed.bias")
    state["extra.weight"] = torch.zeros(2)
    state["input_proj.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save({"model": state, "config": model.config.to_dict()}, tmp_path / "ours.pth")
    with pytest.raises(ValueError) as err:
        dabdetr.load_model(tmp_path / "ours.pth")
    text = str(err.value)
    assert "class_embed.bias" in text and "extra.weight" in text and "input_proj.weight" in text


def test_fine_tune_to_other_class_count_reports_skipped_head(tmp_path):
    model = DabDetr(tiny_config(num_classes=91))
    dabdetr.save_model(model, tmp_path / "coco")
    new, report = load_model_with_report(tmp_path / "coco", strict=False, num_classes=3)
    assert new.class_embed.weight.shape == (3, 64)
    assert {k for k, *_ in report.mismatched} == {"class_embed.weight", "class_embed.bias"}
    assert torch.equal(new.input_proj.weight, model.input_proj.weight)


def test_hub_id_offline_error_says_how_to_use_a_local_path(monkeypatch):
    """The download is patched (no network): huggingface_hub's own offline error becomes a
    ValueError that names the id, the cause and the local-directory alternative."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(repo_id, allow_patterns):
        calls.append(repo_id)
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError) as err:
        dabdetr.load_model("IDEA-Research/dab-detr-does-not-exist")
    assert calls == ["IDEA-Research/dab-detr-does-not-exist"]
    text = str(err.value)
    assert "'IDEA-Research/dab-detr-does-not-exist'" in text
    assert "LocalEntryNotFoundError: outgoing traffic has been disabled" in text
    assert "pass the local directory instead" in text


def test_hub_id_downloads_through_huggingface_hub(tmp_path, monkeypatch):
    """The hub path: snapshot_download is called with the id; its directory is then read."""
    model = DabDetr(tiny_config()).eval()
    with pytest.warns(UserWarning, match="inverse_sigmoid eps 1e-5"):
        dabdetr.export_huggingface(model, tmp_path / "snap")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snap")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = dabdetr.load_model("someone/dab-detr-tiny")
    assert calls == [("someone/dab-detr-tiny",
                      ["config.json", "*.safetensors", "preprocessor_config.json"])]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pred_logits, model(x).pred_logits, atol=1e-4, rtol=0)


def test_cli_convert_official_to_ours_and_hf(golden_dir, tmp_path, capsys):
    assert main(["convert", str(golden_dir / "checkpoint.pth"), str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "key report" in out and "loaded" in out
    with pytest.warns(UserWarning, match="inverse_sigmoid eps 1e-5"):
        assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    a = dabdetr.load_model(golden_dir / "checkpoint.pth")
    b = dabdetr.load_model(tmp_path / "hf", inverse_sigmoid_eps=1e-3)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(a(x).pred_logits, b(x).pred_logits)
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


def test_ours_to_official_gives_back_the_authors_state_dict(golden_dir):
    """Our keys renamed back to the authors' are exactly their checkpoint's 'model' (the
    num_batches_tracked buffers aside, which their FrozenBatchNorm2d drops when loading)."""
    from dabdetr.weights.official import official_to_ours, ours_to_official, safe_torch_load

    theirs = safe_torch_load(golden_dir / "checkpoint.pth")["model"]
    theirs = {k: v for k, v in theirs.items() if not k.endswith("num_batches_tracked")}
    ours, iter_update = official_to_ours(theirs)
    assert iter_update
    model = dabdetr.load_model(golden_dir / "checkpoint.pth")
    back = ours_to_official(model.state_dict(), model.config.iter_update)
    assert back.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(back[key], value), key
    assert "transformer.decoder.bbox_embed.layers.0.weight" not in ours_to_official(
        ours, iter_update=False)


def test_hf_keys_without_timm_wrapper_load(tmp_path):
    """Older transformers files name the timm backbone without the `_backbone` wrapper."""
    from safetensors.torch import load_file, save_file

    model = DabDetr(tiny_config()).eval()
    with pytest.warns(UserWarning, match="inverse_sigmoid eps 1e-5"):
        dabdetr.export_huggingface(model, tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    renamed = {k.replace("conv_encoder.model._backbone.", "conv_encoder.model."): v
               for k, v in state.items()}
    save_file(renamed, str(tmp_path / "hf" / "model.safetensors"))
    loaded = dabdetr.load_model(tmp_path / "hf", inverse_sigmoid_eps=1e-3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pred_logits, model(x).pred_logits)


def test_deformable_checkpoint_gets_a_clear_error(tmp_path):
    torch.save({"model": {"input_proj.0.0.weight": torch.zeros(1)},
                "args": argparse.Namespace(modelname="dab_deformable_detr")}, tmp_path / "d.pth")
    with pytest.raises(ValueError, match="deformable"):
        dabdetr.load_model(tmp_path / "d.pth")


def test_incomplete_deformable_state_dict_is_named(tmp_path):
    # no args to tell the model: its multi-scale deformable attention keys do
    key = "transformer.encoder.layers.0.self_attn.sampling_offsets.weight"
    torch.save({"input_proj.0.0.weight": torch.zeros(1), key: torch.zeros(1)}, tmp_path / "d.pth")
    with pytest.raises(ValueError, match="deformable attention keys but no transformer.level_embed"):
        dabdetr.load_model(tmp_path / "d.pth")


def test_bare_state_dict_of_a_layer2_two_stage_model(tmp_path):
    model = DabDetr(tiny_config(backbone_return_layer="layer2", two_stage=True)).eval()
    save_file(model.state_dict(), tmp_path / "sd.safetensors")
    # the truncation and query selection are read from the keys; the query count is not in them
    loaded = dabdetr.load_model(tmp_path / "sd.safetensors", nheads=4, num_queries=8)
    assert loaded.config.backbone_return_layer == "layer2" and loaded.config.two_stage
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pred_boxes, model(x).pred_boxes)

"""A user's mistakes end in one line and exit 2, never a traceback; nothing a user made is
replaced without --force; the eval resize travels with the weights (issue 35's defects)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _util import tiny_cfg, tiny_config, tiny_dataset
from PIL import Image

import dabdetr
from dabdetr.argtypes import positive_float, positive_int, probability
from dabdetr.cli import main
from dabdetr.config import DabDetrConfig, resolve_eval_resize
from dabdetr.errors import BadImageError, BadWeightsError, OutputExistsError, UserError
from dabdetr.inference import Predictor

SMALL = ["--size", "64", "--max-size", "96", "--device", "cpu"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("w") / "tiny"
    dabdetr.save_model(dabdetr.DabDetr(tiny_config()).eval(), path)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    src = tmp_path / "photos"
    src.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(src / "a.png")
    return src


def _one_line_error(err: str, *needles: str) -> None:
    """The CLI's message for a user's mistake: one line, no traceback, naming the thing."""
    lines = [line for line in err.splitlines() if line.startswith("dabdetr ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


# -- defect 2: convert into an existing model folder; permissions


@pytest.mark.parametrize("to", ["ours", "hf"])
def test_convert_refuses_to_replace_a_model_folder(tmp_path, weights, capsys, to):
    dst = tmp_path / "model"
    assert main(["convert", str(weights), str(dst), "--to", to]) == 0
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    other = tmp_path / "other"
    dabdetr.save_model(dabdetr.DabDetr(tiny_config(num_classes=3)), other)
    capsys.readouterr()
    assert main(["convert", str(other), str(dst), "--to", to]) == 2
    _one_line_error(capsys.readouterr().err, str(dst), "--force")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert main(["convert", str(other), str(dst), "--to", to, "--force"]) == 0
    assert dabdetr.load_model(dst).config.num_classes == 3


def test_written_files_follow_the_umask(tmp_path, weights):
    for to in ("ours", "hf"):
        dst = tmp_path / to
        assert main(["convert", str(weights), str(dst), "--to", to]) == 0
        modes = {p.name: _mode(p) for p in dst.iterdir()}
        assert set(modes.values()) == {_umask_mode()}, modes
        assert not [p for p in dst.iterdir() if p.name.endswith(".tmp")]


# -- defect 4: a corrupt model.safetensors inside a model folder


@pytest.mark.parametrize("to", ["ours", "hf"])
def test_corrupt_safetensors_in_a_model_folder(tmp_path, weights, capsys, to):
    dst = tmp_path / "model"
    assert main(["convert", str(weights), str(dst), "--to", to]) == 0
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(BadWeightsError, match="model.safetensors.*corrupt"):
        dabdetr.load_model(dst)
    capsys.readouterr()
    assert main(["convert", str(dst), str(tmp_path / "x")]) == 2
    _one_line_error(capsys.readouterr().err, "model.safetensors")


# -- defect 5: predict with only mistyped paths; predict --out over a previous run


def test_predict_with_only_mistyped_paths_keeps_the_previous_results(
        tmp_path, weights, photos, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(photos), "--weights", str(weights), "--out", str(out),
                 *SMALL, "--threshold", "0"]) == 0
    before = (out / "detections.json").read_bytes()
    assert json.loads(before)
    capsys.readouterr()
    for extra in ([], ["--force"]):
        code = main(["predict", str(tmp_path / "photoz"), str(tmp_path / "b.jpg"), "--weights",
                     str(weights), "--out", str(out), *SMALL, *extra])
        assert code == 2
        _one_line_error(capsys.readouterr().err, "photoz", "check the image paths")
        assert (out / "detections.json").read_bytes() == before


def test_predict_refuses_to_replace_a_previous_run(tmp_path, weights, photos, capsys):
    out = tmp_path / "out"
    args = ["predict", str(photos), "--weights", str(weights), "--out", str(out), *SMALL]
    assert main([*args, "--threshold", "0"]) == 0
    before = (out / "detections.json").read_bytes()
    capsys.readouterr()
    assert main([*args, "--threshold", "0.9"]) == 2
    _one_line_error(capsys.readouterr().err, str(out), "--force")
    assert (out / "detections.json").read_bytes() == before
    assert main([*args, "--threshold", "0.9", "--force"]) == 0
    assert (out / "detections.json").read_bytes() != before


# -- defect 6: files that are not checkpoints at all


@pytest.mark.parametrize("content", [b"hello, this is a text file\n", b"X marks the spot",
                                     b"\x00\x01\x02 binary", b"", b"\x80\x02garbage"])
def test_non_checkpoint_files_as_weights(tmp_path, capsys, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(BadWeightsError) as err:
        dabdetr.load_model(path)
    message = str(err.value)
    assert str(path) in message and "allow-list" not in message
    assert "not a PyTorch checkpoint" in message or "damaged" in message
    assert main(["convert", str(path), str(tmp_path / "o")]) == 2
    _one_line_error(capsys.readouterr().err, str(path))


def test_a_real_disallowed_pickle_is_still_named(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "obj": argparse.ArgumentParser}, path)
    with pytest.raises(BadWeightsError, match="allow-list"):
        dabdetr.load_model(path)


# -- defect 7: a config.json value of the wrong type


@pytest.mark.parametrize("field, value", [("hidden_dim", "64"), ("dilation", "yes"),
                                          ("num_queries", 8.5), ("id2label", [1]),
                                          ("eval_size", None), ("dropout", True)])
def test_config_value_of_the_wrong_type(tmp_path, weights, capsys, field, value):
    dst = tmp_path / "model"
    assert main(["convert", str(weights), str(dst)]) == 0
    doc = json.loads((dst / "config.json").read_text())
    doc["config"][field] = value
    (dst / "config.json").write_text(json.dumps(doc))
    with pytest.raises(BadWeightsError, match=f"'{field}' must be"):
        dabdetr.load_model(dst)
    capsys.readouterr()
    assert main(["convert", str(dst), str(tmp_path / "x")]) == 2
    _one_line_error(capsys.readouterr().err, field, "config.json")


# -- defect 8: convert --to hf names the model's real return layer


def test_convert_to_hf_names_the_return_layer(tmp_path, capsys):
    src = tmp_path / "l2"
    dabdetr.save_model(dabdetr.DabDetr(tiny_config(backbone_return_layer="layer2")), src)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 2
    _one_line_error(capsys.readouterr().err, "backbone_return_layer='layer2'")


# -- defect 9: out-of-range arguments are refused when parsing


@pytest.mark.parametrize("argv", [
    ["predict", "x.jpg", "--weights", "w", "--threshold", "2"],
    ["predict", "x.jpg", "--weights", "w", "--threshold", "-1"],
    ["predict", "x.jpg", "--weights", "w", "--threshold", "nan"],
    ["predict", "x.jpg", "--weights", "w", "--size", "0"],
    ["predict", "x.jpg", "--weights", "w", "--num-select", "-3"],
    ["evaluate", "--weights", "w", "--data", "d", "--batch-size", "0"],
    ["evaluate", "--weights", "w", "--data", "d", "--eval-size", "-5"],
    ["synth", "--out", "d", "--train", "-1"],
    ["synth", "--out", "d", "--image-size", "0"],
    ["demo", "--minutes", "-5"],
    ["demo", "--minutes", "0"],
])
def test_out_of_range_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("dabdetr ")


def test_argument_types():
    assert probability("0") == 0.0 and probability("1") == 1.0
    assert positive_int("3") == 3 and positive_float("0.5") == 0.5
    for func, text in [(probability, "1.5"), (positive_int, "0"), (positive_int, "2.5"),
                       (positive_float, "-1"), (positive_float, "inf")]:
        with pytest.raises(argparse.ArgumentTypeError):
            func(text)


def test_predictor_refuses_a_threshold_outside_0_1(weights):
    model = dabdetr.load_model(weights)
    with pytest.raises(ValueError, match="outside"):
        Predictor(model, threshold=2)


# -- defect 11: the eval resize is stored with the weights and used


def test_eval_resize_resolution():
    trained = tiny_config(eval_size=128, eval_max_size=213)
    assert resolve_eval_resize(trained) == (128, 213)
    assert resolve_eval_resize(trained, 256) == (256, 426)  # the cap scales with the size
    assert resolve_eval_resize(trained, 256, 300) == (256, 300)
    assert resolve_eval_resize(trained, 64, 0) == (64, None)
    assert resolve_eval_resize(DabDetrConfig()) == (800, 1333)


def test_published_weights_keep_800_1333(tmp_path):
    from dabdetr.weights.official import infer_config, ours_to_official

    state = dabdetr.DabDetr(tiny_config()).state_dict()
    torch.save({"model": ours_to_official(state)}, tmp_path / "authors.pth")
    config = dabdetr.load_model(tmp_path / "authors.pth").config
    assert (config.eval_size, config.eval_max_size) == (800, 1333)
    assert infer_config(state).eval_size == 800


def test_saved_models_carry_their_eval_resize(tmp_path, photos, capsys):
    model = dabdetr.DabDetr(tiny_config(eval_size=64, eval_max_size=96)).eval()
    for to in ("ours", "hf"):
        dst = tmp_path / to
        (dabdetr.save_model if to == "ours" else dabdetr.export_huggingface)(model, dst)
        loaded = dabdetr.load_model(dst)
        assert (loaded.config.eval_size, loaded.config.eval_max_size) == (64, 96)
        predictor = Predictor(loaded)
        assert (predictor.size, predictor.max_size) == (64, 96)
        if to == "hf":
            assert json.loads((dst / "preprocessor_config.json").read_text())["size"] == {
                "shortest_edge": 64, "longest_edge": 96}
            continue
        # predict without --size uses it: the same detections as with it
        capsys.readouterr()
        assert main(["predict", str(photos), "--weights", str(dst), "--out",
                     str(tmp_path / f"p_{to}"), "--device", "cpu", "--threshold", "0"]) == 0
        assert "short side 64" in capsys.readouterr().out
        assert main(["predict", str(photos), "--weights", str(dst), "--out",
                     str(tmp_path / f"q_{to}"), "--device", "cpu", "--threshold", "0",
                     "--size", "64", "--max-size", "96"]) == 0
        assert ((tmp_path / f"p_{to}" / "detections.json").read_text()
                == (tmp_path / f"q_{to}" / "detections.json").read_text())
    api = dabdetr.predict(photos / "a.png", weights=tmp_path / "ours", threshold=0)
    assert api[0].image_size == (48, 64)


@pytest.mark.slow
def test_training_checkpoints_carry_the_eval_resize(tmp_path):
    from dabdetr.engine.evaluate import evaluate_weights
    from dabdetr.engine.train import train

    data = tiny_dataset(tmp_path / "data")
    train(tiny_cfg(data, tmp_path / "run", epochs=1, max_steps=1, image_size=48))
    for name in ("last.pt", "best.pt"):
        config = dabdetr.load_model(tmp_path / "run" / name).config
        assert (config.eval_size, config.eval_max_size) == (48, 79)  # 800/1333 scaled to 48
    metrics = evaluate_weights(str(tmp_path / "run" / "last.pt"), str(data), progress=False,
                               num_workers=0)
    again = evaluate_weights(str(tmp_path / "run" / "last.pt"), str(data), progress=False,
                             num_workers=0, eval_size=48, max_size=79)
    assert metrics["AP"] == again["AP"] and metrics["AP50"] == again["AP50"]


# -- defect 12: Ctrl-C, decompression bombs, a mistyped local path


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys, weights, photos, tmp_path):
    import dabdetr.streaming

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dabdetr.streaming, "stream_predictions", interrupted)
    code = main(["predict", str(photos), "--weights", str(weights), "--out",
                 str(tmp_path / "o"), *SMALL])
    assert code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "detections.json").exists()


def test_decompression_bomb_is_named_not_raw(tmp_path, monkeypatch, caplog):
    from dabdetr.data.io import load_image_rgb

    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # warns above 4000, refuses above 8000
    with pytest.raises(BadImageError, match="big.png.*MAX_IMAGE_PIXELS"):
        load_image_rgb(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = load_image_rgb(tmp_path / "big.png")
    assert img.size == (100, 100)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "big.png is very large" in caplog.text


def test_mistyped_local_path_is_not_a_hub_failure(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be asked for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({}, run / "best.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadWeightsError, match=r"run/bestt.pt.*not found.*did you mean 'run/best.pt'"):
        dabdetr.load_model("run/bestt.pt")
    assert main(["predict", "x.jpg", "--weights", "run/bestt.pt"]) == 2
    _one_line_error(capsys.readouterr().err)


# -- the error boundary: unwritable places, full disks, internal errors


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk is full"),
                                         (errno.EACCES, "permission denied")])
def test_failed_write_is_one_line_and_keeps_the_previous_file(
        tmp_path, weights, monkeypatch, capsys, code, words):
    import dabdetr.io_utils

    dst = tmp_path / "model"
    assert main(["convert", str(weights), str(dst)]) == 0
    before = (dst / "model.safetensors").read_bytes()

    def failing_replace(src, dst_path):
        raise OSError(code, os.strerror(code), str(dst_path))

    monkeypatch.setattr(dabdetr.io_utils.os, "replace", failing_replace)
    capsys.readouterr()
    assert main(["convert", str(weights), str(dst), "--force"]) == 2
    _one_line_error(capsys.readouterr().err, "model.safetensors", words)
    assert (dst / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]


def test_internal_error_is_short_and_traceback_only_when_verbose(monkeypatch, capsys, tmp_path):
    import dabdetr.cli

    def bug(args):
        raise TypeError("a bug")

    monkeypatch.setattr(dabdetr.cli, "cmd_convert", bug)
    argv = ["convert", "a", str(tmp_path / "b")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "internal error: TypeError: a bug" in err and "Traceback" not in err
    assert main([*argv, "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_user_errors_are_value_errors():
    assert issubclass(UserError, ValueError)
    assert issubclass(BadImageError, OSError) and issubclass(OutputExistsError, UserError)


# -- synth never writes into a folder the user filled


def test_synth_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["synth", "--out", str(out), "--train", "2", "--val", "1", "--image-size", "32",
            "--no-progress", "--workers", "1"]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, str(out), "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main([*argv, "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    assert main(argv) == 0  # the same dataset again: nothing to write
    assert "already holds this dataset" in capsys.readouterr().out


# -- the load report is returned, not attached


def test_load_report_is_returned_not_attached(weights):
    model, report = dabdetr.load_model(weights, return_report=True)
    assert report.ok and report.loaded == len(model.state_dict())
    assert not hasattr(model, "load_report")
    assert not hasattr(dabdetr.load_model(weights), "load_report")

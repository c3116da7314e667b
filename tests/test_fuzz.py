"""Fuzzing the readers of untrusted files: checkpoints (the authors' .pth, our training .pt,
our model folder, a Hugging Face folder, bare safetensors), COCO annotation JSON and images.

Each gets a valid file mutated (bytes replaced, cut short, random bytes inserted) or random
bytes. The only outcomes allowed are a result or the project's named error type (UserError);
nothing may be written outside the example's temp folder. Deterministic (derandomize) so CI
sees the same cases; `max_examples` per reader is EXAMPLES.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _util import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import dabdetr
from dabdetr.errors import BadDataError, BadImageError, BadWeightsError, UserError
from dabdetr.weights import huggingface
from dabdetr.weights.loading import read_weights

EXAMPLES = 150
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# one mutation: (kind, position fraction, bytes)
_EDIT = st.tuples(st.sampled_from(["replace", "insert", "cut"]), st.floats(0, 1),
                  st.binary(min_size=1, max_size=8))
MUTATIONS = st.one_of(
    st.tuples(st.just("edits"), st.lists(_EDIT, min_size=1, max_size=6), st.booleans()),
    st.tuples(st.just("random"), st.binary(max_size=2048), st.booleans()),
)


def mutate(seed: bytes, mutation: tuple) -> bytes:
    """Apply a MUTATIONS draw to `seed`. Edits land in the first 4 KiB (headers, pickles,
    JSON) when the flag is set, anywhere otherwise."""
    kind, payload, head = mutation
    if kind == "random":
        return payload
    data = bytearray(seed)
    for op, where, chunk in payload:
        span = min(len(data), 4096) if head else len(data)
        pos = int(where * max(span - 1, 0))
        if op == "replace":
            data[pos:pos + len(chunk)] = chunk
        elif op == "insert":
            data[pos:pos] = chunk
        else:
            del data[pos:]
    return bytes(data)


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


def run_example(seed_dir: Path, target: str, data: bytes, read: Callable[[Path], object],
                allowed: tuple[type[Exception], ...], outcomes: dict[str, int]) -> None:
    """Copy `seed_dir` to a temp folder, replace `target` in it with `data`, read it with
    `read` from inside that folder: a result or an `allowed` error, no file written
    elsewhere (the working directory and the seed folder are compared)."""
    cwd = Path.cwd()
    before = snapshot(seed_dir), set(os.listdir(cwd))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "case"
        shutil.copytree(seed_dir, work)
        (work / target).write_bytes(data)
        try:
            read(work / target if target else work)
            outcomes["result"] += 1
        except allowed:
            outcomes["error"] += 1
    assert (snapshot(seed_dir), set(os.listdir(cwd))) == before


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dabdetr.weights.official import ours_to_official

    root = tmp_path_factory.mktemp("seeds")
    # a small model (ResNet-18 cut after layer2): files of ~3 MB
    model = dabdetr.DabDetr(tiny_config(backbone_return_layer="layer2")).eval()
    state = model.state_dict()
    out = {name: root / name for name in ("ours", "hf", "authors", "train", "bare", "coco",
                                          "image")}
    dabdetr.save_model(model, out["ours"])
    # transformers cannot express a truncated backbone: its config.json is a full one's (the
    # reader builds nothing, so the pair reads)
    out["hf"].mkdir()
    full = tiny_config()
    (out["hf"] / "config.json").write_text(json.dumps(huggingface.config_to_hf(full)))
    save_file(huggingface.ours_to_hf(state), str(out["hf"] / "model.safetensors"))
    out["authors"].mkdir()
    args = argparse.Namespace(backbone="resnet18", dilation=False, nheads=4)
    torch.save({"model": ours_to_official(state), "args": args}, out["authors"] / "w.pth")
    out["train"].mkdir()
    torch.save({"model": state, "config": model.config.to_dict(), "epoch": 1},
               out["train"] / "last.pt")
    out["bare"].mkdir()
    shutil.copy(out["ours"] / "model.safetensors", out["bare"] / "w.safetensors")
    from dabdetr.data.synthetic import generate_dataset

    generate_dataset(out["coco"], num_train=3, num_val=1, seed=0, difficulty="easy",
                     image_size=32, progress=False)
    out["image"].mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out["image"] / "a.png")
    Image.fromarray(pixels).save(out["image"] / "a.jpg", quality=90)
    return out


WEIGHT_CASES = [("ours", "config.json"), ("ours", "model.safetensors"), ("hf", "config.json"),
                ("hf", "model.safetensors"), ("authors", "w.pth"), ("train", "last.pt"),
                ("bare", "w.safetensors")]


@pytest.mark.parametrize("folder, target", WEIGHT_CASES)
def test_fuzz_checkpoint_loaders(seeds, folder, target):
    seed_dir = seeds[folder]
    seed = (seed_dir / target).read_bytes()
    outcomes = {"result": 0, "error": 0}
    # a folder is read as a folder; a single file by its path
    as_folder = folder in ("ours", "hf")

    @FUZZ
    @given(MUTATIONS)
    def check(mutation):
        run_example(seed_dir, target, mutate(seed, mutation),
                    lambda p: read_weights(p.parent if as_folder else p), (BadWeightsError,),
                    outcomes)

    check()
    print(f"fuzz {folder}/{target}: {outcomes}")
    assert outcomes["result"] + outcomes["error"] >= EXAMPLES // 2
    assert outcomes["error"] > 0


def test_fuzz_coco_annotations(seeds):
    from dabdetr.data.coco import CocoDetection

    seed_dir = seeds["coco"]
    target = "annotations/instances_train.json"
    seed = (seed_dir / target).read_bytes()
    outcomes = {"result": 0, "error": 0}

    def read(path: Path) -> None:
        dataset = CocoDetection(path.parent.parent / "train", path)
        for index in range(len(dataset)):
            dataset[index]

    @FUZZ
    @given(MUTATIONS)
    def check(mutation):
        run_example(seed_dir, target, mutate(seed, mutation), read, (BadDataError,), outcomes)

    check()
    print(f"fuzz coco: {outcomes}")
    assert outcomes["error"] > 0


@pytest.mark.parametrize("name", ["a.png", "a.jpg"])
def test_fuzz_image_decoder(seeds, name):
    from dabdetr.data.io import load_image_rgb

    seed_dir = seeds["image"]
    seed = (seed_dir / name).read_bytes()
    outcomes = {"result": 0, "error": 0}

    def read(path: Path) -> None:
        img = load_image_rgb(path)
        assert img.mode == "RGB"

    @FUZZ
    @given(MUTATIONS)
    def check(mutation):
        run_example(seed_dir, name, mutate(seed, mutation), read, (BadImageError,), outcomes)

    check()
    print(f"fuzz image {name}: {outcomes}")
    assert outcomes["error"] > 0


class _Marker:
    """Unpickling this calls Path.touch on a marker file: code run from a pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_no_pickle_is_executed_through_any_command(tmp_path, capsys):
    from dabdetr.cli import main

    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Marker(marker)}, evil)
    with pytest.raises(BadWeightsError, match="allow-list"):
        dabdetr.load_model(evil)
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    commands = [["convert", str(evil), str(tmp_path / "c")],
                ["predict", str(tmp_path / "img"), "--weights", str(evil), "--out",
                 str(tmp_path / "p")],
                ["evaluate", "--weights", str(evil), "--data", str(tmp_path)]]
    for argv in commands:
        assert main(argv) == 2
        assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()
    assert issubclass(BadWeightsError, UserError)

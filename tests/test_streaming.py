"""Streaming prediction: videos, JSONL as results are made, --resume, size batches, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _util import tiny_config
from PIL import Image

import dabdetr
from dabdetr.cli import main
from dabdetr.inference import Predictor
from dabdetr.streaming import JsonlWriter, read_done, stream_predictions

av = pytest.importorskip("av", reason="the video extra (pip install dabdetr[video])")

SMALL = ["--size", "64", "--max-size", "96", "--device", "cpu", "--threshold", "0"]
NUM_KEPT = 8 * 5  # threshold 0 keeps num_queries x num_classes detections


@pytest.fixture(scope="module")
def model() -> dabdetr.DabDetr:
    torch.manual_seed(0)
    return dabdetr.DabDetr(tiny_config()).eval()


@pytest.fixture(scope="module")
def weights(model: dabdetr.DabDetr, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny"
    dabdetr.save_model(model, path)
    return path


def _noise(path: Path, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_video(path: Path, frames: int, size: tuple[int, int] = (64, 48)) -> None:
    """A short MPEG-4 video of moving noise, made with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_video_streams_to_jsonl_and_annotated_video(tmp_path: Path, weights: Path) -> None:
    _write_video(tmp_path / "clip.mp4", frames=6)
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "clip.mp4"), "--weights", str(weights), "--out",
                 str(out), "--video-out", "--batch-size", "4", *SMALL]) == 0
    records = _records(out)
    assert [r["frame"] for r in records] == list(range(6))  # in decode order
    assert all(r["file"] == str(tmp_path / "clip.mp4") and r["key"].endswith(f"#{r['frame']}")
               for r in records)
    assert all((r["height"], r["width"]) == (48, 64) and len(r["detections"]) == NUM_KEPT
               for r in records)
    assert records[1]["time"] == pytest.approx(0.2)
    images = json.loads((out / "images.json").read_text())
    assert [i["file_name"] for i in images] == [r["key"] for r in records]
    assert len(json.loads((out / "detections.json").read_text())) == 6 * NUM_KEPT
    with av.open(str(out / "videos" / "clip.mp4")) as annotated:
        decoded = list(annotated.decode(video=0))
    assert len(decoded) == 6 and (decoded[0].width, decoded[0].height) == (64, 48)
    assert not any((out / "images").iterdir())  # frames are drawn into the video only


def test_frames_match_the_same_images_predicted_one_by_one(tmp_path: Path, model) -> None:
    """Batched video frames give each frame's own single-image detections."""
    _write_video(tmp_path / "clip.mp4", frames=4)
    predictor = Predictor(model, size=64, max_size=96, threshold=0.0, device="cpu")
    batched: list = []
    stream_predictions([str(tmp_path / "clip.mp4")], predictor, batch_size=3, workers=0,
                       on_result=lambda det, frame: batched.append(det),
                       on_failure=lambda frame: pytest.fail(frame.error), progress=False)
    with av.open(str(tmp_path / "clip.mp4")) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    assert len(batched) == len(frames) == 4
    for det, image in zip(batched, frames, strict=True):
        single = predictor([image])[0]
        torch.testing.assert_close(det.scores, single.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(det.boxes, single.boxes, atol=1e-3, rtol=0)


def test_resume_skips_what_is_done(tmp_path: Path, weights: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _noise(src / f"{i}.png", (64, 48), seed=i)
    out = tmp_path / "out"
    args = ["predict", str(src), "--weights", str(weights), "--out", str(out), "--no-draw",
            "--workers", "2", *SMALL]
    assert main(args) == 0
    first = _records(out)
    # without --resume or --force the previous run is kept, even a JSONL-only one (killed
    # before the COCO files were written)
    (out / "detections.json").unlink()
    (out / "images.json").unlink()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "predictions.jsonl" in err and "--resume" in err and "--force" in err
    assert _records(out) == first
    for i in range(3, 5):
        _noise(src / f"{i}.png", (48, 64), seed=i)
    # a record cut short by a killed run is dropped, not glued to the next one
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"key": "half a rec')
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert capsys.readouterr().out.startswith("2 images predicted, 5 in")
    records = _records(out)
    assert records[:3] == first
    keys = [r["key"] for r in records]
    assert sorted(keys) == sorted(str(src / f"{i}.png") for i in range(5))
    assert read_done(out / "predictions.jsonl") == frozenset(keys)
    assert len(json.loads((out / "images.json").read_text())) == 5
    assert len(json.loads((out / "detections.json").read_text())) == 5 * NUM_KEPT
    # nothing left to do: the COCO files are rewritten from the JSONL as they are
    assert main([*args, "--resume"]) == 0
    assert _records(out) == records


def test_corrupt_images_and_videos_are_skipped_and_named(tmp_path: Path, weights: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "in"
    src.mkdir()
    _noise(src / "good.png", (64, 48), seed=0)
    (src / "garbage.jpg").write_bytes(b"not a jpeg at all" * 20)
    (src / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500)
    _write_video(src / "cut.mkv", frames=8)  # Matroska: readable up to where it is cut
    data = (src / "cut.mkv").read_bytes()
    (src / "cut.mkv").write_bytes(data[: len(data) * 2 // 3])  # the end of the file is lost
    out = tmp_path / "out"
    code = main(["predict", str(src), "--weights", str(weights), "--out", str(out),
                 "--workers", "2", *SMALL])
    assert code == 1
    failed = {Path(f["file"]).name: f["error"] for f in json.loads((out / "failed.json").read_text())}
    assert {"garbage.jpg", "garbage.mp4"} <= set(failed)
    assert "cannot read image" in failed["garbage.jpg"]
    assert "cannot decode video" in failed["garbage.mp4"]
    assert all(name in caplog.text for name in ("garbage.jpg", "garbage.mp4"))
    records = [r for r in _records(out) if "detections" in r]
    assert str(src / "good.png") in {r["key"] for r in records}
    cut_frames = [r["frame"] for r in records if r["file"] == str(src / "cut.mkv")]
    assert cut_frames == list(range(len(cut_frames))) and 0 < len(cut_frames) < 8


def test_jsonl_writer_appends_after_a_cut_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"key": "a", "detections": []}\n{"key": "b", "detec')
    with JsonlWriter(path, append=True):
        pass
    assert path.read_text() == '{"key": "a", "detections": []}\n'
    assert read_done(path) == {"a"}
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_done(path)


def test_bad_batch_options_are_clear_errors(tmp_path: Path, weights: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _noise(tmp_path / "a.png", (32, 32), seed=0)
    base = ["predict", str(tmp_path / "a.png"), "--weights", str(weights), "--out",
            str(tmp_path / "out"), *SMALL]
    for option, value in (("--batch-size", "0"), ("--workers", "-1")):
        with pytest.raises(SystemExit) as exit_info:  # refused while parsing, one line
            main([*base, option, value])
        assert exit_info.value.code == 2 and option in capsys.readouterr().err
    assert main([*base, "--video-out", "--resume"]) == 2
    assert "--video-out cannot resume" in capsys.readouterr().err

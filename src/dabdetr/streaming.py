"""Prediction over many images or video frames: decoded by DataLoader workers while the model
runs, batched by size, written to JSON Lines as they are made.

One record per line in the JSONL file, in the order the results are made:

- a result: {"key", "file", "frame" (video frames only; 0-based decode order), "time" (video
  frames: seconds, or null), "height", "width", "detections": [{"label", "name", "category_id",
  "score", "bbox": [x, y, w, h] absolute pixels}]}
- a failure: {"key", "file", "frame"?, "error"}

`key` is the file path, and "path#frame" for a video frame. `read_done` collects the keys with a
result, so a resumed run skips them (failures are tried again).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

from dabdetr.data.io import load_image_rgb
from dabdetr.errors import BadDataError, UserError
from dabdetr.inference import Detections, Predictor
from dabdetr.io_utils import atomic_path, atomic_write

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
SIZE_STEP = 32  # images whose resized sides round up to the same multiple of this batch together
PENDING_BATCHES = 4  # waiting images beyond this many batches run as the fullest group

__all__ = ["VIDEO_SUFFIXES", "Frame", "FrameDataset", "JsonlWriter", "frame_key", "read_done",
           "stream_predictions", "write_coco_files"]


def frame_key(path: str, frame: int | None) -> str:
    """The JSONL key of an image file (`path`) or of a video frame ("path#frame")."""
    return path if frame is None else f"{path}#{frame}"


@dataclass
class Frame:
    """One decoded input (or the reason it could not be decoded), as the workers send it.

    tensor: [3, h, w] float, the predictor's transform of the image (None on error);
    original: [3, H, W] uint8 of the image as read, for drawing (None unless asked for);
    size: (H, W) of the original image.
    """

    file: str
    frame: int | None = None
    time: float | None = None
    size: tuple[int, int] = (0, 0)
    tensor: torch.Tensor | None = None
    original: torch.Tensor | None = None
    error: str = ""

    @property
    def key(self) -> str:
        return frame_key(self.file, self.frame)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _video_frames(path: str) -> Iterator[tuple[int, float | None, Image.Image | None, str]]:
    """(index, time, RGB image or None, error) for each frame PyAV decodes from `path`; a packet
    that fails to decode yields one error (no image) and decoding goes on."""
    import av

    index = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as err:
                yield index, None, None, f"corrupt packet after frame {index - 1}: {_describe(err)}"
                continue
            for frame in frames:
                yield index, frame.time, frame.to_image(), ""
                index += 1


class FrameDataset(IterableDataset):
    """Images and video frames of `files`, decoded and transformed, as `Frame`s.

    Each worker takes every n-th file (videos decode sequentially in one worker); files whose
    suffix is in VIDEO_SUFFIXES are read as videos (PyAV), the rest as images. Keys in `done`
    are skipped. Unreadable files and undecodable frames come out as Frames with `error` set,
    never as exceptions.
    """

    def __init__(self, files: Sequence[str], transform: Callable, done: frozenset[str] = frozenset(),
                 keep_original: bool = False):
        self.files = list(files)
        self.transform = transform
        self.done = done
        self.keep_original = keep_original

    def _frame(self, file: str, image: Image.Image, frame: int | None = None,
               time: float | None = None) -> Frame:
        original = TF.pil_to_tensor(image) if self.keep_original else None
        return Frame(file, frame, time, (image.height, image.width), self.transform(image), original)

    def _image(self, file: str) -> Frame:
        try:
            return self._frame(file, load_image_rgb(file))
        except Exception as err:  # PIL raises many types for bad files; each is reported
            return Frame(file, error=f"cannot read image ({_describe(err)})")

    def _video(self, file: str) -> Iterator[Frame]:
        try:
            for index, time, image, error in _video_frames(file):
                if error:
                    yield Frame(file, error=error)
                elif frame_key(file, index) not in self.done:
                    yield self._frame(file, image, index, time)
        except Exception as err:  # unopenable or broken containers (PyAV's FFmpegError, OSError)
            yield Frame(file, error=f"cannot decode video ({_describe(err)})")

    def __iter__(self) -> Iterator[Frame]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, file in enumerate(self.files):
            if i % workers != worker:
                continue
            if Path(file).suffix.lower() in VIDEO_SUFFIXES:
                yield from self._video(file)
            elif file not in self.done:
                yield self._image(file)


def _size_group(frame: Frame) -> tuple[int, int]:
    h, w = frame.tensor.shape[-2:]
    return -(-h // SIZE_STEP), -(-w // SIZE_STEP)


def _batches(frames: Iterator[Frame], batch_size: int,
             on_failure: Callable[[Frame], None]) -> Iterator[list[Frame]]:
    """Group frames by resized size (rounded up to SIZE_STEP) into batches of `batch_size`;
    holds at most PENDING_BATCHES * batch_size frames (then the fullest group goes, short).
    Frames of one video share a size, so they keep their order."""
    groups: dict[tuple[int, int], list[Frame]] = {}
    pending = 0
    for frame in frames:
        if frame.error:
            on_failure(frame)
            continue
        group = groups.setdefault(_size_group(frame), [])
        group.append(frame)
        pending += 1
        if len(group) < batch_size and pending <= PENDING_BATCHES * batch_size:
            continue
        key = _size_group(frame) if len(group) >= batch_size else max(groups, key=lambda k: len(groups[k]))
        batch = groups.pop(key)
        pending -= len(batch)
        yield batch
    yield from groups.values()


def stream_predictions(files: Sequence[str], predictor: Predictor, *,
                       on_result: Callable[[Detections, Frame], None],
                       on_failure: Callable[[Frame], None], batch_size: int = 1,
                       workers: int = 2, done: frozenset[str] = frozenset(),
                       keep_original: bool = False, progress: bool = True) -> int:
    """Predict every image and video frame of `files` (keys in `done` skipped).

    Decoding and `predictor.transform` run in `workers` DataLoader processes (0: in this one)
    while the model runs here. Each Detections goes to `on_result` with its Frame (`source` set
    to the frame's key) as soon as its batch is done; undecodable inputs go to `on_failure`.
    Returns the number of images predicted.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    from tqdm import tqdm

    dataset = FrameDataset(files, predictor.transform, done, keep_original)
    # batch_size=None: frames come one by one (no collation); _batches groups them by size
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        prefetch_factor=2 * batch_size if workers else None)
    count = 0
    has_video = any(Path(f).suffix.lower() in VIDEO_SUFFIXES for f in files)
    total = None if has_video else len(set(files) - done)  # a video's frame count is a guess
    with tqdm(desc="predict", unit="img", total=total, disable=not progress,
              dynamic_ncols=True) as bar:
        for batch in _batches(iter(loader), batch_size, on_failure):
            detections = predictor.detect([f.tensor for f in batch], [f.size for f in batch])
            for det, frame in zip(detections, batch, strict=True):
                det.source = frame.key
                on_result(det, frame)
            count += len(batch)
            bar.update(len(batch))
    return count


class JsonlWriter:
    """Appends result and failure records (see the module docstring) to a JSONL file, flushed
    after every record, so a killed run loses at most the batch in flight."""

    def __init__(self, path: str | os.PathLike, append: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append:
            _drop_partial_last_line(self.path)
        self._file: IO[str] = self.path.open("a" if append else "w", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    @staticmethod
    def _where(frame: Frame) -> dict[str, Any]:
        where: dict[str, Any] = {"key": frame.key, "file": frame.file}
        if frame.frame is not None:
            where["frame"] = frame.frame
            where["time"] = frame.time
        return where

    def result(self, det: Detections, frame: Frame) -> None:
        entries = [{"label": int(lab), "name": name, "category_id": cat, "score": c["score"],
                    "bbox": c["bbox"]}
                   for lab, name, cat, c in zip(det.labels.tolist(), det.names, det.category_ids,
                                                det.to_coco(0), strict=True)]
        height, width = det.image_size
        self._write({**self._where(frame), "height": height, "width": width, "detections": entries})

    def failure(self, frame: Frame) -> None:
        self._write({**self._where(frame), "error": frame.error})

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_partial_last_line(path: Path, chunk: int = 1 << 20) -> None:
    """Cut a last line without its newline (a write cut short by a killed run)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        start = end
        while start > 0:  # back to the last newline, a chunk at a time
            start = max(0, start - chunk)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
        f.truncate(0)


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                continue  # cut short; dropped when the file is appended to
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise BadDataError(f"{path} line {number} is not JSON ({err}); "
                                 "it is not a predictions file written by dabdetr") from err


def read_done(path: str | os.PathLike) -> frozenset[str]:
    """Keys of the inputs with a result in a predictions JSONL file (empty if it is missing)."""
    path = Path(path)
    if not path.exists():
        return frozenset()
    return frozenset(r["key"] for r in _records(path) if "detections" in r)


def write_coco_files(jsonl: str | os.PathLike, out: str | os.PathLike) -> tuple[int, int, int]:
    """COCO results `detections.json`, `images.json` (ids in JSONL order) and, when any input
    failed without a later result, `failed.json`, from a predictions JSONL file; streamed, so
    memory does not grow with the number of detections. Returns (images, detections,
    failures)."""
    jsonl, out = Path(jsonl), Path(out)
    done = read_done(jsonl)
    num_images = num_dets = 0
    failed = []
    with (atomic_path(out / "detections.json") as dets_tmp,
          atomic_path(out / "images.json") as imgs_tmp,
          dets_tmp.open("w") as dets, imgs_tmp.open("w") as imgs):
        dets.write("[")
        imgs.write("[")
        for record in _records(jsonl):
            if "detections" not in record:
                if record["key"] not in done:
                    failed.append({"file": record["key"], "error": record["error"]})
                continue
            num_images += 1
            image = {"id": num_images, "file_name": record["key"], "height": record["height"],
                     "width": record["width"]}
            imgs.write(("," if num_images > 1 else "") + "\n" + json.dumps(image))
            for d in record["detections"]:
                entry = {"image_id": num_images, "category_id": d["category_id"],
                         "score": d["score"], "bbox": d["bbox"]}
                dets.write(("," if num_dets else "") + json.dumps(entry))
                num_dets += 1
        dets.write("]")
        imgs.write("\n]")
    failed_path = out / "failed.json"
    if failed:
        atomic_write(failed_path, json.dumps(failed, indent=1))
    elif failed_path.exists():
        failed_path.unlink()  # a failure of an earlier run that this run resolved
    return num_images, num_dets, len(failed)


@dataclass
class FolderSummary:
    """What `predict_to_folder` did: images predicted now, images and detections in the COCO
    files (this run and resumed ones), failures, and where the outputs are."""

    predicted: int
    images: int
    detections: int
    failed: int
    jsonl: Path


class _Drawings:
    """Writes each image's drawing to `folder`/<stem>.jpg (a stem seen before gets "_" appended)
    and each video's annotated frames to `videos`/<stem>.mp4 when `videos` is set."""

    def __init__(self, folder: Path | None, videos: Path | None,
                 extra: Callable[[Detections, Image.Image, str], None] | None = None):
        self.folder, self.videos, self.extra = folder, videos, extra
        self.used: set[str] = set()
        self.writers: dict[str, Any] = {}

    def __call__(self, det: Detections, frame: Frame) -> None:
        from dabdetr.visualize import draw_detections

        image = TF.to_pil_image(frame.original)
        if frame.frame is not None:
            if self.videos is not None:
                self._video_writer(frame.file).write(
                    draw_detections(image, det.boxes, det.labels.tolist(), det.names, det.scores))
            return
        if self.folder is None:
            return
        name = Path(frame.file).stem
        while name in self.used:  # the same file name in two folders
            name += "_"
        self.used.add(name)
        drawing = draw_detections(image, det.boxes, det.labels.tolist(), det.names, det.scores)
        with atomic_path(self.folder / f"{name}.jpg") as tmp:
            drawing.save(tmp, format="JPEG", quality=92)
        if self.extra is not None:
            self.extra(det, image, str(self.folder / name))

    def _video_writer(self, file: str):
        from dabdetr.video import VideoWriter, frame_rate

        if file not in self.writers:
            name = Path(file).stem
            while name in self.used:
                name += "_"
            self.used.add(name)
            self.writers[file] = VideoWriter(self.videos / f"{name}.mp4", frame_rate(file))
        return self.writers[file]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def predict_to_folder(files: Sequence[str], predictor: Predictor, out: str | os.PathLike, *,
                      resume: bool = False, batch_size: int = 1, workers: int = 2,
                      draw: bool = True, video_out: bool = False,
                      extra_drawing: Callable[[Detections, Image.Image, str], None] | None = None,
                      progress: bool = True) -> FolderSummary:
    """Predict `files` (images and videos) into the folder `out`.

    Writes `predictions.jsonl` as results are made (with `resume`, appends to it and skips the
    inputs it already has; without, starts it anew), then `detections.json` (COCO results),
    `images.json` and, if inputs failed, `failed.json` from it. With `draw`, each image's
    drawing goes to `images/`; with `video_out`, each video's annotated frames to `videos/`.
    `extra_drawing(det, image, stem_path)` may add drawings next to an image's.
    """
    if resume and video_out:
        raise UserError("--video-out cannot resume: the annotated video would lack the frames "
                         "predicted before; run without --resume to write it whole")
    out = Path(out)
    jsonl = out / "predictions.jsonl"
    done = read_done(jsonl) if resume else frozenset()
    if done:
        logger.info("resuming %s: %d inputs already predicted are skipped", jsonl, len(done))
    images_dir = out / "images" if draw else None
    videos_dir = out / "videos" if video_out else None
    for folder in (out, images_dir, videos_dir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    drawings = _Drawings(images_dir, videos_dir, extra_drawing)

    def failure(frame: Frame) -> None:
        logger.warning("skipping %s: %s", frame.key, frame.error)
        writer.failure(frame)

    def result(det: Detections, frame: Frame) -> None:
        writer.result(det, frame)
        if frame.original is not None:
            drawings(det, frame)

    try:
        with JsonlWriter(jsonl, append=resume) as writer:
            predicted = stream_predictions(
                files, predictor, on_result=result, on_failure=failure, batch_size=batch_size,
                workers=workers, done=done, keep_original=draw or video_out, progress=progress)
    finally:
        drawings.close()
    images, detections, failed = write_coco_files(jsonl, out)
    return FolderSummary(predicted, images, detections, failed, jsonl)

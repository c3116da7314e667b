"""High-level inference: file paths or PIL images in, detections with names out."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from dabdetr.config import resolve_eval_resize
from dabdetr.data.batching import batch_images
from dabdetr.data.io import load_image_rgb, to_rgb
from dabdetr.data.transforms import make_eval_transforms
from dabdetr.models.dab_detr import DabDetr
from dabdetr.postprocessing import postprocess, resolve_num_select

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"}


@dataclass
class Detections:
    """Detections of one image, in its original pixel coordinates.

    boxes: [K, 4] float absolute xyxy; scores: [K]; labels: [K] int64 class indices;
    category_ids: dataset category ids of the labels; names: class names.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    category_ids: list[int]
    names: list[str]
    image_size: tuple[int, int]  # (height, width)
    source: str = ""

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results entries (bbox as [x, y, w, h])."""
        out = []
        for box, score, cat in zip(self.boxes.tolist(), self.scores.tolist(), self.category_ids,
                                   strict=True):
            x0, y0, x1, y1 = box
            out.append({"image_id": image_id, "category_id": cat, "score": round(score, 5),
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]})
        return out


def find_images(paths: Iterable[str | os.PathLike],
                suffixes: Collection[str] = frozenset(IMAGE_SUFFIXES)) -> list[Path]:
    """Expand directories (recursively, sorted) into the files whose suffix (lower case) is in
    `suffixes` (images by default); files are kept as given."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in suffixes))
        else:
            found.append(p)  # missing files are reported when read, not dropped silently
    return found


class Predictor:
    """Wraps a model with the evaluation preprocessing and post-processing.

    `model` is a DabDetr (or an `optimize`d one) on `device`, or any callable with the same
    forward contract and a `config`, such as `dabdetr.runtime.OnnxDetector` (which runs on the
    CPU). The resize is the model's own (`config.eval_size`/`eval_max_size`: what it was trained
    and evaluated with) unless `size`/`max_size` are given; see `resolve_eval_resize`.
    """

    def __init__(self, model: DabDetr | Callable, size: int | None = None,
                 max_size: int | None = None, num_select: int | None = None, threshold: float = 0.5,
                 device: str | torch.device | None = None):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold} is outside [0, 1]; scores are in [0, 1]")
        if isinstance(model, nn.Module):
            self.device = torch.device(device) if device else next(model.parameters()).device
            self.model = model.to(self.device).eval()
        else:
            self.device = torch.device("cpu")
            self.model = model
        self.config = model.config
        self.size, self.max_size = resolve_eval_resize(model.config, size, max_size)
        self.transform = make_eval_transforms(self.size, self.max_size)
        self.num_select = resolve_num_select(num_select, model.config)
        self.threshold = threshold

    def __call__(self, images: Sequence[Image.Image]) -> list[Detections]:
        """Detections of RGB PIL images, one Detections per image."""
        return self.detect([self.transform(img) for img in images],
                           [(img.height, img.width) for img in images])

    @torch.inference_mode()
    def detect(self, tensors: Sequence[Tensor], sizes: Sequence[tuple[int, int]]) -> list[Detections]:
        """Detections of images already transformed by `self.transform` ([3, h, w] float each;
        batched with padding) whose original (height, width) are `sizes`."""
        batch, mask = batch_images([t.to(self.device) for t in tensors])
        outputs = self.model(batch, mask)
        results = postprocess(outputs, sizes, self.num_select, self.threshold)
        cfg = self.config
        out = []
        for res, size in zip(results, sizes, strict=True):
            labels = res["labels"].cpu()
            out.append(Detections(
                boxes=res["boxes"].cpu(), scores=res["scores"].cpu(), labels=labels,
                category_ids=[cfg.category_id(int(i)) for i in labels],
                names=[cfg.label_name(int(i)) for i in labels], image_size=tuple(size)))
        return out


def predict(images: Sequence[str | os.PathLike | Image.Image] | str | os.PathLike | Image.Image,
            model: DabDetr | None = None, weights: str | os.PathLike | None = None,
            threshold: float = 0.5, device: str | None = None, **predictor_kwargs
            ) -> list[Detections]:
    """Detect objects in file paths or PIL images (one Detections per readable image).

    Give either a loaded `model` or a `weights` source (see `load_model`). Unreadable files
    raise; `predict_files` skips and reports them instead.
    """
    if model is None:
        if weights is None:
            raise ValueError("predict needs a model or a weights source")
        from dabdetr.weights.loading import load_model

        model = load_model(weights)
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    predictor = Predictor(model, threshold=threshold, device=device, **predictor_kwargs)
    results = []
    for item in images:
        img = item if isinstance(item, Image.Image) else load_image_rgb(item)
        # to_rgb, not convert("RGB"): PIL clips 16-bit images to white instead of scaling them
        det = predictor([to_rgb(img)])[0]
        det.source = "" if isinstance(item, Image.Image) else str(item)
        results.append(det)
    return results

"""High-level inference: file paths or PIL images in, detections with names out."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from dabdetr.config import resolve_eval_resize
from dabdetr.data.batching import batch_images
from dabdetr.data.io import load_image_rgb, to_rgb
from dabdetr.data.transforms import make_eval_transforms
from dabdetr.models.dab_detr import DabDetr
from dabdetr.postprocessing import postprocess

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


@dataclass
class PredictReport:
    detections: list[Detections] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand directories (recursively, sorted) into image files; files are kept as given."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)  # missing files are reported when read, not dropped silently
    return found


class Predictor:
    """Wraps a model with the evaluation preprocessing and post-processing.

    The resize is the model's own (`config.eval_size`/`eval_max_size`: what it was trained
    and evaluated with) unless `size`/`max_size` are given; see `resolve_eval_resize`.
    """

    def __init__(self, model: DabDetr, size: int | None = None, max_size: int | None = None,
                 num_select: int = 300, threshold: float = 0.5,
                 device: str | torch.device | None = None):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold} is outside [0, 1]; scores are in [0, 1]")
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.size, self.max_size = resolve_eval_resize(model.config, size, max_size)
        self.transform = make_eval_transforms(self.size, self.max_size)
        self.num_select = num_select
        self.threshold = threshold

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> list[Detections]:
        tensors = [self.transform(img) for img in images]
        batch, mask = batch_images([t.to(self.device) for t in tensors])
        outputs = self.model(batch, mask)
        sizes = [(img.height, img.width) for img in images]
        results = postprocess(outputs, sizes, self.num_select, self.threshold)
        cfg = self.model.config
        out = []
        for res, size in zip(results, sizes, strict=True):
            labels = res["labels"].cpu()
            out.append(Detections(
                boxes=res["boxes"].cpu(), scores=res["scores"].cpu(), labels=labels,
                category_ids=[cfg.category_id(int(i)) for i in labels],
                names=[cfg.label_name(int(i)) for i in labels], image_size=size))
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


def predict_files(files: Sequence[Path], predictor: Predictor, progress: bool = True,
                  on_result=None) -> PredictReport:
    """Run `predictor` over files, skipping (and reporting) those that cannot be read."""
    from tqdm import tqdm

    report = PredictReport()
    for path in tqdm(files, desc="predict", unit="img", disable=not progress):
        try:
            img = load_image_rgb(path)
        except Exception as err:  # PIL raises many types for bad files; each is reported
            logger.warning("skipping %s: cannot read image (%s)", path, err)
            report.failed.append((str(path), f"{type(err).__name__}: {err}"))
            continue
        det = predictor([img])[0]
        det.source = str(path)
        report.detections.append(det)
        if on_result is not None:
            on_result(det, img)
    return report

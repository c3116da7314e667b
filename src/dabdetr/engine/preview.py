"""A picture of a model's detections on a few validation images (for experiment trackers)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dabdetr.data.batching import batch_images
from dabdetr.models.dab_detr import DabDetr
from dabdetr.postprocessing import postprocess
from dabdetr.visualize import draw_detections, image_grid, to_uint8_image

__all__ = ["predictions_picture"]


@torch.no_grad()
def predictions_picture(model: DabDetr, dataset: Dataset, device: torch.device,
                        num_images: int = 4, threshold: float = 0.3,
                        max_boxes: int = 20) -> np.ndarray | None:
    """The model's detections on the first ``num_images`` readable items of ``dataset``.

    Args:
        dataset: items ``(normalized image [3, H, W], target)`` as `CocoDetection` gives them.
        threshold: minimum score drawn; at most ``max_boxes`` boxes per image.

    Returns:
        uint8 [H, W, 3] RGB grid of the images (as the model saw them) with boxes and
        "name score" captions; None if no item could be read.
    """
    was_training = model.training
    model.eval()
    tiles = []
    for index in range(min(len(dataset), num_images * 2)):
        item = dataset[index]
        if item is None:
            continue
        image, _ = item
        images, mask = batch_images([image.to(device)])
        outputs = model(images, mask)
        height, width = image.shape[-2:]
        result = postprocess(outputs, torch.tensor([[height, width]], device=device),
                             num_select=max_boxes)[0]
        keep = result["scores"] >= threshold
        labels = result["labels"][keep].tolist()
        names = [model.config.label_name(lab) for lab in labels]
        tiles.append(draw_detections(to_uint8_image(image), result["boxes"][keep].cpu(), labels,
                                     names, result["scores"][keep].cpu()))
        if len(tiles) == num_images:
            break
    model.train(was_training)
    if not tiles:
        return None
    return np.asarray(image_grid(tiles, columns=min(4, len(tiles))).convert("RGB"))

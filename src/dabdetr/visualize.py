"""Drawing detections and training curves."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

from dabdetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# A fixed, readable palette; class i gets colour i mod len.
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3",
           "#808000", "#000075", "#ffe119"]


def draw_detections(image: Image.Image | Tensor, boxes: Tensor, labels: Sequence[int],
                    names: Sequence[str], scores: Tensor | None = None,
                    width: int = 2) -> Image.Image:
    """Draw boxes with "name score" captions.

    image: PIL RGB or uint8 [3, H, W]; boxes: [K, 4] absolute xyxy in that image's pixels;
    labels: K class indices (pick the colour); names: K captions.
    """
    canvas = image if isinstance(image, Tensor) else TF.pil_to_tensor(image.convert("RGB"))
    if len(boxes) == 0:
        return TF.to_pil_image(canvas)
    captions = list(names)
    if scores is not None:
        captions = [f"{n} {float(s):.2f}" for n, s in zip(names, scores, strict=True)]
    colours = [PALETTE[int(lab) % len(PALETTE)] for lab in labels]
    drawn = draw_bounding_boxes(canvas, boxes.detach().float().cpu(), labels=captions,
                                colors=colours, width=width)
    return TF.to_pil_image(drawn)


def image_grid(images: Sequence[Image.Image], columns: int = 4, pad: int = 4) -> Image.Image:
    """Tile images (resized to the first one's size) into one picture."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    width, height = images[0].size
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    grid = Image.new("RGB", (cols * (width + pad) + pad, rows * (height + pad) + pad), "white")
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(img.resize((width, height)), (pad + c * (width + pad), pad + r * (height + pad)))
    return grid


def to_uint8_image(normalized: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Undo ImageNet normalization: [3, H, W] float -> uint8 [3, H, W]."""
    m = torch.tensor(mean, device=normalized.device)[:, None, None]
    s = torch.tensor(std, device=normalized.device)[:, None, None]
    return ((normalized * s + m).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def query_attention(model, images: Tensor, mask: Tensor | None = None, layer: int = -1):
    """What each query looks at: the model's cross-attention of one decoder layer, averaged
    over heads (`dabdetr.explain.attention_maps` gives every layer, per head, split into its
    positional and content parts).

    Args:
        model: a DabDetr in eval mode (or one wrapped by `dabdetr.optimize`).
        images: [B, 3, H, W]; mask: [B, H, W] bool or None.
        layer: decoder layer index (default: the last).
    Returns:
        (outputs, maps): the model's DetectionOutput and maps [B, N, h, w] float; each map
        sums to 1 over the image's valid cells.
    """
    from dabdetr.explain import attention_maps

    result = attention_maps(model, images, mask)
    return result.outputs, result.layers[layer].full.mean(2)


def draw_attention(image: Image.Image, attention: Tensor, box: Tensor | None = None,
                   caption: str = "") -> Image.Image:
    """Overlay one query's attention map [h, w] (upsampled) on the image, with its box."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps

    # the feature map covers the image rounded up to the stride: crop it back to the image
    width, height = image.size
    amap = attention.float().cpu()
    amap = (amap / amap.max().clamp(min=1e-12)).numpy()
    heat = Image.fromarray((colormaps["inferno"](amap)[..., :3] * 255).astype("uint8"))
    stride_h = height / amap.shape[0]
    stride_w = width / amap.shape[1]
    stride = max(stride_h, stride_w)
    heat = heat.resize((round(amap.shape[1] * stride), round(amap.shape[0] * stride)),
                       Image.BILINEAR).crop((0, 0, width, height))
    blended = Image.blend(image.convert("RGB"), heat, 0.55)
    if box is None:
        return blended
    return draw_detections(blended, box[None], [0], [caption], width=2)

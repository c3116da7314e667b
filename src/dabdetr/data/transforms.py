"""Training and evaluation augmentation, built on torchvision.transforms.v2.

Every pipeline here takes ``(image, target)`` where image is a PIL image (or a [3, H, W] uint8
tensor) and ``target = {"boxes": tv_tensors.BoundingBoxes (XYXY, absolute pixels), "labels":
int64 [N]}``, and returns the image as a normalized float [3, H', W'] tensor with the boxes
still absolute XYXY on the new canvas. Boxes become normalized cxcywh only once, at the end of
`CocoDetection.__getitem__` (`boxes_to_normalized_cxcywh`).

The official recipe (REFERENCE.md, "Training recipe"):

    train: horizontal flip (p 0.5); then, with p 0.5 each,
           resize short side to one of 480..800 (step 32), long side <= 1333
        or resize short side to 400/500/600 -> random crop, w and h in [384, 600]
           -> resize short side to one of 480..800, long side <= 1333
    eval:  short side 800, long side <= 1333
    both:  to float in [0, 1], ImageNet mean/std.

Resizing uses the authors' rounding rule (see `RandomShortestSideResize`), so evaluation
images have the exact sizes the published numbers were measured on. Resizing and cropping run
on PIL images, as upstream does; conversion to a tensor happens after them.

Smaller images: `scaled_recipe(512)` rescales every size in the recipe by 512/800, e.g. for
CPU training or a quick run (`scaled_recipe(800)` is the official recipe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFICIAL_SCALES",
    "RandomShortestSideResize",
    "RandomSizeCrop",
    "shortest_side_size",
    "TransformRecipe",
    "make_eval_transforms",
    "make_train_transforms",
    "scaled_recipe",
    "to_normalized_tensor",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
OFFICIAL_SCALES: tuple[int, ...] = tuple(range(480, 801, 32))  # 480, 512, ..., 800
OFFICIAL_MAX_SIZE = 1333
OFFICIAL_CROP_RESIZE: tuple[int, ...] = (400, 500, 600)
OFFICIAL_CROP_SIZE: tuple[int, int] = (384, 600)
OFFICIAL_EVAL_SIZE = 800


def _check_sizes(name: str, sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sizes)
    if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {sizes!r}")
    return sizes


def _check_max_size(max_size: int | None) -> None:
    if max_size is not None and (not isinstance(max_size, int) or max_size <= 0):
        raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")


class RandomShortestSideResize(v2.RandomShortestSize):
    """Resize the short side to a random one of ``min_size``, capping the long side.

    Same contract as torchvision's `RandomShortestSize`, with the authors' rounding: if the
    long side would exceed ``max_size``, the short side target becomes
    ``round(max_size * short / long)``; the short side is then set exactly to the target and
    the long side to ``int(target * long / short)`` (truncated). torchvision instead truncates
    ``side * ratio`` for both sides, which often differs by a pixel when the long-side cap is
    active (e.g. 200 x 640 -> 416 x 1333 instead of upstream's 417 x 1334: upstream may exceed
    ``max_size`` by a pixel). Matching upstream keeps evaluation of the published weights
    exact.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        target = self.min_size[int(torch.randint(len(self.min_size), ()))]
        return {"size": shortest_side_size(height, width, target, self.max_size)}


def shortest_side_size(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(new_h, new_w) with the short side at ``size`` and the long side <= ~``max_size``.

    The authors' rule, described in `RandomShortestSideResize`. An image whose short side
    already equals the target keeps its size.
    """
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose width and height are drawn independently.

    w ~ U{min_size .. min(W, max_size)}, h ~ U{min_size .. min(H, max_size)} (integers,
    inclusive), at a uniformly random position. A side shorter than ``min_size`` is kept
    whole. Boxes are shifted and clipped to the crop; boxes left with no area must be removed
    afterwards (`v2.SanitizeBoundingBoxes`), as `make_train_transforms` does.
    torchvision's `RandomResizedCrop` draws scale and aspect ratio instead and resizes, and
    `RandomIoUCrop` is SSD's; neither is this recipe.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not (
            isinstance(min_size, int) and isinstance(max_size, int) and 0 < min_size <= max_size
        ):
            raise ValueError(
                f"need ints 0 < min_size <= max_size, got min_size={min_size!r}, "
                f"max_size={max_size!r}"
            )
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_w = self._draw(width)
        crop_h = self._draw(height)
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def _draw(self, side: int) -> int:
        high = min(side, self.max_size)
        low = min(self.min_size, high)
        return int(torch.randint(low, high + 1, ()))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def to_normalized_tensor() -> v2.Compose:
    """PIL/uint8 image -> float32 [3, H, W] normalized with ImageNet mean/std; boxes untouched."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def make_train_transforms(
    scales: Sequence[int] = OFFICIAL_SCALES,
    max_size: int | None = OFFICIAL_MAX_SIZE,
    crop_resize: Sequence[int] | None = OFFICIAL_CROP_RESIZE,
    crop_size: tuple[int, int] = OFFICIAL_CROP_SIZE,
    hflip_prob: float = 0.5,
) -> v2.Compose:
    """The official training augmentation (defaults), with every size configurable.

    Args:
        scales: candidate short-side lengths of the final resize.
        max_size: cap on the long side after the final resize (None: no cap).
        crop_resize: short-side lengths of the resize before the crop; None disables the crop
            branch (then every image gets only the multi-scale resize).
        crop_size: (min, max) of the crop's width and height.
        hflip_prob: probability of a horizontal flip.

    Boxes clipped to the image and boxes under 1 pixel wide or high after augmentation are
    removed with their labels (`v2.SanitizeBoundingBoxes`; upstream keeps any positive width,
    a difference only for sub-pixel boxes).
    """
    scales = _check_sizes("scales", scales)
    _check_max_size(max_size)
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob!r}")
    multi_scale = RandomShortestSideResize(scales, max_size=max_size)
    if crop_resize is None:
        geometric: v2.Transform = multi_scale
    else:
        crop_resize = _check_sizes("crop_resize", crop_resize)
        if len(crop_size) != 2:
            raise ValueError(f"crop_size must be (min, max), got {crop_size!r}")
        geometric = v2.RandomChoice(
            [
                multi_scale,
                v2.Compose(
                    [
                        RandomShortestSideResize(crop_resize),
                        RandomSizeCrop(*crop_size),
                        RandomShortestSideResize(scales, max_size=max_size),
                    ]
                ),
            ]
        )
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=hflip_prob),
            geometric,
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(),
            to_normalized_tensor(),
        ]
    )


def make_eval_transforms(
    size: int = OFFICIAL_EVAL_SIZE, max_size: int | None = OFFICIAL_MAX_SIZE
) -> v2.Compose:
    """Deterministic evaluation/inference transform: short side ``size``, long side capped."""
    _check_sizes("size", (size,))
    _check_max_size(max_size)
    return v2.Compose([RandomShortestSideResize(size, max_size=max_size), to_normalized_tensor()])


@dataclass(frozen=True)
class TransformRecipe:
    """Every size in the augmentation recipe, as plain data (storable in a training config).

    The defaults are the official recipe. ``crop_resize=None`` disables the crop branch.
    """

    scales: tuple[int, ...] = OFFICIAL_SCALES
    max_size: int | None = OFFICIAL_MAX_SIZE
    crop_resize: tuple[int, ...] | None = OFFICIAL_CROP_RESIZE
    crop_size: tuple[int, int] = OFFICIAL_CROP_SIZE
    eval_size: int = OFFICIAL_EVAL_SIZE
    eval_max_size: int | None = OFFICIAL_MAX_SIZE

    def train_transforms(self, hflip: bool = True) -> v2.Compose:
        """The training pipeline; hflip=False leaves out the horizontal flip."""
        return make_train_transforms(self.scales, self.max_size, self.crop_resize, self.crop_size,
                                     hflip_prob=0.5 if hflip else 0.0)

    def eval_transforms(self) -> v2.Compose:
        return make_eval_transforms(self.eval_size, self.eval_max_size)


def scaled_recipe(max_short_side: int) -> TransformRecipe:
    """The official recipe with every size multiplied by ``max_short_side / 800`` (floored).

    ``scaled_recipe(800)`` is the official recipe. ``scaled_recipe(512)`` gives scales
    307..512 (11 values), long side <= 853, crop_resize 256/320/384, crop_size 245..384 and
    eval short side 512 (long side <= 853): about 2.4x fewer pixels per image than the
    official recipe, for CPU or small-GPU training. Models trained at one recipe should be
    evaluated with the same recipe's eval size.
    """
    if not isinstance(max_short_side, int) or max_short_side <= 0:
        raise ValueError(f"max_short_side must be a positive int, got {max_short_side!r}")

    def scale(size: int) -> int:
        # integer floor, so 400 * 512 / 800 is exactly 256 (no float 255.999...)
        return max(1, size * max_short_side // OFFICIAL_EVAL_SIZE)

    def scale_all(sizes: Sequence[int]) -> tuple[int, ...]:
        return tuple(sorted({scale(s) for s in sizes}))

    return TransformRecipe(
        scales=scale_all(OFFICIAL_SCALES),
        max_size=scale(OFFICIAL_MAX_SIZE),
        crop_resize=scale_all(OFFICIAL_CROP_RESIZE),
        crop_size=(scale(OFFICIAL_CROP_SIZE[0]), scale(OFFICIAL_CROP_SIZE[1])),
        eval_size=scale(OFFICIAL_EVAL_SIZE),
        eval_max_size=scale(OFFICIAL_MAX_SIZE),
    )

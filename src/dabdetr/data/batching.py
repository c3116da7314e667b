"""Batching of differently sized images into one padded tensor with a padding mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def batch_images(images: Sequence[Tensor], size_divisibility: int = 0) -> tuple[Tensor, Tensor]:
    """Pad a list of images to a common size, as the authors' code does.

    Args:
        images: C x H_i x W_i float tensors (C is the same for all).
        size_divisibility: if > 0, round the padded height and width up to a multiple of it
            (upstream uses 0; a multiple of 32 can help speed on accelerators).

    Returns:
        images: [B, C, H, W] with each image in the top-left corner, zeros elsewhere
            (bottom/right padding). The inputs are not modified.
        mask: [B, H, W] bool, True on padded pixels, False on real ones.
    """
    if len(images) == 0:
        raise ValueError("batch_images needs at least one image, got an empty list")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3:
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"image {i} must be a [C, H, W] tensor, got {shape}")
    channels = {img.shape[0] for img in images}
    if len(channels) != 1:
        raise ValueError(f"all images must have the same channel count, got {sorted(channels)}")
    height = max(img.shape[1] for img in images)
    width = max(img.shape[2] for img in images)
    if size_divisibility > 0:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for img, pad_img, pad_mask in zip(images, batch, mask, strict=True):
        pad_img[:, : img.shape[1], : img.shape[2]].copy_(img)
        pad_mask[: img.shape[1], : img.shape[2]] = False
    return batch, mask

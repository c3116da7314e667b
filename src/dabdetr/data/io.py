"""Reading image files into 8-bit RGB, the one format the rest of the library accepts."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from dabdetr.errors import BadImageError

logger = logging.getLogger(__name__)

__all__ = ["load_image_rgb", "to_rgb"]


def load_image_rgb(path: str | os.PathLike[str], exif_transpose: bool = True) -> Image.Image:
    """Open an image file as an 8-bit RGB PIL image.

    Args:
        path: image file (anything PIL reads).
        exif_transpose: apply the EXIF orientation tag, so the image is upright as viewers show
            it (phone photos). Pass False to keep the stored pixel orientation.

    Returns:
        A loaded (file closed) PIL image in mode "RGB"; see `to_rgb` for the mode conversions.

    Raises:
        BadImageError (a UserError and an OSError) naming the file if it is missing, truncated,
        not an image, or larger than PIL's decompression-bomb limit. An image above PIL's
        warning size (half the limit) is read, with a logged warning naming it.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            rgb = _read_rgb(path, exif_transpose)
    except Image.DecompressionBombError as err:
        raise BadImageError(f"{path}: {err}; not read (it could exhaust memory). Raise "
                            "PIL.Image.MAX_IMAGE_PIXELS if the image is trusted") from None
    except FileNotFoundError:
        raise BadImageError(f"{path}: no such file; check the path") from None
    except Exception as err:  # PIL and its plugins raise many types for a broken file
        raise BadImageError(f"cannot read image {path}: {type(err).__name__}: {err}") from None
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            logger.warning("%s is very large (%d x %d pixels); reading it takes much memory",
                           path, rgb.width, rgb.height)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    return rgb


def _read_rgb(path: str | os.PathLike[str], exif_transpose: bool) -> Image.Image:
    with Image.open(path) as opened:
        opened.load()
        img = opened
        if exif_transpose:
            try:
                img = ImageOps.exif_transpose(opened)
            except Exception as err:  # a malformed EXIF block must not make a good image unusable
                logger.warning("ignoring unreadable EXIF orientation of %s: %s", path, err)
        rgb = to_rgb(img)
        # Never hand out the file-backed object: it is closed when this block exits.
        return rgb.copy() if rgb is opened else rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    - RGB: returned as is.
    - 16-bit grayscale ("I;16", "I;16B", "I;16L"): scaled by 255/65535 (not clipped, which
      would turn most 16-bit images white).
    - 32-bit integer "I" (how some Pillow versions open 16-bit PNGs): scaled by 255/65535 when
      any value exceeds 255, else taken as 8-bit values.
    - float "F": values in [0, 1] scaled by 255, otherwise clipped to [0, 255].
    - palette with transparency: expanded through RGBA; alpha channels (RGBA, LA, PA) are
      dropped, as the authors' pipeline (PIL ``convert("RGB")``) does.
    - everything else (L, 1, P, CMYK, YCbCr, ...): PIL's ``convert("RGB")``.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        values = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        elif mode == "F":
            scale = 255.0 if values.size == 0 or values.max() <= 1.0 else 1.0
        else:  # "I": 32-bit container, usually holding 16-bit data
            scale = 255.0 / 65535.0 if values.size and values.max() > 255 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")

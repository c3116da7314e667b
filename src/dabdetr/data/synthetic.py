"""Deterministic synthetic shape-detection benchmark, written in COCO-2017 layout.

Each image shows 1 to ~16 coloured shapes (circle, square, triangle, star, cross, ring) on a
plain or textured background. It exists so that tests, the CPU demo and convergence benchmarks
have a detection problem that is cheap to make, needs no download, and is learnable from scratch
by a small DETR.

Layout written by :func:`generate_dataset`::

    out_dir/train/000000.png ...               RGB uint8 PNGs of the train split
    out_dir/val/000000.png ...
    out_dir/annotations/instances_train.json   COCO detection json
    out_dir/annotations/instances_val.json
    out_dir/dataset.json                       generator arguments (see dataset_matches)

Annotation conventions (standard COCO):
    * category ids are 1..K in the order of :data:`CLASS_NAMES` (id = index + 1);
    * image ids and annotation ids start at 1 (pycocotools' COCOeval treats a matched
      annotation id of 0 as "unmatched", so 0 is never used); image ``id`` i has
      ``file_name`` f"{i - 1:06d}.png", relative to the split folder;
    * ``bbox`` is [x, y, w, h] in absolute pixels (floats): the tight box of the *whole* shape,
      occluded parts included, clipped to the image; w and h are always >= 2 px;
    * ``area`` is the number of visible pixels of the object (its pixels not covered by later
      objects), like COCO's mask area. Every object keeps at least half of its in-image pixels
      visible; objects that would fall below that are re-placed or dropped.

Determinism: every image has its own ``np.random.default_rng`` seeded from
(seed, split, index), so the output does not depend on the order or the number of images made,
and train and val come from disjoint streams. Same arguments, same library versions and same
machine give byte-identical PNG and json files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from dabdetr.argtypes import non_negative_int, positive_int

__all__ = [
    "CLASS_NAMES",
    "DIFFICULTIES",
    "GENERATOR_VERSION",
    "add_cli_arguments",
    "dataset_matches",
    "generate_dataset",
    "run_cli",
]

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
"""Shape classes; the COCO category id of ``CLASS_NAMES[i]`` is ``i + 1``."""

DIFFICULTIES: tuple[str, ...] = ("easy", "standard", "hard")

GENERATOR_VERSION = 1
"""Bump whenever the pixels or annotations for given arguments change, so that
:func:`dataset_matches` rejects folders written by an older generator."""

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096

SPLITS: tuple[str, ...] = ("train", "val")

# Distinct SeedSequence words per split keep train and val streams disjoint for the same seed;
# the salt keeps them apart from other consumers of the same user seed (e.g. model init).
_SPLIT_STREAM = {"train": 0, "val": 1}
_SEED_SALT = 0x5D47_DE7A

# Shapes are rasterised at this many sub-pixels per pixel and box-filtered down: deterministic
# anti-aliasing, and a coverage estimate good to 1/16 px^2 for the visibility test.
_SUPERSAMPLE = 4
_CIRCLE_VERTICES = 64  # deviation from a true circle: r * (1 - cos(pi / 64)) < 0.1 px at r=64
_COLOUR_CANDIDATES = 8  # fixed number of draws per object keeps the random stream layout stable
_MIN_BOX_SIDE = 2.0


@dataclass(frozen=True)
class DifficultyConfig:
    """Knobs of one difficulty level. Sizes are circumscribed-circle diameters as fractions of
    the shorter image side, drawn log-uniformly; colours are RGB in [0, 255]."""

    objects: tuple[int, int]  # inclusive range of how many objects to try to place
    size: tuple[float, float]
    min_size_px: float  # floor on the diameter so that small images still give usable shapes
    textured: bool  # False: one uniform colour
    gradient_amplitude: float  # colour spread of the smooth large-scale gradient
    blob_probability: float
    blob_amplitude: tuple[float, float]
    stripe_probability: float
    stripe_amplitude: tuple[float, float]
    clutter: tuple[int, int]  # unannotated lines/arcs drawn under the objects
    noise_sigma: tuple[float, float]  # per-pixel gaussian noise over the whole image
    min_contrast: float  # RGB distance between an object and what lies under it
    contrast_scale: tuple[float, float]  # < 1 pulls object colours toward the background
    shading: float  # colour change across an object (a soft lighting gradient)
    min_visible: float = 0.5  # fraction of an object's in-image pixels that must stay visible
    max_attempts_per_object: int = 8


DIFFICULTY_CONFIGS: dict[str, DifficultyConfig] = {
    "easy": DifficultyConfig(
        objects=(1, 3),
        size=(0.25, 0.6),
        min_size_px=12.0,
        textured=False,
        gradient_amplitude=0.0,
        blob_probability=0.0,
        blob_amplitude=(0.0, 0.0),
        stripe_probability=0.0,
        stripe_amplitude=(0.0, 0.0),
        clutter=(0, 0),
        noise_sigma=(0.0, 0.0),
        min_contrast=110.0,
        contrast_scale=(1.0, 1.0),
        shading=0.0,
    ),
    "standard": DifficultyConfig(
        objects=(1, 10),
        size=(0.06, 0.5),
        min_size_px=8.0,
        textured=True,
        gradient_amplitude=70.0,
        blob_probability=0.6,
        blob_amplitude=(10.0, 30.0),
        stripe_probability=0.35,
        stripe_amplitude=(6.0, 18.0),
        clutter=(0, 0),
        noise_sigma=(2.0, 7.0),
        min_contrast=90.0,
        contrast_scale=(1.0, 1.0),
        shading=25.0,
    ),
    "hard": DifficultyConfig(
        objects=(3, 16),
        size=(0.04, 0.35),
        min_size_px=8.0,
        textured=True,
        gradient_amplitude=90.0,
        blob_probability=0.9,
        blob_amplitude=(20.0, 45.0),
        stripe_probability=0.5,
        stripe_amplitude=(10.0, 28.0),
        clutter=(4, 14),
        noise_sigma=(8.0, 16.0),
        min_contrast=40.0,
        contrast_scale=(0.35, 0.65),
        shading=35.0,
    ),
}


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One object's geometry in absolute pixel coordinates (x right, y down, pixel (i, j)
    covers [j, j+1) x [i, i+1)).

    ``polygons`` are drawn in order, each as (vertices [N, 2] float64 xy, fill) with fill 1 to
    add the polygon and 0 to cut it out (the hole of a ring). The first polygon is the outline.
    """

    category_id: int
    polygons: tuple[tuple[np.ndarray, int], ...]

    def box_xyxy(self) -> np.ndarray:
        """Tight [4] float64 absolute xyxy box of the whole (unclipped) shape."""
        outline = self.polygons[0][0]
        return np.concatenate([outline.min(axis=0), outline.max(axis=0)])


def _regular_polygon(num_vertices: int, phase: float = 0.0) -> np.ndarray:
    """[num_vertices, 2] xy points on the unit circle."""
    angles = phase + np.arange(num_vertices) * (2.0 * math.pi / num_vertices)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _unit_polygons(name: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons of a shape centred at 0 whose outline fits exactly in the unit circle."""
    if name == "circle":
        return [(_regular_polygon(_CIRCLE_VERTICES), 1)]
    if name == "square":
        return [(_regular_polygon(4, math.pi / 4), 1)]
    if name == "triangle":
        return [(_regular_polygon(3, -math.pi / 2), 1)]
    if name == "star":
        # Inner radius well below cos(36 deg) = 0.81 so the points stay sharp at small sizes.
        radii = np.tile([1.0, rng.uniform(0.38, 0.5)], 5)
        return [(_regular_polygon(10, -math.pi / 2) * radii[:, None], 1)]
    if name == "cross":
        half_width = rng.uniform(0.22, 0.34)
        a, t = 1.0, half_width
        pts = np.array(
            [(t, -a), (t, -t), (a, -t), (a, t), (t, t), (t, a),
             (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t), (-t, -a)]
        )  # fmt: skip
        return [(pts / np.hypot(a, t), 1)]
    if name == "ring":
        # The hole must be large enough to read as a ring, small enough to leave a >= 2 px band.
        inner = rng.uniform(0.45, 0.62)
        return [
            (_regular_polygon(_CIRCLE_VERTICES), 1),
            (_regular_polygon(_CIRCLE_VERTICES) * inner, 0),
        ]
    raise ValueError(f"unknown shape {name!r}; expected one of {CLASS_NAMES}")


def sample_shape(
    rng: np.random.Generator, category_id: int, diameter: float, center: tuple[float, float]
) -> Shape:
    """A randomly rotated shape of class ``CLASS_NAMES[category_id - 1]``.

    Args:
        diameter: circumscribed-circle diameter in pixels.
        center: (x, y) absolute pixel coordinates of the circumscribed circle's centre.
    """
    name = CLASS_NAMES[category_id - 1]
    polygons = _unit_polygons(name, rng)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, sin], [-sin, cos]])  # row-vector convention: p @ rotation
    offset = np.asarray(center, dtype=np.float64)
    placed = tuple((pts @ rotation * (diameter / 2.0) + offset, fill) for pts, fill in polygons)
    return Shape(category_id=category_id, polygons=placed)


def rasterize(shape: Shape, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """Anti-aliased coverage of ``shape`` on the pixel window [x0, x0+width) x [y0, y0+height).

    Returns:
        [height, width] float32 in [0, 1]: the fraction of each pixel covered by the shape.
    """
    s = _SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    origin = np.array([x0, y0], dtype=np.float64)
    for pts, fill in shape.polygons:
        # PIL samples a polygon at integer sub-pixel coordinates; shifting by half a sub-pixel
        # makes it sample sub-pixel centres, so coverage and the analytic box agree.
        sub = (pts - origin) * s - 0.5
        draw.polygon([tuple(p) for p in sub.tolist()], fill=255 * fill)
    return np.asarray(canvas.reduce(s), dtype=np.float32) / 255.0


# --------------------------------------------------------------------------------------------
# Image rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedObject:
    """One annotated object of a rendered image."""

    category_id: int
    box_xyxy: tuple[float, float, float, float]  # absolute pixels, whole shape, clipped to image
    full_area: int  # in-image pixels with coverage >= 0.5, before any occlusion
    visible_area: int  # of those, pixels not covered by later objects


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _interpolation_matrix(size: int, grid: int) -> np.ndarray:
    """[size, grid] float32 weights that resample ``grid`` evenly spread nodes to ``size``
    pixel centres: linear interpolation with smoothstep-eased weights, so the field has no
    visible kinks at the nodes (C1) and each row sums to 1."""
    position = (np.arange(size, dtype=np.float32) + 0.5) * np.float32((grid - 1) / size)
    weight = np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(grid, dtype=np.float32)))
    weight = weight * weight * (3.0 - 2.0 * weight)
    return weight / weight.sum(axis=1, keepdims=True)


def _smooth_field(
    rng: np.random.Generator, grid: int, amplitude: float, height: int, width: int
) -> np.ndarray:
    """[3, height, width] float32 smooth colour field in [-amplitude, amplitude]: a random
    grid x grid field interpolated over the image (a gradient for grid 2-3, blobs above).
    Two small matrix products; several times cheaper than resizing each channel with PIL."""
    small = rng.uniform(-amplitude, amplitude, size=(3, grid, grid)).astype(np.float32)
    rows = _interpolation_matrix(height, grid)  # [H, g]
    cols = _interpolation_matrix(width, grid)  # [W, g]
    return rows @ small @ cols.T  # [3, H, W]


def _background(
    rng: np.random.Generator, height: int, width: int, cfg: DifficultyConfig
) -> np.ndarray:
    """[3, height, width] float32 RGB background (values may leave [0, 255]; clipped later)."""
    base = rng.uniform(0.0, 255.0, size=(3, 1, 1)).astype(np.float32)
    if not cfg.textured:
        return np.broadcast_to(base, (3, height, width)).copy()
    grid = int(rng.integers(2, 4))
    canvas = _smooth_field(rng, grid, cfg.gradient_amplitude, height, width)
    canvas += base
    if rng.uniform() < cfg.blob_probability:
        amplitude = rng.uniform(*cfg.blob_amplitude)
        canvas += _smooth_field(rng, int(rng.integers(5, 11)), amplitude, height, width)
    if rng.uniform() < cfg.stripe_probability:
        amplitude = rng.uniform(*cfg.stripe_amplitude)
        period = rng.uniform(6.0, 40.0)
        angle = rng.uniform(0.0, math.pi)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        colour = rng.uniform(-amplitude, amplitude, size=(3, 1, 1)).astype(np.float32)
        ys = np.arange(height, dtype=np.float32)[:, None]
        xs = np.arange(width, dtype=np.float32)[None, :]
        wave = np.sin(
            (xs * math.cos(angle) + ys * math.sin(angle)) * np.float32(2.0 * math.pi / period)
            + np.float32(phase)
        )  # [H, W]
        canvas += wave * colour
    return canvas


def _to_uint8_hwc(canvas: np.ndarray) -> np.ndarray:
    """[3, H, W] float canvas -> [H, W, 3] uint8, rounded and clipped."""
    return np.ascontiguousarray(
        np.clip(np.rint(canvas), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    )


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray, count: int) -> np.ndarray:
    """Draw ``count`` unannotated thin lines and open arcs (distractors) onto a [3, H, W]
    float canvas; returns the new [3, H, W] float32 canvas."""
    if count == 0:
        return canvas
    height, width = canvas.shape[1:]
    image = Image.fromarray(_to_uint8_hwc(canvas))
    draw = ImageDraw.Draw(image)
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        line_width = int(rng.integers(1, 4))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        length = rng.uniform(0.1, 0.5) * min(height, width)
        if rng.uniform() < 0.5:
            angle = rng.uniform(0.0, 2.0 * math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=colour, width=line_width)
        else:
            r = length / 2
            start = rng.uniform(0.0, 360.0)
            sweep = rng.uniform(40.0, 200.0)  # < 360: an open arc, never a full ring
            draw.arc([x - r, y - r, x + r, y + r], start, start + sweep, colour, line_width)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()


def _pick_colour(rng: np.random.Generator, under: np.ndarray, cfg: DifficultyConfig) -> np.ndarray:
    """[3] float32 object colour at least ``cfg.min_contrast`` (RGB distance) away from
    ``under``, the mean colour of what the object will cover, when one of the candidates
    allows it; otherwise the most distant candidate."""
    candidates = rng.uniform(0.0, 255.0, size=(_COLOUR_CANDIDATES, 3))
    scale = rng.uniform(*cfg.contrast_scale)
    colours = under + (candidates - under) * scale
    distance = np.linalg.norm(colours - under, axis=1)
    good = np.flatnonzero(distance >= cfg.min_contrast)
    choice = int(good[0]) if good.size else int(np.argmax(distance))
    return colours[choice].astype(np.float32)


def render_image(
    rng: np.random.Generator, height: int, width: int, difficulty: str = "standard"
) -> tuple[np.ndarray, list[RenderedObject], np.ndarray]:
    """Render one synthetic image and its annotations.

    Returns:
        image: [height, width, 3] uint8 RGB.
        objects: annotated objects in drawing order (later ones are on top).
        owner: [height, width] int32; 0 where the background shows, k where objects[k - 1] is
            the top-most object with coverage >= 0.5.
    """
    cfg = DIFFICULTY_CONFIGS[difficulty]
    canvas = _background(rng, height, width, cfg)  # [3, H, W] float32; channel-first so that
    # per-pixel work is on contiguous planes and the final noise is one broadcast add
    canvas = _draw_clutter(rng, canvas, int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1)))

    owner = np.zeros((height, width), dtype=np.int32)
    full_areas: list[int] = [0]  # index 0 is the background
    visible_areas: list[int] = [0]
    boxes: list[tuple[float, float, float, float]] = []
    categories: list[int] = []
    short_side = min(height, width)
    min_diameter = max(cfg.min_size_px, cfg.size[0] * short_side)
    max_diameter = max(min_diameter, cfg.size[1] * short_side)

    target = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    for _ in range(target * cfg.max_attempts_per_object):
        if len(categories) == target:
            break
        category_id = int(rng.integers(1, len(CLASS_NAMES) + 1))
        diameter = _log_uniform(rng, min_diameter, max_diameter)
        # Keep the centre at least 0.3 diameters from the border: a shape may be cut by the
        # image edge, but by at most ~20% of its extent on each axis.
        margin = min(0.3 * diameter, 0.5 * short_side)
        center = (rng.uniform(margin, width - margin), rng.uniform(margin, height - margin))
        shape = sample_shape(rng, category_id, diameter, center)

        bx0, by0, bx1, by1 = shape.box_xyxy()
        cx0, cy0 = max(bx0, 0.0), max(by0, 0.0)
        cx1, cy1 = min(bx1, float(width)), min(by1, float(height))
        if cx1 - cx0 < _MIN_BOX_SIDE or cy1 - cy0 < _MIN_BOX_SIDE:
            continue
        px0, py0 = int(math.floor(cx0)), int(math.floor(cy0))
        px1, py1 = int(math.ceil(cx1)), int(math.ceil(cy1))
        alpha = rasterize(shape, px0, py0, px1 - px0, py1 - py0)  # [ph, pw]
        mask = alpha >= 0.5
        full_area = int(mask.sum())
        if full_area == 0:
            continue

        # Occlusion test: pixels of earlier objects that this one would cover.
        window = owner[py0:py1, px0:px1]
        covered = np.bincount(window[mask], minlength=len(full_areas))
        remaining = np.asarray(visible_areas) - covered
        if np.any(remaining[1:] < cfg.min_visible * np.asarray(full_areas[1:])):
            continue

        patch = canvas[:, py0:py1, px0:px1]  # [3, ph, pw] view
        colour = _pick_colour(rng, patch[:, mask].mean(axis=1), cfg)
        gradient = rng.uniform(-1.0, 1.0, size=2) * (cfg.shading / diameter)
        ys = np.arange(py0, py1, dtype=np.float32)[:, None] - np.float32(center[1])
        xs = np.arange(px0, px1, dtype=np.float32)[None, :] - np.float32(center[0])
        shade = xs * np.float32(gradient[0]) + ys * np.float32(gradient[1])  # [ph, pw]
        fill = colour[:, None, None] + shade  # [3, ph, pw]
        patch *= 1.0 - alpha
        patch += fill * alpha

        window[mask] = len(full_areas)
        visible_areas = [int(v) for v in remaining] + [full_area]
        full_areas.append(full_area)
        boxes.append((cx0, cy0, cx1, cy1))
        categories.append(category_id)

    sigma = rng.uniform(*cfg.noise_sigma)
    if sigma > 0:
        # Luminance noise, the same on all channels: a third of the draws of per-channel noise
        # (drawing normals is the costliest step of a plain image) and still sensor-like.
        canvas += rng.standard_normal((height, width), dtype=np.float32) * np.float32(sigma)
    image = _to_uint8_hwc(canvas)
    objects = [
        RenderedObject(category_id=c, box_xyxy=b, full_area=f, visible_area=v)
        for c, b, f, v in zip(categories, boxes, full_areas[1:], visible_areas[1:], strict=True)
    ]
    return image, objects, owner


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of image ``index`` of ``split``: independent of every other image,
    so images can be made in any order or in parallel with the same result."""
    return np.random.default_rng(
        np.random.SeedSequence([_SEED_SALT, seed, _SPLIT_STREAM[split], index])
    )


# --------------------------------------------------------------------------------------------
# Dataset writing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    num_train: int
    num_val: int
    seed: int
    difficulty: str
    height: int
    width: int

    def metadata(self) -> dict[str, Any]:
        """The plain-data content of dataset.json."""
        return {
            "generator": "dabdetr.data.synthetic",
            "version": GENERATOR_VERSION,
            "seed": self.seed,
            "difficulty": self.difficulty,
            "num_train": self.num_train,
            "num_val": self.num_val,
            "height": self.height,
            "width": self.width,
            "class_names": list(CLASS_NAMES),
        }


def _check_int(name: str, value: object, minimum: int, fix: str) -> int:
    # bool is an int subclass; True as a count is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__}); {fix}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; {fix}")
    return int(value)


def _make_spec(
    num_train: int, num_val: int, seed: int, difficulty: str, image_size: int | tuple[int, int]
) -> _Spec:
    num_train = _check_int("num_train", num_train, 0, "pass the number of train images")
    num_val = _check_int("num_val", num_val, 0, "pass the number of val images")
    seed = _check_int("seed", seed, 0, "use a non-negative integer seed")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; use one of {', '.join(DIFFICULTIES)}")
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2:
            raise ValueError(
                f"image_size must be an int or a (height, width) pair, got {image_size!r}"
            )
        height, width = image_size
    else:
        height = width = image_size
    fix = f"use a size between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels"
    height = _check_int("image height", height, MIN_IMAGE_SIZE, fix)
    width = _check_int("image width", width, MIN_IMAGE_SIZE, fix)
    if max(height, width) > MAX_IMAGE_SIZE:
        raise ValueError(f"image_size {image_size!r} is larger than {MAX_IMAGE_SIZE}; {fix}")
    return _Spec(num_train, num_val, seed, difficulty, height, width)


def _write_json_atomic(path: Path, data: object, indent: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)
        f.write("\n")
    os.replace(tmp, path)


def _file_name(index: int) -> str:
    return f"{index:06d}.png"


# Below this many images, worker processes cost more to start than they save.
PARALLEL_MIN_IMAGES = 256


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cpus or 1)


def default_workers() -> int:
    """Processes `dabdetr synth` and `dabdetr demo` render with: `available_cpus()`, at most 8."""
    return min(available_cpus(), 8)


def _render_and_save(task: tuple[Path, str, int, _Spec]) -> list[tuple[int, tuple, int]]:
    """Render image `index` of `split`, save it as PNG in `image_dir`; returns its objects as
    (category id, xyxy box, visible area). Depends only on its arguments (its own RNG), so any
    process may run it."""
    image_dir, split, index, spec = task
    image, objects, _ = render_image(
        image_rng(spec.seed, split, index), spec.height, spec.width, spec.difficulty
    )
    # compress_level 1: noisy images barely compress further at higher levels, and level 6
    # triples the encoding time. Fixed level + no optimize keeps the bytes deterministic.
    Image.fromarray(image).save(image_dir / _file_name(index), format="PNG", compress_level=1)
    return [(obj.category_id, obj.box_xyxy, obj.visible_area) for obj in objects]


def _write_split(out: Path, split: str, count: int, spec: _Spec, bar: tqdm,
                 pool: Executor | None) -> dict[str, Any]:
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    tasks = ((image_dir, split, index, spec) for index in range(count))
    rendered = (pool.map(_render_and_save, tasks, chunksize=16) if pool is not None
                else map(_render_and_save, tasks))
    for index, objects in enumerate(rendered):  # in index order either way
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": _file_name(index), "width": spec.width,
             "height": spec.height}
        )
        for category_id, (x0, y0, x1, y1), visible_area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                    "area": float(visible_area),
                    "iscrowd": 0,
                }
            )
        bar.update(1)
    coco = {
        "info": {
            "description": f"dabdetr synthetic shapes ({spec.difficulty}, {split})",
            "version": str(GENERATOR_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(CLASS_NAMES)
        ],
    }
    ann_path = out / "annotations" / f"instances_{split}.json"
    _write_json_atomic(ann_path, coco)
    return {
        "images_dir": str(image_dir),
        "annotations": str(ann_path),
        "num_images": count,
        "num_annotations": len(annotations),
    }


def generate_dataset(
    out_dir: str | os.PathLike[str],
    num_train: int,
    num_val: int,
    seed: int = 0,
    difficulty: str = "standard",
    image_size: int | tuple[int, int] = 256,
    progress: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Write a synthetic detection dataset in COCO layout (see the module docstring).

    Args:
        out_dir: folder to write into; created if missing. Existing files of the same names are
            overwritten; dataset.json is removed first and written last, so an interrupted run
            never looks complete to :func:`dataset_matches`.
        num_train, num_val: number of images per split (0 allowed).
        seed: non-negative int; the same seed and arguments give byte-identical files.
        difficulty: "easy", "standard" or "hard".
        image_size: side in pixels, or a (height, width) pair; each between 32 and 4096.
        progress: show a tqdm progress bar on stderr.
        workers: processes that render and encode the images (1: this process only;
            `default_workers()` is what `dabdetr synth` and `dabdetr demo` use). The files are
            the same for any count. More than one starts fresh ("spawn") processes, so a
            script that asks for them must call this under ``if __name__ == "__main__":``.
            Datasets under PARALLEL_MIN_IMAGES images are made in this process.

    Returns:
        {"out_dir", "metadata": path of dataset.json, "train"/"val": {"images_dir",
        "annotations", "num_images", "num_annotations"}, "seconds", "images_per_second"}.
    """
    spec = _make_spec(num_train, num_val, seed, difficulty, image_size)
    workers = _check_int("workers", workers, 1, "pass 1 or more processes")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a folder; pass a folder path")
    start = time.perf_counter()
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    metadata_path = out / "dataset.json"
    metadata_path.unlink(missing_ok=True)

    summary: dict[str, Any] = {"out_dir": str(out), "metadata": str(metadata_path)}
    total = spec.num_train + spec.num_val
    parallel = workers > 1 and total >= PARALLEL_MIN_IMAGES
    # spawn, not fork: the caller may hold threads (torch's) that a forked child must not inherit
    with (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
          if parallel else contextlib.nullcontext()) as pool, \
            tqdm(total=total, disable=not progress, desc="synthetic", unit="img") as bar:
        for split, count in zip(SPLITS, (spec.num_train, spec.num_val), strict=True):
            summary[split] = _write_split(out, split, count, spec, bar, pool)
    _write_json_atomic(metadata_path, spec.metadata(), indent=2)
    seconds = time.perf_counter() - start
    summary["seconds"] = seconds
    summary["images_per_second"] = total / seconds if seconds > 0 else float("inf")
    return summary


def dataset_matches(
    out_dir: str | os.PathLike[str],
    num_train: int,
    num_val: int,
    seed: int = 0,
    difficulty: str = "standard",
    image_size: int | tuple[int, int] = 256,
) -> bool:
    """Whether ``out_dir`` holds a complete dataset that :func:`generate_dataset` would write
    for these arguments (same generator version, annotation files and every image present).

    Raises ValueError for invalid arguments, exactly like :func:`generate_dataset`.
    """
    spec = _make_spec(num_train, num_val, seed, difficulty, image_size)
    out = Path(out_dir)
    try:
        with open(out / "dataset.json", encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError):
        return False
    if metadata != spec.metadata():
        return False
    for split, count in zip(SPLITS, (spec.num_train, spec.num_val), strict=True):
        if not (out / "annotations" / f"instances_{split}.json").is_file():
            return False
        if not all((out / split / _file_name(i)).is_file() for i in range(count)):
            return False
    return True


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dabdetr synth`` options to ``parser``."""
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--train", type=non_negative_int, default=2000, metavar="N",
                        help="train images")
    parser.add_argument("--val", type=non_negative_int, default=200, metavar="M", help="val images")
    parser.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                        help="random seed (>= 0)")
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="standard")
    parser.add_argument(
        "--image-size", type=positive_int, default=256, metavar="PX",
        help="square image side in pixels"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="processes rendering images (default: the CPUs available, at "
                             "most 8; the files are the same for any number)")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``dabdetr synth`` from parsed arguments; returns the process exit code
    (0 on success, 2 for invalid arguments, with the reason on stderr)."""
    try:
        summary = generate_dataset(
            args.out,
            args.train,
            args.val,
            seed=args.seed,
            difficulty=args.difficulty,
            image_size=args.image_size,
            progress=not getattr(args, "no_progress", False),
            workers=default_workers() if getattr(args, "workers", None) is None else args.workers,
        )
    except ValueError as err:
        print(f"dabdetr synth: error: {err}", file=sys.stderr)
        return 2
    train, val = summary["train"], summary["val"]
    print(
        f"wrote {train['num_images']} train images ({train['num_annotations']} objects) and "
        f"{val['num_images']} val images ({val['num_annotations']} objects), "
        f"{len(CLASS_NAMES)} classes, {args.difficulty}, to {summary['out_dir']} "
        f"in {summary['seconds']:.1f} s ({summary['images_per_second']:.0f} images/s)"
    )
    print(f"annotations: {train['annotations']}, {val['annotations']}")
    return 0

"""Static int8 quantization of an ONNX file written by `dabdetr.export.export_onnx`.

`quantize_onnx(source, target, calibration_images)` runs onnxruntime's own static quantization
(`onnxruntime.quantization.quantize_static`, QDQ format) on the exported graph:

- by default only `Conv` (the backbone) gets int8 weights (one scale
  per output channel) and uint8 activations; every other op, the transformer's `MatMul` and
  `Gemm` included, stays fp32 (quantizing those too costs accuracy: see docs/export.md);
- the activation ranges (min/max) come from running the fp32 graph on real images, each
  preprocessed as `dabdetr predict` preprocesses it for that model (the eval resize stored in
  the file's config, ImageNet normalization, `batch_images`), one image per batch;
- the quantized file keeps the config and post-processing metadata of the source, so
  `dabdetr.runtime.OnnxDetector` and `--backend onnxruntime` run it like the fp32 file.

Its outputs differ from the fp32 file's by the quantization error (not the export's 1e-4).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from dabdetr.errors import BadImageError, UserError
from dabdetr.io_utils import atomic_path, check_writable_target

if TYPE_CHECKING:
    from dabdetr.runtime import OnnxDetector

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_IMAGES = 32
QUANTIZED_OPS = ("Conv",)

__all__ = ["DEFAULT_CALIBRATION_IMAGES", "QUANTIZED_OPS", "calibration_files", "calibration_inputs",
           "check_available", "quantize_onnx"]


def quantize_onnx(source: str | os.PathLike, target: str | os.PathLike,
                  calibration_images: str | os.PathLike | Sequence[str | os.PathLike],
                  num_images: int = DEFAULT_CALIBRATION_IMAGES, overwrite: bool = False,
                  op_types: Sequence[str] = QUANTIZED_OPS) -> Path:
    """Write a static int8 (QDQ) quantization of the dabdetr ONNX file `source` to `target`.

    `calibration_images`: a folder (searched recursively) or image files; `num_images` of them,
    spread evenly over the sorted list, calibrate the activation ranges (unreadable ones are
    skipped with a warning). `op_types`: the ONNX op types to quantize (e.g. add "MatMul",
    "Gemm" for the transformer's linear layers). An existing `target` is replaced only with
    `overwrite=True`.
    Returns the path of `target`.

    Raises UserError (no onnxruntime, no readable calibration image, `num_images` < 1),
    BadWeightsError (`source` is not a dabdetr ONNX export), OutputExistsError.
    """
    if num_images < 1:
        raise UserError(f"num_images is {num_images}; calibrate on at least one image")
    if not op_types:
        raise UserError("op_types is empty; name the ONNX op types to quantize, e.g. ['Conv']")
    target = Path(target)
    check_writable_target(target, overwrite)
    check_available()
    import onnx

    from dabdetr.runtime import OnnxDetector

    inputs = calibration_inputs(OnnxDetector(source), calibration_images, num_images)
    model = _quantize_static(Path(source), inputs, op_types)
    _copy_metadata(onnx.load(str(source), load_external_data=False), model)
    with atomic_path(target) as tmp_target:
        onnx.save(model, str(tmp_target))
    return target


def _quantize_static(source: Path, inputs: list[dict[str, Tensor]], op_types: Sequence[str]):
    """onnxruntime's pre-processing and QDQ static quantization of `source`, calibrated (min/max)
    on `inputs`; returns the quantized onnx ModelProto."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="dabdetr-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # onnx shape inference and graph optimization; the symbolic shape pass is skipped
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), _CalibrationReader(inputs),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=list(op_types))
        return onnx.load(str(quantized))


def check_available() -> None:
    """Raise UserError naming the fix if onnx or onnxruntime's quantization cannot be imported."""
    from dabdetr import runtime

    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError as err:
        raise UserError(f"int8 quantization needs onnx and onnxruntime ({err}); "
                        f"{runtime.INSTALL_HINT}") from None


def calibration_inputs(detector: OnnxDetector, images: str | os.PathLike | Sequence[str | os.PathLike],
                       num_images: int) -> list[dict[str, Tensor]]:
    """The graph inputs of `detector` (a `dabdetr.runtime.OnnxDetector`) for up to `num_images`
    readable images: per image `images` [1, 3, H, W] float32, `mask` [1, H, W] bool and, for a
    post-processing graph, `target_sizes` [1, 2] int64 (the original height, width). A graph
    of static size gets each image scaled down to fit if needed and zero-padded to that size."""
    from dabdetr.data.batching import batch_images
    from dabdetr.data.io import load_image_rgb
    from dabdetr.inference import Predictor

    transform = Predictor(detector).transform
    static = _static_size(detector)
    inputs = []
    for path in calibration_files(images, num_images):
        try:
            img = load_image_rgb(path)
        except BadImageError as err:
            logger.warning("skipping a calibration image: %s", err)
            continue
        tensor = transform(img)
        if static is not None:
            tensor = _fit(tensor, static)
        batch, mask = batch_images([tensor])
        if static is not None:
            batch, mask = _pad_to(batch, mask, static)
        item = {"images": batch, "mask": mask}
        if "target_sizes" in detector.input_names:
            item["target_sizes"] = torch.tensor([[img.height, img.width]], dtype=torch.int64)
        inputs.append(item)
    if not inputs:
        raise UserError(f"none of the calibration images in {_shown(images)} could be read; "
                        "give a folder of images like the ones the model will see")
    return inputs


def _shown(images: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    return str(images) if isinstance(images, (str, os.PathLike)) else ", ".join(map(str, images))


def calibration_files(images: str | os.PathLike | Sequence[str | os.PathLike],
                      count: int) -> list[Path]:
    """`count` image files spread evenly over the sorted images of `images` (a folder, searched
    recursively, or files); UserError if a path is missing or no image is found."""
    from dabdetr.inference import find_images

    paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise UserError(f"no such calibration file or folder: {', '.join(missing)}; check the path")
    files = find_images(paths)
    if not files:
        raise UserError(f"no images found in {_shown(images)}; give a folder of images "
                        "(e.g. part of the training set) to calibrate the int8 ranges")
    if len(files) <= count:
        return files
    return [files[i * len(files) // count] for i in range(count)]


def _static_size(detector: OnnxDetector) -> tuple[int, int] | None:
    """(H, W) of a graph exported with a static image size, else None."""
    shape = detector.runner.get_inputs()[detector.input_names.index("images")].shape
    height, width = shape[2], shape[3]
    return (height, width) if isinstance(height, int) and isinstance(width, int) else None


def _fit(image: Tensor, size: tuple[int, int]) -> Tensor:
    """[3, h, w] scaled down (aspect kept, bilinear) so that it fits in `size`."""
    scale = min(size[0] / image.shape[1], size[1] / image.shape[2])
    if scale >= 1:
        return image
    new = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[2] * scale)))
    return F.interpolate(image[None], size=new, mode="bilinear", align_corners=False)[0]


def _pad_to(batch: Tensor, mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Zero-pad `batch` [B, 3, h, w] at the bottom/right to `size`; `mask` True there."""
    pad = (0, size[1] - batch.shape[-1], 0, size[0] - batch.shape[-2])
    return F.pad(batch, pad), F.pad(mask, pad, value=True)


def _copy_metadata(source, model) -> None:
    """Give `model` (onnx ModelProto) every metadata entry of `source` it lacks or differs in."""
    wanted = {p.key: p.value for p in source.metadata_props}
    kept = {p.key: p for p in model.metadata_props}
    for key, value in wanted.items():
        if key in kept:
            kept[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol: `get_next()` -> one feed dict or None."""

    def __init__(self, inputs: list[dict[str, Tensor]]):
        self._items: Iterator[dict[str, Tensor]] = iter(inputs)

    def get_next(self) -> dict | None:
        item = next(self._items, None)
        return None if item is None else {k: v.numpy() for k, v in item.items()}

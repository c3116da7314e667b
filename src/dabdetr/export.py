"""Export to ONNX and to torch.export's ExportedProgram, with a parity check against eager.

The exported graph is a tensor-in/tensor-out view of a `DabDetr` or a `DabDeformableDetr` in
eval mode:

- inputs `images` float32 [B, 3, H, W] (ImageNet-normalized, zero-padded bottom/right, as
  `dabdetr.batch_images` returns them) and `mask` bool [B, H, W] (True on padding); B, H and W
  are dynamic unless a static size is asked for;
- outputs `pred_logits` [B, Q, C] and `pred_boxes` [B, Q, 4] (normalized cxcywh, relative to each
  image's unpadded extent) of the last decoder layer;
- with `postprocess=True` also the input `target_sizes` int64 [B, 2] (height, width of each
  original image) and the outputs `scores` [B, K] float32, `labels` [B, K] int64 and `boxes`
  [B, K, 4] float32 absolute xyxy pixels: `dabdetr.postprocess` with `num_select` K and no
  threshold (`dabdetr.postprocessing.top_detections`).

Both exporters are torch's own: `torch.export.export` traces the model (non-strict), and the ONNX
file is `torch.onnx.export` (the dynamo exporter) of that ExportedProgram, checked with
`onnx.checker`. The model's type and config travel with the file (ONNX metadata
`dabdetr.model_type` and `dabdetr.config`; the ExportedProgram's extra file `config.json`,
`{"model_type": ..., "config": {...}}`), so the model family, class names and category ids are
known at inference (`dabdetr.runtime.OnnxDetector`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from dabdetr.config import DabDetrConfig
from dabdetr.errors import UserError
from dabdetr.io_utils import atomic_path, check_writable_target
from dabdetr.model_types import DEFAULT_MODEL_TYPE, ModelConfig, config_from_dict, model_type_of
from dabdetr.models.dab_deformable_detr import DabDeformableDetr
from dabdetr.models.dab_detr import DabDetr
from dabdetr.models.position_encoding import PositionEmbeddingLearned
from dabdetr.postprocessing import resolve_num_select, top_detections

DEFAULT_OPSET = 18  # the dynamo exporter's own opset; lower ones go through onnx's converter
PARITY_TOLERANCE = 1e-4
RAW_OUTPUTS = ("pred_logits", "pred_boxes")
POSTPROCESS_OUTPUTS = ("scores", "labels", "boxes")
CONFIG_KEY = "dabdetr.config"
MODEL_TYPE_KEY = "dabdetr.model_type"
NUM_SELECT_KEY = "dabdetr.num_select"
PROGRAM_CONFIG_FILE = "config.json"

__all__ = ["DEFAULT_OPSET", "DetectorGraph", "check_exportable", "export_onnx", "export_program",
           "parity_inputs", "max_abs_differences", "load_program", "program_to_onnx",
           "save_program"]

Detector = DabDetr | DabDeformableDetr


def check_exportable(config: ModelConfig) -> None:
    """Raise UserError naming each model option the exported graph cannot represent.

    `pad_invariant=True` runs the backbone once per distinct image size in the batch, a grouping
    read from the mask's values, which neither exporter can trace into one graph. Denoising
    queries (`dn_groups`) are training-only: the exported inference graph never has them.
    """
    if isinstance(config, DabDetrConfig) and config.pad_invariant:
        raise UserError(
            "pad_invariant=True cannot be exported: the backbone runs once per distinct image "
            "size in the batch, a grouping read from the mask's values. Load the weights with "
            "the override pad_invariant=false (the same weights; batches of one image, or of "
            "same-size images, give identical results)")


class DetectorGraph(nn.Module):
    """`DabDetr` or `DabDeformableDetr` as tensors in, tuple of tensors out (the export's
    signature).

    forward(images [B, 3, H, W] float32, mask [B, H, W] bool) -> (pred_logits [B, Q, C],
    pred_boxes [B, Q, 4] normalized cxcywh). With `num_select` set, forward also takes
    target_sizes [B, 2] int64 (height, width) and appends scores [B, K], labels [B, K] int64 and
    boxes [B, K, 4] absolute xyxy (see `dabdetr.postprocessing.top_detections`).
    """

    def __init__(self, model: Detector, num_select: int | None = None):
        super().__init__()
        self.model = model
        self.num_select = num_select

    @property
    def output_names(self) -> tuple[str, ...]:
        return RAW_OUTPUTS + (POSTPROCESS_OUTPUTS if self.num_select is not None else ())

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("images", "mask") + (("target_sizes",) if self.num_select is not None else ())

    def forward(self, images: Tensor, mask: Tensor, target_sizes: Tensor | None = None
                ) -> tuple[Tensor, ...]:
        out = self.model(images, mask)
        if self.num_select is None:
            return out.pred_logits, out.pred_boxes
        if target_sizes is None:
            raise ValueError("this graph post-processes: give target_sizes [B, 2] (height, width)")
        scores, labels, boxes = top_detections(out.pred_logits, out.pred_boxes, target_sizes,
                                               self.num_select)
        return out.pred_logits, out.pred_boxes, scores, labels, boxes


def _coarsest_stride(model: Detector) -> int:
    """Image pixels per cell of the model's coarsest feature map: the backbone's output stride,
    doubled by each extra (strided 3x3 conv) level of a deformable model."""
    if isinstance(model, DabDeformableDetr):
        return model.backbone.stride * 2 ** (len(model.input_proj) - len(model.stages))
    return model.backbone.stride


def _dynamic_shapes(graph: DetectorGraph, static_size: tuple[int, int] | None) -> dict:
    """torch.export dims: batch always dynamic; height and width unless `static_size`."""
    batch = Dim("batch", min=1)
    if static_size is None:
        # Feature maps of one cell in a dimension are traced as a special case (size-1
        # broadcasting), so a dynamic side starts at two cells of the coarsest level.
        stride = _coarsest_stride(graph.model)
        largest = None  # the learned position embedding has a table of cells per side
        position = graph.model.position_embedding
        if isinstance(position, PositionEmbeddingLearned):
            largest = position.row_embed.num_embeddings * graph.model.backbone.stride
        height = Dim("height", min=stride + 1, max=largest)
        width = Dim("width", min=stride + 1, max=largest)
        image_dims: dict = {0: batch, 2: height, 3: width}
        mask_dims: dict = {0: batch, 1: height, 2: width}
    else:
        image_dims, mask_dims = {0: batch}, {0: batch}
    shapes = {"images": image_dims, "mask": mask_dims}
    if graph.num_select is not None:
        shapes["target_sizes"] = {0: batch}
    return shapes


def parity_inputs(batch: int, height: int, width: int, valid: Sequence[tuple[int, int]] | None = None,
                  postprocess: bool = False, seed: int = 0) -> dict[str, Tensor]:
    """Random graph inputs: images [B, 3, H, W] N(0, 1) (zero on padding), mask [B, H, W] with
    image i valid on its top-left valid[i] = (h_i, w_i) (default: all of it), and with
    `postprocess` target_sizes [B, 2] int64 (an original size twice each valid extent)."""
    valid = list(valid) if valid is not None else [(height, width)] * batch
    if len(valid) != batch:
        raise ValueError(f"valid has {len(valid)} sizes for a batch of {batch}")
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(batch, 3, height, width)
    mask = torch.ones(batch, height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(valid):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        mask[i, :h, :w] = False
    inputs = {"images": images, "mask": mask}
    if postprocess:
        inputs["target_sizes"] = torch.tensor([[2 * h, 2 * w] for h, w in valid], dtype=torch.int64)
    return inputs


def _example_inputs(graph: DetectorGraph, static_size: tuple[int, int] | None) -> dict[str, Tensor]:
    """Tracing inputs: a padded batch of two, at the static size or a size no dim equals."""
    stride = _coarsest_stride(graph.model)
    height, width = static_size if static_size is not None else (5 * stride + 3, 7 * stride + 5)
    inputs = parity_inputs(2, height, width, [(height, width), (height * 3 // 4, width * 2 // 3)],
                           postprocess=graph.num_select is not None)
    device = next(graph.model.parameters()).device
    return {name: t.to(device) for name, t in inputs.items()}


def _check_static_size(static_size: Sequence[int] | None) -> tuple[int, int] | None:
    if static_size is None:
        return None
    size = tuple(int(s) for s in static_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"static_size must be (height, width) > 0, got {static_size!r}")
    return size  # type: ignore[return-value]


def export_program(model: Detector, *, postprocess: bool = False,
                   num_select: int | None = None,
                   static_size: Sequence[int] | None = None) -> ExportedProgram:
    """`torch.export.export` of the model's inference graph (see the module docstring).

    Args:
        model: a DabDetr or DabDeformableDetr (its train/eval mode is restored afterwards;
            the graph is eval mode).
        postprocess: add the `target_sizes` input and the top-`num_select` outputs (None:
            the authors' top-k for the model's family, 300 DAB-DETR, 100 deformable).
        static_size: (H, W) to fix the image size (batch stays dynamic); None: dynamic.
    Returns:
        the ExportedProgram; call `.module()(images, mask[, target_sizes])` for a tuple of
        tensors in `DetectorGraph`'s order.
    """
    if not isinstance(model, (DabDetr, DabDeformableDetr)):
        raise TypeError("export needs a dabdetr DabDetr or DabDeformableDetr model, got "
                        f"{type(model).__name__}")
    check_exportable(model.config)
    num_select = resolve_num_select(num_select, model.config)
    if postprocess and num_select <= 0:
        raise ValueError(f"num_select must be positive, got {num_select}")
    size = _check_static_size(static_size)
    graph = DetectorGraph(model, num_select if postprocess else None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(graph, (), _example_inputs(graph, size),
                                       dynamic_shapes=_dynamic_shapes(graph, size), strict=False)
    finally:
        model.train(was_training)


def save_program(program: ExportedProgram, config: ModelConfig, path: str | os.PathLike,
                 overwrite: bool = False) -> Path:
    """Write an ExportedProgram (`torch.export.save`) with the model type and config as the
    extra file `config.json`: {"model_type": ..., "config": {...}}."""
    path = Path(path)
    check_writable_target(path, overwrite)
    doc = {"model_type": model_type_of(config), "config": config.to_dict()}
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp, extra_files={PROGRAM_CONFIG_FILE: json.dumps(doc)})
    return path


def load_program(path: str | os.PathLike) -> tuple[ExportedProgram, ModelConfig]:
    """Read what `save_program` wrote: (program, config of the stored model type). A
    `config.json` that is the bare config dict is a DAB-DETR one."""
    extra = {PROGRAM_CONFIG_FILE: ""}
    program = torch.export.load(Path(path), extra_files=extra)
    doc = json.loads(extra[PROGRAM_CONFIG_FILE])
    if isinstance(doc, dict) and set(doc) == {"model_type", "config"}:
        return program, config_from_dict(doc["config"], doc["model_type"])
    return program, config_from_dict(doc, DEFAULT_MODEL_TYPE)


def export_onnx(model: Detector, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                postprocess: bool = False, num_select: int | None = None,
                static_size: Sequence[int] | None = None, overwrite: bool = False) -> Path:
    """Export the model's inference graph to an ONNX file and check it with `onnx.checker`.

    Same graph and arguments as `export_program` (whose result goes through `program_to_onnx`);
    `opset` is the ONNX opset (18 is the exporter's own). An existing file is replaced only with
    `overwrite=True` (OutputExistsError otherwise). Returns the path.
    """
    check_writable_target(path, overwrite)
    num_select = resolve_num_select(num_select, model.config)
    program = export_program(model, postprocess=postprocess, num_select=num_select,
                             static_size=static_size)
    return program_to_onnx(program, model.config, path, opset=opset,
                           num_select=num_select if postprocess else None, overwrite=overwrite)


def program_to_onnx(program: ExportedProgram, config: ModelConfig, path: str | os.PathLike, *,
                    opset: int = DEFAULT_OPSET, num_select: int | None = None,
                    overwrite: bool = False) -> Path:
    """Convert an `export_program` result to ONNX (torch's dynamo exporter), store `config`,
    its model type and the post-processing `num_select` (None: a graph without) as metadata, save it as one
    file and check it with `onnx.checker`. Returns the path."""
    import onnx

    path = Path(path)
    check_writable_target(path, overwrite)
    names = RAW_OUTPUTS + (POSTPROCESS_OUTPUTS if num_select is not None else ())
    onnx_program = torch.onnx.export(program, (), None, opset_version=opset,
                                     output_names=list(names), dynamo=True, verbose=False)
    metadata = onnx_program.model.metadata_props
    metadata[MODEL_TYPE_KEY] = model_type_of(config)
    metadata[CONFIG_KEY] = json.dumps(config.to_dict())
    if num_select is not None:
        metadata[NUM_SELECT_KEY] = str(num_select)
    with atomic_path(path) as tmp:
        onnx_program.save(tmp, external_data=False)
        onnx.checker.check_model(str(tmp), full_check=True)
    return path


def max_abs_differences(reference: Sequence[Tensor], candidate: Sequence[Tensor],
                        names: Sequence[str], target_sizes: Tensor | None = None
                        ) -> dict[str, float]:
    """Max |reference - candidate| per output name. Pixel `boxes` are compared divided by their
    image's (width, height), so every box difference is in the normalized units of
    `pred_boxes`; `labels` count as 0 where equal and 1 otherwise."""
    diffs = {}
    for name, ref, cand in zip(names, reference, candidate, strict=True):
        ref, cand = torch.as_tensor(ref), torch.as_tensor(cand)
        if name == "labels":
            diffs[name] = float((ref != cand).any())
            continue
        diff = (ref.double() - cand.double()).abs()
        if name == "boxes" and target_sizes is not None:
            height, width = target_sizes.double().unbind(1)
            diff = diff / torch.stack([width, height, width, height], dim=1)[:, None, :]
        diffs[name] = float(diff.max()) if diff.numel() else 0.0
    return diffs


def parity_cases(static_size: Sequence[int] | None, stride: int) -> list[tuple[int, int, int, list]]:
    """(batch, H, W, valid sizes) of the export check: a padded batch of two, and one unpadded
    image of another size (at a static size: the same size, padded and unpadded)."""
    if static_size is not None:
        h, w = static_size
        return [(2, h, w, [(h, w), (max(1, h * 3 // 4), max(1, w * 2 // 3))]), (1, h, w, [(h, w)])]
    h, w = 10 * stride + 3, 13 * stride + 7
    return [(2, h, w, [(h, w), (h - 2 * stride - 5, w - 3 * stride - 1)]),
            (1, h - stride + 9, w + stride - 13, [(h - stride + 9, w + stride - 13)])]


def check_parity(model: Detector, run: Callable[[dict[str, Tensor]], Sequence[Tensor]], *,
                 postprocess: bool, num_select: int | None = None,
                 static_size: Sequence[int] | None = None) -> list[dict[str, float]]:
    """Run `run` (an exported graph's runner: inputs by name -> outputs in `DetectorGraph`'s
    order) and the eager model on `parity_cases`; one dict of max abs differences per case."""
    graph = DetectorGraph(model, resolve_num_select(num_select, model.config) if postprocess
                          else None)
    was_training = model.training
    model.eval()
    reports = []
    try:
        for batch, h, w, valid in parity_cases(static_size, model.backbone.stride):
            inputs = parity_inputs(batch, h, w, valid, postprocess=postprocess)
            with torch.no_grad():
                reference = graph(**inputs)
            reports.append(max_abs_differences(reference, run(inputs), graph.output_names,
                                               inputs.get("target_sizes")))
    finally:
        model.train(was_training)
    return reports

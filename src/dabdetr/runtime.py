"""ONNX Runtime inference of a graph written by `dabdetr.export.export_onnx`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dabdetr.errors import BadWeightsError, UserError
from dabdetr.export import (
    CONFIG_KEY,
    MODEL_TYPE_KEY,
    NUM_SELECT_KEY,
    POSTPROCESS_OUTPUTS,
    RAW_OUTPUTS,
)
from dabdetr.model_types import DEFAULT_MODEL_TYPE, config_from_dict, model_type_of
from dabdetr.models.outputs import DetectionOutput

__all__ = ["OnnxDetector", "open_onnx_backend"]

INSTALL_HINT = "install the export extra: pip install 'dabdetr[export]'"


class OnnxDetector:
    """An exported DAB-DETR or DAB-Deformable-DETR in an onnxruntime InferenceSession, called
    like the eager model.

    `detector(images, mask)` -> DetectionOutput (pred_logits [B, Q, C], pred_boxes [B, Q, 4]
    normalized cxcywh; no auxiliary outputs), on the CPU. `run(inputs)` runs the graph on named
    tensors and returns every output in the graph's order. `config` is the exported model's
    config (a DabDetrConfig or DabDeformableDetrConfig, as its `dabdetr.model_type` says; a
    file without one holds a DAB-DETR); `num_select` is the top-k of a post-processing graph
    (None without).
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise UserError(f"running an ONNX file needs onnxruntime ({err}); {INSTALL_HINT}"
                            ) from None
        path = Path(path)
        if not path.is_file():
            raise BadWeightsError(f"no ONNX file at {path}; give a file written by "
                                  "`dabdetr export --format onnx`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.runner = ort.InferenceSession(
                str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as err:  # onnxruntime's own types (InvalidProtobuf, Fail, ...)
            raise BadWeightsError(f"onnxruntime cannot load {path} ({type(err).__name__}: "
                                  f"{err}); give a file written by `dabdetr export`") from None
        metadata = self.runner.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in metadata:
            raise BadWeightsError(f"{path} is not a dabdetr export (no {CONFIG_KEY!r} metadata); "
                             "write it with `dabdetr export`")
        model_type = metadata.get(MODEL_TYPE_KEY, DEFAULT_MODEL_TYPE)
        try:
            self.config = config_from_dict(json.loads(metadata[CONFIG_KEY]), model_type)
        except ValueError as err:
            raise BadWeightsError(f"{path} has an unreadable model config: {err}") from None
        self.num_select = int(metadata[NUM_SELECT_KEY]) if NUM_SELECT_KEY in metadata else None
        self.input_names = [i.name for i in self.runner.get_inputs()]
        self.output_names = [o.name for o in self.runner.get_outputs()]
        expected = list(RAW_OUTPUTS + (POSTPROCESS_OUTPUTS if self.num_select else ()))
        if self.output_names != expected:
            raise BadWeightsError(f"{path} has outputs {self.output_names}, expected {expected}")

    def eval(self) -> OnnxDetector:
        """No-op, for code that calls `.eval()` on a model."""
        return self

    def run(self, inputs: dict[str, Tensor]) -> list[Tensor]:
        """Graph inputs by name (CPU tensors) -> outputs as CPU tensors, in the graph's order."""
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise ValueError(f"the ONNX graph needs inputs {sorted(missing)}")
        feed = {name: np.ascontiguousarray(inputs[name].detach().cpu().numpy())
                for name in self.input_names}
        try:
            outputs = self.runner.run(None, feed)
        except Exception as err:  # onnxruntime's own error types
            if (model_type_of(self.config) == DEFAULT_MODEL_TYPE or not self.config.two_stage
                    or "TopK" not in str(err)):
                raise
            # the eager model refuses such an input by name; the graph fails in its TopK
            raise ValueError(f"onnxruntime could not run this two-stage model on an input of "
                             f"{tuple(inputs['images'].shape[-2:])} pixels: two-stage selection "
                             f"needs num_queries={self.config.num_queries} encoder cells, which "
                             f"small images lack; use larger images or fewer queries "
                             f"(onnxruntime: {err})") from None
        return [torch.from_numpy(out) for out in outputs]

    def __call__(self, images: Tensor, mask: Tensor | None = None) -> DetectionOutput:
        """images [B, 3, H, W] float32 normalized; mask [B, H, W] bool, True on padding."""
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool)
        inputs = {"images": images.float(), "mask": mask}
        if "target_sizes" in self.input_names:  # the top-k is not needed here: any size works
            inputs["target_sizes"] = torch.ones(images.shape[0], 2, dtype=torch.int64)
        logits, boxes = self.run(inputs)[:2]
        return DetectionOutput(logits, boxes)


def open_onnx_backend(weights: str | os.PathLike, pytorch_options: Mapping[str, bool] | None = None
                      ) -> OnnxDetector:
    """The detector of a command's `--backend onnxruntime`. `pytorch_options`: for each flag
    that needs the PyTorch model (e.g. --optimize, --device), whether the user set it; any set
    is a UserError naming them."""
    used = [flag for flag, on in (pytorch_options or {}).items() if on]
    if used:
        raise UserError(f"--backend onnxruntime runs the exported graph on the CPU: drop "
                        f"{', '.join(used)} (they need the PyTorch model)")
    return OnnxDetector(weights)

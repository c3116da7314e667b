"""`dabdetr export --format onnx --int8 DIR`: export fp32, then write its static int8 quantization."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dabdetr.argtypes import positive_int
from dabdetr.errors import UserError
from dabdetr.quantize import DEFAULT_CALIBRATION_IMAGES


def add_int8_arguments(p: argparse.ArgumentParser) -> None:
    """The --int8 and --calibration-images options of `dabdetr export`."""
    p.add_argument("--int8", default=None, metavar="CALIB_DIR",
                   help="write a static int8 (QDQ) quantization of the ONNX file at --out, its "
                        "activation ranges calibrated on images of CALIB_DIR (e.g. training "
                        "images). Its outputs differ from the eager model by the quantization "
                        "error: the max abs difference is printed for information and does not "
                        "fail the export")
    p.add_argument("--calibration-images", type=positive_int, default=DEFAULT_CALIBRATION_IMAGES,
                   metavar="N", help="how many images of --int8 CALIB_DIR calibrate")


def cmd_export_int8(args: argparse.Namespace) -> int:
    """Export `args.weights` to a temporary fp32 ONNX file, quantize it to `args.out` and print
    the max abs difference to the eager model on the export's check inputs. Returns 0."""
    from dabdetr.config import parse_overrides
    from dabdetr.export import check_parity, export_onnx
    from dabdetr.export_cli import print_parity
    from dabdetr.io_utils import check_writable_target
    from dabdetr.quantize import calibration_files, check_available, quantize_onnx
    from dabdetr.runtime import OnnxDetector
    from dabdetr.weights.loading import load_model

    if args.format != "onnx":
        raise UserError(f"--int8 quantizes an ONNX file; it does not apply to --format "
                        f"{args.format}: use --format onnx or drop --int8")
    calibration_files(args.int8, args.calibration_images)  # no images: say so before exporting
    check_writable_target(args.out, args.force)  # before the minutes an export can take
    check_available()
    model = load_model(args.weights, **parse_overrides(args.set)).eval()
    options = dict(postprocess=args.postprocess, num_select=args.num_select,
                   static_size=args.static)
    with tempfile.TemporaryDirectory(prefix="dabdetr-export-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", opset=args.opset, **options)
        path = quantize_onnx(fp32, args.out, args.int8, num_images=args.calibration_images,
                             overwrite=args.force)
    print(f"wrote {path} (static int8)")
    print_parity(check_parity(model, OnnxDetector(path).run, **options), "int8 onnxruntime",
                 " (quantization error, for information)")
    return 0

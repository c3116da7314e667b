"""`dabdetr export`: write an ONNX file or an ExportedProgram and check it against eager."""

from __future__ import annotations

import argparse
import sys

from dabdetr.argtypes import positive_int
from dabdetr.export import DEFAULT_OPSET, PARITY_TOLERANCE
from dabdetr.quantize_cli import add_int8_arguments, cmd_export_int8

FORMATS = ("onnx", "exported-program")


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export to ONNX or a torch.export ExportedProgram, checked against eager",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", required=True,
                   help="our model dir, a Hugging Face dir or hub id, or an authors' .pth")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="what to write")
    p.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--postprocess", action="store_true",
                   help="add the target_sizes input and the scores/labels/boxes outputs")
    p.add_argument("--num-select", type=positive_int, default=None,
                   help="top-k of --postprocess (None: the authors' 300 for DAB-DETR, 100 "
                   "for DAB-Deformable-DETR)")
    p.add_argument("--static", type=positive_int, nargs=2, metavar=("H", "W"), default=None,
                   help="fix the image size (the batch stays dynamic)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides when loading the weights, e.g. dilation=true")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    add_int8_arguments(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from dabdetr.config import parse_overrides
    from dabdetr.export import check_parity, export_onnx, export_program, save_program
    from dabdetr.io_utils import check_writable_target
    from dabdetr.weights.loading import load_model

    if args.int8 is not None:
        return cmd_export_int8(args)
    check_writable_target(args.out, args.force)  # before the minutes an export can take
    model = load_model(args.weights, **parse_overrides(args.set)).eval()
    options = dict(postprocess=args.postprocess, num_select=args.num_select,
                   static_size=args.static)
    if args.format == "onnx":
        from dabdetr.runtime import OnnxDetector

        path = export_onnx(model, args.out, opset=args.opset, overwrite=args.force, **options)
        run = OnnxDetector(path).run
        checker = "onnxruntime"
    else:
        program = export_program(model, **options)
        path = save_program(program, model.config, args.out, overwrite=args.force)
        module = program.module()

        def run(inputs):
            with torch.no_grad():
                return module(**inputs)

        checker = "the ExportedProgram"
    print(f"wrote {path}")
    return report_parity(check_parity(model, run, **options), checker)


def print_parity(reports: list[dict[str, float]], checker: str, note: str = "") -> None:
    """Print the max abs differences of `check_parity`'s two cases, one line each."""
    for label, report in zip(("padded batch of 2", "single image"), reports, strict=True):
        diffs = ", ".join(f"{name} {value:.2e}" for name, value in report.items())
        print(f"max abs difference, {checker} vs eager, {label}: {diffs}{note}")


def report_parity(reports: list[dict[str, float]], checker: str) -> int:
    """Print the max abs differences of `check_parity`'s cases; 1 if any exceeds the
    tolerance, else 0."""
    print_parity(reports, checker)
    worst = max(max(report.values()) for report in reports)
    if worst > PARITY_TOLERANCE:
        print(f"dabdetr export: error: {checker} differs from the eager model by {worst:.2e} "
              f"(> {PARITY_TOLERANCE:.0e}); the file is written but should not be used",
              file=sys.stderr)
        return 1
    return 0

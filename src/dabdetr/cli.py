"""Command-line interface: `dabdetr <command> ...` (also `python -m dabdetr`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from dabdetr.argtypes import non_negative_int, positive_int, probability
from dabdetr.config import parse_overrides
from dabdetr.errors import UserError

logger = logging.getLogger("dabdetr")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="detect objects in images; writes COCO results + drawings",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and/or directories (searched recursively)")
    p.add_argument("--weights", required=True,
                   help="our model dir, a Hugging Face dir or hub id, or an authors' .pth")
    p.add_argument("--threshold", type=probability, default=0.5,
                   help="minimum score to keep a box, in [0, 1]")
    p.add_argument("--out", default="predictions", help="output directory")
    p.add_argument("--force", action="store_true",
                   help="replace the results of a previous run in --out")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="resize the short side to this (default: the size the model was trained "
                   "and evaluated at, stored with it; 800 for published weights)")
    p.add_argument("--max-size", type=non_negative_int, default=None,
                   help="cap on the long side, 0 for none (default: the model's, scaled with "
                   "--size)")
    p.add_argument("--num-select", type=positive_int, default=300, help="top-k before the threshold")
    p.add_argument("--no-draw", action="store_true", help="do not write images with boxes drawn")
    p.add_argument("--explain", type=non_negative_int, default=0, metavar="K",
                   help="also draw the positional attention maps and anchors of the K best "
                   "queries at every decoder layer (as `dabdetr explain`)")
    from dabdetr.optimize import add_cli_argument

    add_cli_argument(p)
    p.set_defaults(func=cmd_predict)


PREDICT_OUTPUTS = ("detections.json", "images.json", "failed.json", "images")


def check_predict_inputs(inputs: Sequence[str]) -> None:
    """UserError when no input path exists at all (mistyped paths): nothing is run or written."""
    if not any(Path(p).exists() for p in inputs):
        shown = ", ".join(inputs[:5]) + (" ..." if len(inputs) > 5 else "")
        raise UserError(f"no such file or folder: {shown}; check the image paths")


def check_predict_out(out: Path, force: bool) -> None:
    """OutputExistsError when --out holds a previous run's results and not `force`."""
    from dabdetr.errors import OutputExistsError

    previous = [name for name in PREDICT_OUTPUTS if (out / name).exists()]
    if previous and not force:
        raise OutputExistsError(
            f"{out} holds the results of a previous run ({', '.join(previous)}); pass --force "
            "to replace them, or choose another --out")


def cmd_predict(args: argparse.Namespace) -> int:
    from dabdetr.explain import explain_image
    from dabdetr.inference import Predictor, find_images, predict_files
    from dabdetr.io_utils import atomic_write

    check_predict_inputs(args.inputs)
    out = Path(args.out)
    check_predict_out(out, args.force)
    out_dir = out.resolve()
    # never feed our own drawings back in when --out sits inside an input folder
    files = [f for f in find_images(args.inputs) if out_dir not in f.resolve().parents]
    if not files:
        raise UserError(f"no images found in {args.inputs}; give image files or folders "
                        "holding them")
    from dabdetr.distributed import resolve_device
    from dabdetr.optimize import optimized
    from dabdetr.weights.loading import load_model

    device = str(resolve_device(args.device))
    model = optimized(load_model(args.weights, device=device), args.optimize)
    predictor = Predictor(model, size=args.size, max_size=args.max_size,
                          num_select=args.num_select, threshold=args.threshold, device=device)
    vis_dir = out / "images"
    used_names: set[str] = set()

    def save_drawing(det, img) -> None:
        if args.no_draw:
            return
        name = Path(det.source).stem
        while name in used_names:  # same file name in two folders
            name += "_"
        used_names.add(name)
        _save_jpeg(draw_detections(img, det.boxes, det.labels.tolist(), det.names, det.scores),
                   vis_dir / f"{name}.jpg")
        if args.explain > 0:
            _save_jpeg(explain_image(model, predictor, img, args.explain),
                       vis_dir / f"{name}_attention.jpg")

    from dabdetr.visualize import draw_detections

    report = predict_files(files, predictor, on_result=save_drawing)
    results, images = [], []
    for image_id, det in enumerate(report.detections, start=1):
        results.extend(det.to_coco(image_id))
        images.append({"id": image_id, "file_name": det.source, "height": det.image_size[0],
                       "width": det.image_size[1]})
    atomic_write(out / "detections.json", json.dumps(results))
    atomic_write(out / "images.json", json.dumps(images, indent=1))
    if report.failed:
        atomic_write(out / "failed.json", json.dumps(
            [{"file": f, "error": e} for f, e in report.failed], indent=1))
    print(f"{len(report.detections)} images, {len(results)} detections >= {args.threshold} "
          f"at short side {predictor.size} -> {out / 'detections.json'}"
          + ("" if args.no_draw else f", drawings in {vis_dir}"))
    if report.failed:
        print(f"{len(report.failed)} image(s) could not be read and were skipped "
              f"(see {out / 'failed.json'})", file=sys.stderr)
        return 1
    return 0


def _save_jpeg(image, path: Path) -> None:
    from dabdetr.io_utils import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=92)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert weights between the authors', HF and our format")
    p.add_argument("src", help="weights source (anything load_model accepts)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=["ours", "hf"], default="ours", help="output format")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides a file cannot tell, e.g. dilation=true")
    p.add_argument("--force", action="store_true", help="replace a model already in dst")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from dabdetr.io_utils import check_writable_target
    from dabdetr.weights.loading import export_huggingface, load_model, save_model

    check_writable_target(args.dst, args.force, "not empty (it may hold a model)")
    model, report = load_model(args.src, strict=True, return_report=True,
                               **parse_overrides(args.set))
    print("key report:", report.format())
    if args.to == "hf":
        export_huggingface(model, args.dst)
    else:
        save_model(model, args.dst)
    cfg = model.config
    print(f"wrote {args.to} weights to {args.dst}: {cfg.backbone}{'-DC5' if cfg.dilation else ''}, "
          f"{cfg.total_queries} queries, {cfg.num_classes} classes, "
          f"{model.num_parameters() / 1e6:.1f} M parameters")
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    from dabdetr.data import synthetic

    p = sub.add_parser("synth", help="generate the synthetic COCO-format shapes dataset",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    synthetic.add_cli_arguments(p)
    p.add_argument("--force", action="store_true",
                   help="write into a --out folder that is not empty (files there are replaced)")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from dabdetr.data import synthetic
    from dabdetr.io_utils import check_writable_target

    size = args.image_size
    if not args.force and synthetic.dataset_matches(args.out, args.train, args.val, args.seed,
                                                    args.difficulty, size):
        print(f"{args.out} already holds this dataset; nothing written")
        return 0
    check_writable_target(args.out, args.force, "not empty")
    return synthetic.run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dabdetr", description="DAB-DETR object detection")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_predict, _add_convert, _add_synth):
        add(sub)
    from dabdetr import demo, explain
    from dabdetr.engine import evaluate, train

    for module in (train, evaluate, demo, explain):
        module.add_cli(sub)
    for command in sub.choices.values():  # also accepted after the command: dabdetr predict -v
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="debug logging, and the traceback of an internal error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\ndabdetr {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the one error boundary: no traceback for a user's mistake
        return report_error(args.command, err, args.verbose)


def report_error(command: str, err: Exception, verbose: bool) -> int:
    """Print `err` for a user and return the exit status: 2 for a mistake the user can fix
    (UserError, ValueError, a file or folder that cannot be read or written), 1 for an
    internal error (its traceback only when `verbose`)."""
    from dabdetr.io_utils import os_error

    if isinstance(err, OSError) and not isinstance(err, UserError):
        err = os_error(err)
    if isinstance(err, ValueError):
        if verbose:
            traceback.print_exception(err)
        print(f"dabdetr {command}: error: {err}", file=sys.stderr)
        return 2
    if verbose:
        traceback.print_exception(err)
    print(f"dabdetr {command}: internal error: {type(err).__name__}: {err}\n"
          f"(a bug in dabdetr; run with --verbose for the traceback and please report it)",
          file=sys.stderr)
    return 1

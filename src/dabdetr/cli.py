"""Command-line interface: `dabdetr <command> ...` (also `python -m dabdetr`)."""

from __future__ import annotations

import argparse
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
    p = sub.add_parser("predict", help="detect objects in images and videos (JSONL, COCO results, drawings)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+",
                   help="image or video files and/or directories (searched recursively)")
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
    p.add_argument("--num-select", type=positive_int, default=None,
                   help="top-k before the threshold (None: the authors' 300 for DAB-DETR, "
                   "100 for DAB-Deformable-DETR)")
    p.add_argument("--no-draw", action="store_true", help="do not write images with boxes drawn")
    p.add_argument("--explain", type=non_negative_int, default=0, metavar="K",
                   help="also draw the positional attention maps and anchors of the K best "
                   "queries at every decoder layer (as `dabdetr explain`)")
    p.add_argument("--backend", choices=["pytorch", "onnxruntime"], default="pytorch",
                   help="onnxruntime: --weights is an ONNX file from `dabdetr export` (CPU)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images of similar size per batch")
    p.add_argument("--workers", type=non_negative_int, default=2, help="decoding processes (0: none)")
    p.add_argument("--resume", action="store_true",
                   help="append to OUT/predictions.jsonl, skipping the inputs it already has")
    p.add_argument("--video-out", action="store_true",
                   help="write each input video with its detections drawn to OUT/videos/")
    from dabdetr.optimize import add_cli_argument

    add_cli_argument(p)
    p.set_defaults(func=cmd_predict)


PREDICT_OUTPUTS = ("predictions.jsonl", "detections.json", "images.json", "failed.json", "images",
                   "videos")


def check_predict_inputs(inputs: Sequence[str]) -> None:
    """UserError when no input path exists at all (mistyped paths): nothing is run or written."""
    if not any(Path(p).exists() for p in inputs):
        shown = ", ".join(inputs[:5]) + (" ..." if len(inputs) > 5 else "")
        raise UserError(f"no such file or folder: {shown}; check the image paths")


def check_predict_out(out: Path, force: bool, resume: bool = False) -> None:
    """OutputExistsError when --out holds a previous run's results and neither `force` nor
    `resume` (which goes on with that run) is set."""
    from dabdetr.errors import OutputExistsError

    previous = [name for name in PREDICT_OUTPUTS if (out / name).exists()]
    if previous and not (force or resume):
        raise OutputExistsError(
            f"{out} holds the results of a previous run ({', '.join(previous)}); pass --resume "
            "to go on with it, --force to replace it, or choose another --out")


def cmd_predict(args: argparse.Namespace) -> int:
    from dabdetr.explain import explain_image
    from dabdetr.inference import IMAGE_SUFFIXES, Predictor, find_images
    from dabdetr.streaming import VIDEO_SUFFIXES, predict_to_folder

    check_predict_inputs(args.inputs)
    out = Path(args.out)
    check_predict_out(out, args.force, args.resume)
    out_dir = out.resolve()
    # never feed our own drawings back in when --out sits inside an input folder
    files = [str(f) for f in find_images(args.inputs, IMAGE_SUFFIXES | VIDEO_SUFFIXES)
             if out_dir not in f.resolve().parents]
    if not files:
        raise UserError(f"no images found in {args.inputs} (nor videos); give image or "
                        "video files or folders holding them")
    model, device = _predict_model(args)
    predictor = Predictor(model, size=args.size, max_size=args.max_size,
                          num_select=args.num_select, threshold=args.threshold, device=device)

    def explain(det, img, stem: str) -> None:
        _save_jpeg(explain_image(model, predictor, img, args.explain), Path(f"{stem}_attention.jpg"))

    summary = predict_to_folder(
        files, predictor, out, resume=args.resume, batch_size=args.batch_size,
        workers=args.workers, draw=not args.no_draw, video_out=args.video_out,
        extra_drawing=explain if args.explain > 0 else None)
    print(f"{summary.predicted} images predicted, {summary.images} in {out / 'images.json'}, "
          f"{summary.detections} detections >= {args.threshold} at short side {predictor.size} "
          f"-> {out / 'detections.json'} (stream: {summary.jsonl})"
          + ("" if args.no_draw else f", drawings in {out / 'images'}"))
    if summary.failed:
        print(f"{summary.failed} image(s) could not be read and were skipped "
              f"(see {out / 'failed.json'})", file=sys.stderr)
        return 1
    return 0


def _predict_model(args: argparse.Namespace):
    """(model, device) of `dabdetr predict`: the PyTorch model (optimized as asked) or an
    ONNX Runtime detector of an exported file."""
    if args.backend == "onnxruntime":
        from dabdetr.runtime import open_onnx_backend

        used = {"--optimize": args.optimize != "none", "--explain": args.explain > 0,
                "--device": args.device not in (None, "cpu")}
        return open_onnx_backend(args.weights, used), "cpu"
    from dabdetr.distributed import resolve_device
    from dabdetr.optimize import optimized
    from dabdetr.weights.loading import load_model

    device = str(resolve_device(args.device))
    return optimized(load_model(args.weights, device=device), args.optimize), device


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
    from dabdetr import demo, explain, export_cli
    from dabdetr.data import commands as data_commands
    from dabdetr.engine import evaluate, train

    for module in (data_commands, train, evaluate, demo, explain, export_cli):
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

"""Command-line interface: `dabdetr <command> ...` (also `python -m dabdetr`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("dabdetr")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="detect objects in images and videos (JSONL, COCO results, drawings)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+",
                   help="image or video files and/or directories (searched recursively)")
    p.add_argument("--weights", required=True,
                   help="our model dir, a Hugging Face dir or hub id, or an authors' .pth")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score to keep a box")
    p.add_argument("--out", default="predictions", help="output directory")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--size", type=int, default=800, help="resize the short side to this")
    p.add_argument("--max-size", type=int, default=1333, help="cap on the long side")
    p.add_argument("--num-select", type=int, default=300, help="top-k before the threshold")
    p.add_argument("--no-draw", action="store_true", help="do not write images with boxes drawn")
    p.add_argument("--explain", type=int, default=0, metavar="K",
                   help="also draw the decoder cross-attention of the K best detections' queries")
    p.add_argument("--backend", choices=["pytorch", "onnxruntime"], default="pytorch",
                   help="onnxruntime: --weights is an ONNX file from `dabdetr export` (CPU)")
    p.add_argument("--batch-size", type=int, default=1, help="images of similar size per batch")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (0: none)")
    p.add_argument("--resume", action="store_true",
                   help="append to OUT/predictions.jsonl, skipping the inputs it already has")
    p.add_argument("--video-out", action="store_true",
                   help="write each input video with its detections drawn to OUT/videos/")
    from dabdetr.optimize import add_cli_argument

    add_cli_argument(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from dabdetr.inference import IMAGE_SUFFIXES, Predictor, find_images
    from dabdetr.streaming import VIDEO_SUFFIXES, predict_to_folder

    out_dir = Path(args.out).resolve()
    # never feed our own drawings back in when --out sits inside an input folder
    files = [str(f) for f in find_images(args.inputs, IMAGE_SUFFIXES | VIDEO_SUFFIXES)
             if out_dir not in f.resolve().parents]
    if not files:
        print(f"dabdetr predict: error: no images found in {args.inputs}", file=sys.stderr)
        return 2
    model, device = _predict_model(args)
    predictor = Predictor(model, size=args.size, max_size=args.max_size,
                          num_select=args.num_select, threshold=args.threshold, device=device)

    def explain(det, img, stem: str) -> None:
        explain_image(model, predictor, img, args.explain).save(f"{stem}_attention.jpg", quality=92)

    summary = predict_to_folder(
        files, predictor, args.out, resume=args.resume, batch_size=args.batch_size,
        workers=args.workers, draw=not args.no_draw, video_out=args.video_out,
        extra_drawing=explain if args.explain > 0 else None)
    out = Path(args.out)
    print(f"{summary.predicted} images predicted, {summary.images} in {out / 'images.json'}, "
          f"{summary.detections} detections >= {args.threshold} -> {out / 'detections.json'} "
          f"(stream: {summary.jsonl})" + ("" if args.no_draw else f", drawings in {out / 'images'}"))
    if summary.failed:
        print(f"{summary.failed} image(s) could not be read and were skipped "
              f"(see {out / 'failed.json'})", file=sys.stderr)
        return 1
    return 0


def _predict_model(args: argparse.Namespace):
    """(model, device) of `dabdetr predict`: the PyTorch model (optimized as asked) or an
    ONNX Runtime session of an exported file."""
    if args.backend == "onnxruntime":
        if args.optimize != "none" or args.explain > 0 or args.device not in (None, "cpu"):
            raise ValueError("--backend onnxruntime runs the exported graph on the CPU: drop "
                             "--optimize, --explain and --device (they need the PyTorch model)")
        from dabdetr.runtime import OnnxDetector

        return OnnxDetector(args.weights), "cpu"
    from dabdetr.distributed import resolve_device
    from dabdetr.optimize import optimized
    from dabdetr.weights.loading import load_model

    device = str(resolve_device(args.device))
    return optimized(load_model(args.weights, device=device), args.optimize), device


def explain_image(model, predictor, img, top_k: int):
    """A grid: for each of the top-k (query, class) pairs, the query's cross-attention map."""
    import torch

    from dabdetr.data.batching import batch_images
    from dabdetr.postprocessing import postprocess
    from dabdetr.visualize import draw_attention, image_grid, query_attention

    tensor = predictor.transform(img).to(predictor.device)
    images, mask = batch_images([tensor])
    outputs, maps = query_attention(model, images, mask)
    scores = outputs.pred_logits[0].sigmoid()
    num_classes = scores.shape[-1]
    best = torch.topk(scores.flatten(), min(top_k, scores.numel())).indices
    res = postprocess(outputs, [(img.height, img.width)], num_select=len(best))[0]
    tiles = []
    for i, flat in enumerate(best.tolist()):
        query = flat // num_classes
        caption = f"q{query} {model.config.label_name(flat % num_classes)} {float(res['scores'][i]):.2f}"
        tiles.append(draw_attention(img, maps[0, query], res["boxes"][i], caption))
    return image_grid(tiles, columns=min(4, len(tiles)))


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert weights between the authors', HF and our format")
    p.add_argument("src", help="weights source (anything load_model accepts)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=["ours", "hf"], default="ours", help="output format")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides a file cannot tell, e.g. dilation=true")
    p.set_defaults(func=cmd_convert)


def parse_overrides(items: Sequence[str]) -> dict:
    """KEY=VALUE strings -> dict; values parsed as JSON when possible (true, 3, 0.5)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    from dabdetr.weights.loading import export_huggingface, load_model_with_report, save_model

    model, report = load_model_with_report(args.src, strict=True, **parse_overrides(args.set))
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
    p.set_defaults(func=synthetic.run_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dabdetr", description="DAB-DETR object detection")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_predict, _add_convert, _add_synth):
        add(sub)
    from dabdetr import demo, export_cli
    from dabdetr.engine import evaluate, train

    for module in (train, evaluate, demo, export_cli):
        module.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except (ValueError, OSError) as err:
        print(f"dabdetr {args.command}: error: {err}", file=sys.stderr)
        code = 2
    return code

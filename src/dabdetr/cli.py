"""Command-line interface: `dabdetr <command> ...` (also `python -m dabdetr`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dabdetr.config import parse_overrides

logger = logging.getLogger("dabdetr")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="detect objects in images; writes COCO results + drawings",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and/or directories (searched recursively)")
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
    from dabdetr.optimize import add_cli_argument

    add_cli_argument(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:

    from dabdetr.inference import Predictor, find_images, predict_files
    from dabdetr.visualize import draw_detections
    from dabdetr.weights.loading import load_model

    out_dir = Path(args.out).resolve()
    # never feed our own drawings back in when --out sits inside an input folder
    files = [f for f in find_images(args.inputs) if out_dir not in f.resolve().parents]
    if not files:
        print(f"dabdetr predict: error: no images found in {args.inputs}", file=sys.stderr)
        return 2
    from dabdetr.distributed import resolve_device

    device = str(resolve_device(args.device))
    from dabdetr.optimize import optimized

    model = optimized(load_model(args.weights, device=device), args.optimize)
    predictor = Predictor(model, size=args.size, max_size=args.max_size,
                          num_select=args.num_select, threshold=args.threshold, device=device)
    out = Path(args.out)
    vis_dir = out / "images"
    vis_dir.mkdir(parents=True, exist_ok=True)
    used_names: set[str] = set()

    def save_drawing(det, img) -> None:
        if args.no_draw:
            return
        name = Path(det.source).stem
        while name in used_names:  # same file name in two folders
            name += "_"
        used_names.add(name)
        draw_detections(img, det.boxes, det.labels.tolist(), det.names, det.scores).save(
            vis_dir / f"{name}.jpg", quality=92)
        if args.explain > 0:
            explain_image(model, predictor, img, args.explain).save(
                vis_dir / f"{name}_attention.jpg", quality=92)

    report = predict_files(files, predictor, on_result=save_drawing)
    results, images = [], []
    for image_id, det in enumerate(report.detections, start=1):
        results.extend(det.to_coco(image_id))
        images.append({"id": image_id, "file_name": det.source, "height": det.image_size[0],
                       "width": det.image_size[1]})
    (out / "detections.json").write_text(json.dumps(results))
    (out / "images.json").write_text(json.dumps(images, indent=1))
    if report.failed:
        (out / "failed.json").write_text(json.dumps(
            [{"file": f, "error": e} for f, e in report.failed], indent=1))
    print(f"{len(report.detections)} images, {len(results)} detections >= {args.threshold} "
          f"-> {out / 'detections.json'}" + ("" if args.no_draw else f", drawings in {vis_dir}"))
    if report.failed:
        print(f"{len(report.failed)} image(s) could not be read and were skipped "
              f"(see {out / 'failed.json'})", file=sys.stderr)
        return 1
    return 0


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
    from dabdetr import demo
    from dabdetr.data import commands as data_commands
    from dabdetr.engine import evaluate, train

    for module in (data_commands, train, evaluate, demo):
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

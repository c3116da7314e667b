"""The paper's query ablation at CPU scale: which positional prior makes a DETR converge.

Trains each named variant of the demo's model and recipe (src/dabdetr/demo.py) for the same
budget of images seen, over several seeds, evaluating COCO AP on the validation split every
`--eval-every` images. Images seen, not minutes, so machine load cannot favour a variant. The
variants differ only in their decoder queries:

    detr               learned d-dim positional queries, no anchors (DETR)
    anchor2d           learned 2-D points, sine-embedded (Conditional / Anchor DETR)
    dab-static         learned 4-D anchors, not updated by the layers
    dab-no-modulation  learned 4-D anchors, updated, no width/height modulation
    dab                learned 4-D anchors, updated, modulated (DAB-DETR)
    dab-two-stage      anchors selected from the encoder (the demo's query selection)
    (optional) dab-pe-t20: dab with query sine temperature 20 (the paper's text);
               dab-fixxy: dab with x, y drawn uniform and frozen

    python benchmarks/ablation.py                         # synthetic benchmark, 6 variants x 3 seeds
    python benchmarks/ablation.py --data DIR --budget 40000 --eval-every 4000 --seeds 0 1 2
    python benchmarks/ablation.py --report-only           # table and plot from the runs on disk

The learning rate is constant after warm-up (the demo drops it after 80% of its time budget,
which would depend on machine load). Runs continue where they stopped: a run directory under
--out that already holds evaluations is resumed from its last checkpoint. Writes --json
(every evaluation: variant, seed, images seen, AP, AP50), --table (markdown: mean and min-max
over seeds) and --plot (AP and AP50 against images seen). With --peaks N it also measures where
each trained run's positional attention peaks (`dabdetr.explain.peak_offsets`): the share of
each validation image's 10 best queries (--peaks-top) whose map peaks within one feature cell
of the query's anchor centre, and of its predicted box centre.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dabdetr.argtypes import non_negative_int, positive_int  # noqa: E402
from dabdetr.demo import DEMO_DATA, DEMO_RECIPE  # noqa: E402

LEARNED = {"two_stage": False}  # learned queries instead of the demo's query selection
VARIANTS: dict[str, dict[str, Any]] = {
    "detr": {**LEARNED, "query_type": "detr"},
    "anchor2d": {**LEARNED, "query_type": "anchor2d"},
    "dab-static": {**LEARNED, "query_type": "dab", "iter_update": False},
    "dab-no-modulation": {**LEARNED, "query_type": "dab", "modulate_hw_attn": False},
    "dab": {**LEARNED, "query_type": "dab"},
    "dab-two-stage": {"two_stage": True},
    "dab-pe-t20": {**LEARNED, "query_type": "dab", "query_pe_temperature": 20.0},
    "dab-fixxy": {**LEARNED, "query_type": "dab", "random_refpoints_xy": True},
}
DEFAULT_VARIANTS = ["detr", "anchor2d", "dab-static", "dab-no-modulation", "dab", "dab-two-stage"]
ROOT = Path(__file__).resolve().parent


def train_config(variant: str, seed: int, run_dir: Path, data: str, max_steps: int,
                 overrides: dict[str, Any], preset: str | None):
    """The TrainConfig of one run: the demo's recipe, the variant's model options, a step
    budget instead of a time budget, evaluation only where the budget stops it."""
    from dabdetr.engine.train import TrainConfig

    recipe = json.loads(json.dumps(DEMO_RECIPE))
    recipe["lr_drop_time"] = None  # a drop by time would depend on machine load
    if preset:
        recipe["model"] = preset
    recipe["model_overrides"] = {**recipe["model_overrides"], **VARIANTS[variant]}
    recipe.update(overrides)
    recipe.setdefault("num_workers", 0)
    return TrainConfig(data=data, out=str(run_dir), epochs=10_000, max_steps=max_steps,
                       seed=seed, lr_drop=[], eval_every=10_000, progress=False,
                       eval_batch_size=16, **recipe)


def train_until(cfg, resume: Path | None, device: str | None) -> None:
    """Train (or continue) one run up to cfg.max_steps; the engine evaluates when it stops
    there. The only call into the training engine."""
    from dabdetr.engine.train import train

    train(cfg, resume=str(resume) if resume else None, device=device)


def run_path(out: Path, variant: str, seed: int) -> Path:
    """The run directory of one variant and seed under --out."""
    return out / f"{variant}-seed{seed}"


def evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluated records of a run's metrics.jsonl, in step order."""
    from dabdetr.engine.runlog import read_log

    return read_log(run_dir / "metrics.jsonl", "epoch", keep=lambda r: r.get("AP") is not None)


def run(variant: str, seed: int, args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """One variant and seed: evaluations at every `eval_every` images up to `budget`."""
    batch = int(overrides.get("batch_size", DEMO_RECIPE["batch_size"]))
    if args.eval_every % batch or args.budget % args.eval_every:
        raise SystemExit(f"--eval-every {args.eval_every} must be a multiple of the batch size "
                         f"{batch}, and --budget {args.budget} a multiple of --eval-every")
    run_dir = run_path(Path(args.out), variant, seed)
    for images in range(args.eval_every, args.budget + 1, args.eval_every):
        done = [r["step"] for r in evaluations(run_dir)]
        target = images // batch
        if done and max(done) >= target:
            continue
        last = run_dir / "last.pt"
        cfg = train_config(variant, seed, run_dir, args.data, target, overrides, args.preset)
        train_until(cfg, last if last.exists() else None, args.device)
        print(f"{variant} seed {seed}: {images:,} images, AP50 "
              f"{evaluations(run_dir)[-1]['AP50']:.3f}", flush=True)


def collect(out: Path, variants: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    rows = []
    for variant in variants:
        for seed in seeds:
            for r in evaluations(run_path(out, variant, seed)):
                rows.append({"variant": variant, "seed": seed, "images_seen": r["images_seen"],
                             "AP": r["AP"], "AP50": r["AP50"], "minutes": r["minutes"]})
    return rows


def peak_statistics(run_dir: Path, data: str, count: int, top: int = 10,
                    radius: int = 1, device: str = "cpu") -> list[dict[str, Any]]:
    """Where a trained run's positional attention peaks: for each decoder layer and each of the
    first `count` validation images, the share of the image's `top` best-scoring queries whose
    positional map (mean over heads) peaks within `radius` feature cells of the query's
    reference point: the layer's anchor centre ("anchor"; not for "detr") and the final
    predicted box centre ("box"). Returns rows: layer, reference, mean share over the images
    and the share of images where at least 90% of the top queries are that close."""
    from dabdetr.data.batching import batch_images
    from dabdetr.data.coco import resolve_split
    from dabdetr.data.io import load_image_rgb
    from dabdetr.explain import attention_maps, peak_offsets
    from dabdetr.inference import Predictor
    from dabdetr.weights.loading import load_model

    model = load_model(run_dir / "last.pt", device=device)
    predictor = Predictor(model, device=device)
    folder, annotations = resolve_split(data, "val")
    images = json.loads(annotations.read_text())["images"]
    shares: dict[tuple[int, str], list[float]] = {}
    for start in range(0, min(count, len(images)), 16):
        chunk = images[start:min(start + 16, count)]
        tensors = [predictor.transform(load_image_rgb(folder / i["file_name"]))
                   .to(predictor.device) for i in chunk]
        result = attention_maps(model, *batch_images(tensors))
        scores = result.outputs.pred_logits.sigmoid().amax(-1)  # (B, Q)
        best = scores.topk(min(top, scores.shape[1]), dim=-1).indices  # (B, N)
        for layer in range(len(result.layers)):
            references = {"box": result.outputs.pred_boxes}
            if result.layers[layer].anchors is not None:
                references["anchor"] = None  # peak_offsets' default: the layer's anchors
            heads = result.layers[layer].positional.shape[2]
            for name, ref in references.items():
                for head in (None, *range(heads)):
                    close = peak_offsets(result, layer, ref, head).gather(1, best) <= radius
                    shares.setdefault((layer, name, head), []).extend(
                        close.float().mean(1).tolist())  # per image: share of its N queries
    rows = []
    for (layer, name, head), values in shares.items():
        if head is None:  # the head-averaged map; then each head's own
            per_head = [statistics.mean(shares[(layer, name, h)]) for h in range(heads)]
            rows.append({"layer": layer, "reference": name, "images": len(values),
                         "share_within": statistics.mean(values),
                         "images_at_least_90": statistics.mean(v >= 0.9 for v in values),
                         "per_head_share_within": per_head})
    return sorted(rows, key=lambda r: (r["layer"], r["reference"]))


def peaks_table(peaks: list[dict[str, Any]], variants: list[str]) -> str:
    """Markdown: per variant and reference, the mean share of top queries peaking within a cell
    of it and the share of images with >= 90% of them, per decoder layer (mean over seeds)."""
    layers = sorted({p["layer"] for p in peaks})
    lines = ["| variant | reference | " + " | ".join(f"layer {i}" for i in layers) + " |",
             "|---|---|" + "---|" * len(layers)]
    for variant in variants:
        for reference in ("anchor", "box"):
            rows = [p for p in peaks if p["variant"] == variant and p["reference"] == reference]
            if not rows:
                continue
            cells = []
            for layer in layers:
                at = [p for p in rows if p["layer"] == layer]  # one per seed
                # heads are not matched across seeds: each run's own most centred head
                best_head = [max(p["per_head_share_within"]) for p in at]
                cells.append(f"{statistics.mean(p['share_within'] for p in at):.0%} "
                             f"({statistics.mean(p['images_at_least_90'] for p in at):.0%}; "
                             f"best head {statistics.mean(best_head):.0%})" if at else "-")
            lines.append(f"| {variant} | {reference} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _by_point(rows: list[dict[str, Any]], variant: str) -> dict[int, list[dict[str, Any]]]:
    points: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["variant"] == variant:
            points.setdefault(r["images_seen"], []).append(r)
    return dict(sorted(points.items()))


def table(rows: list[dict[str, Any]], variants: list[str]) -> str:
    """Markdown: per variant, AP50 at every evaluation point and AP at the last, each the
    mean over seeds with the min-max range."""
    images = sorted({r["images_seen"] for r in rows})
    head = " | ".join(f"AP50 @ {i:,}" for i in images)
    lines = [f"| variant | seeds | {head} | AP @ {images[-1]:,} |" if images else "| variant |",
             "|---|---|" + "---|" * (len(images) + 1)]

    def cell(values: list[float]) -> str:
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    for variant in variants:
        points = _by_point(rows, variant)
        seeds = len({r["seed"] for r in rows if r["variant"] == variant})
        cells = [cell([r["AP50"] for r in points.get(i, [])]) for i in images]
        final = cell([r["AP"] for r in points.get(images[-1], [])]) if images else "-"
        lines.append(f"| {variant} | {seeds} | {' | '.join(cells)} | {final} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], variants: list[str], path: Path, title: str) -> None:
    """AP and AP50 against images seen: the mean over seeds, shaded between min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in variants:
        points = _by_point(rows, variant)
        if not points:
            continue
        x = [i / 1000 for i in points]
        for ax, key in zip(axes, ("AP", "AP50"), strict=True):
            values = [[r[key] for r in group] for group in points.values()]
            line, = ax.plot(x, [statistics.mean(v) for v in values], marker=".", label=variant)
            ax.fill_between(x, [min(v) for v in values], [max(v) for v in values],
                            color=line.get_color(), alpha=0.15)
    for ax, key in zip(axes, ("AP", "AP50"), strict=True):
        ax.set_xlabel("thousand images seen")
        ax.set_ylabel(f"validation {key} (mean, min-max over seeds)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _overrides(items: list[str]) -> dict[str, Any]:
    from dabdetr.cli import parse_overrides
    from dabdetr.engine.train import TrainConfig

    overrides = parse_overrides(items)
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"--set {unknown}: not TrainConfig fields; known: {sorted(known)}")
    return overrides


def prepare_data(args: argparse.Namespace) -> None:
    """Generate the synthetic benchmark in --data unless it is there (or --data is given as
    an existing COCO-format folder)."""
    from dabdetr.data.synthetic import dataset_matches, generate_dataset

    if args.data is not None:
        if not Path(args.data).is_dir():
            raise SystemExit(f"--data {args.data} is not a directory")
        return
    args.data = str(Path(args.out) / "data")
    spec = dict(DEMO_DATA, difficulty=args.difficulty)
    if not dataset_matches(args.data, **spec):
        generate_dataset(args.data, progress=False, **spec)


def backbone_from(source: str, out: Path) -> str:
    """Write the ResNet of a trained model (anything `dabdetr predict` loads) as a torchvision
    state dict under `out`, for TrainConfig.backbone_weights; returns its path."""
    import torch

    from dabdetr.errors import UserError
    from dabdetr.weights.loading import load_model

    try:
        model = load_model(source)
    except UserError as err:  # a missing or unreadable weight source
        raise SystemExit(f"--backbone-from {source}: {err}") from None
    path = out / "backbone.pth"
    out.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"backbone.{os.getpid()}.tmp")  # parallel invocations share it
    torch.save(model.backbone.body.state_dict(), partial)
    os.replace(partial, path)
    return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        choices=sorted(VARIANTS), metavar="NAME",
                        help=f"any of {sorted(VARIANTS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=16_000, help="images seen per run")
    parser.add_argument("--eval-every", type=int, default=2_000, help="images between evaluations")
    parser.add_argument("--data", default=None, help="a COCO-format dataset folder (default: "
                        "the demo's synthetic benchmark, generated under --out)")
    parser.add_argument("--difficulty", default=DEMO_DATA["difficulty"],
                        choices=("easy", "standard", "hard"),
                        help="of the generated synthetic benchmark")
    parser.add_argument("--preset", default=None,
                        help=f"model preset (default: the demo's, {DEMO_RECIPE['model']})")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig fields over the demo's recipe, e.g. batch_size=16 "
                        "backbone_weights=resnet18.pth")
    parser.add_argument("--backbone-from", default=None, metavar="WEIGHTS",
                        help="start every run from the ResNet of this trained model (e.g. the "
                        "model folder `dabdetr demo` writes), as from ImageNet weights")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--out", default="runs/ablation", help="run directories")
    parser.add_argument("--json", default=str(ROOT / "ablation.json"))
    parser.add_argument("--table", default=str(ROOT / "ablation.md"))
    parser.add_argument("--plot", default=str(ROOT / "ablation.png"))
    parser.add_argument("--title", default=None, help="the plot's title (default: the setting)")
    parser.add_argument("--report-only", action="store_true", help="only collect and draw")
    parser.add_argument("--peaks", type=non_negative_int, default=0, metavar="N",
                        help="also measure, on the first N validation images, where each run's "
                        "positional attention peaks relative to its anchors and boxes "
                        "(the --peaks-top best queries of each image)")
    parser.add_argument("--peaks-top", type=positive_int, default=10, metavar="K",
                        help="with --peaks: the best-scoring queries of each image measured")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

    from dabdetr.demo import loader_workers
    from dabdetr.distributed import resolve_device

    args = parse_args(argv)
    overrides = _overrides(args.set)
    if args.backbone_from:
        overrides["backbone_weights"] = backbone_from(args.backbone_from, Path(args.out))
    device = resolve_device(args.device)
    overrides.setdefault("num_workers", loader_workers(device.type))  # as the demo
    synthetic = args.data is None
    if not args.report_only:
        prepare_data(args)
        for seed in args.seeds:  # seed-major: every variant has a result early
            for variant in args.variants:
                run(variant, seed, args, overrides)
    rows = collect(Path(args.out), args.variants, args.seeds)
    setting = {
        "data": args.data or str(Path(args.out) / "data"),
        "synthetic": dict(DEMO_DATA, difficulty=args.difficulty) if synthetic else None,
        "recipe": {**DEMO_RECIPE, "lr_drop_time": None, **overrides,
                   **({"model": args.preset} if args.preset else {})},
        "variants": {v: VARIANTS[v] for v in args.variants}, "seeds": args.seeds,
        "budget_images": args.budget, "eval_every_images": args.eval_every,
        "backbone_from": args.backbone_from,
        "machine": f"{device.type}"
                   f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}"
                   f", {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/ablation.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:]),
    }
    report: dict[str, Any] = {"setting": setting, "runs": rows}
    sections = [table(rows, args.variants),
                f"AP50 / AP: mean over seeds (min-max). {setting['machine']}, {setting['date']}: "
                f"`{setting['command']}`"]
    if args.peaks:
        report["peaks"] = [
            {"variant": variant, "seed": seed, "top": args.peaks_top, **row}
            for variant in args.variants for seed in args.seeds
            if (run_path(Path(args.out), variant, seed) / "last.pt").exists()
            for row in peak_statistics(run_path(Path(args.out), variant, seed), setting["data"],
                                       args.peaks, top=args.peaks_top, device=str(device))]
        sections += [f"Top-{args.peaks_top} queries whose positional map peaks within one "
                     f"feature cell of the reference (positional map averaged over the heads), "
                     f"mean over {args.peaks} validation images and the seeds; in brackets: "
                     "images where at least 90% do, and the share for each run's single head "
                     "that peaks there most often",
                     peaks_table(report["peaks"], args.variants)]
    Path(args.json).write_text(json.dumps(report, indent=1))
    text = "\n\n".join(sections)
    Path(args.table).write_text(text + "\n")
    title = args.title or (f"{args.budget:,} images per run, seeds {args.seeds}, data "
                           f"{Path(setting['data']).name}: {setting['command']}")
    plot(rows, args.variants, Path(args.plot), title)
    print(text)


if __name__ == "__main__":
    main()

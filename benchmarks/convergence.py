"""Convergence on the synthetic benchmark: validation AP against minutes and images seen.

Runs each named recipe through the same `Trainer` that `dabdetr train` uses, for a fixed
wall-clock budget, evaluating COCO AP on the held-out split after every epoch.

    python benchmarks/convergence.py --minutes 10 --recipes naive demo
    python benchmarks/convergence.py --minutes 6 --jobs 2 --recipes demo demo+o2m ...

With --jobs 2 two recipes run at once with one thread each (compare them by images seen; the
wall-clock axis then reflects half the machine). Results: one run directory per recipe under
--out, a PNG plot and a markdown table (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Each recipe: a model preset + overrides and TrainConfig fields; `dabdetr demo` uses DEMO_RECIPE
# (src/dabdetr/demo.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dabdetr.demo import DEMO_RECIPE  # noqa: E402
from dabdetr.engine.runlog import read_log  # noqa: E402

NAIVE = {  # the authors' recipe with a trainable ResNet-18 from scratch
    "model": "cpu-small",
    "model_overrides": {"backbone_return_layer": "layer4", "dilation": False, "hidden_dim": 256,
                        "enc_layers": 3, "dec_layers": 3, "dim_feedforward": 1024,
                        "num_queries": 30, "two_stage": False},
    "batch_size": 8, "lr": 2e-4, "lr_backbone": 2e-4, "warmup_steps": 0, "clip_max_norm": 0.1,
    "image_size": 160, "match_repeat": 1, "no_crop": False, "no_multi_scale": False,
    "cls_loss_coef": 1.0,
}


def _variant(**changes):
    recipe = json.loads(json.dumps(DEMO_RECIPE))
    for key, value in changes.items():
        if key == "model_overrides":
            recipe["model_overrides"].update(value)
        else:
            recipe[key] = value
    return recipe


def _b16(**changes):
    """A variant of the demo recipe at batch 16 instead of the demo's 8."""
    return _variant(**{"batch_size": 16, **changes})


RECIPES = {
    "naive": NAIVE,
    "demo": DEMO_RECIPE,
    # each switch of the demo recipe turned back off
    "demo-no-two-stage": _variant(model_overrides={"two_stage": False}),
    "demo-layer3": _variant(model_overrides={"backbone_return_layer": "layer3"}),
    "demo-multi-scale": _variant(no_multi_scale=False),
    "demo+o2m": _variant(match_repeat=3),
    "demo-cls1": _variant(cls_loss_coef=1.0),
    "demo-no-lr-drop": _variant(lr_drop_time=None),
    "demo-lr2e-4": _variant(lr=2e-4, lr_backbone=2e-4, warmup_steps=0),
    "demo-frozen-bn": _variant(model_overrides={"backbone_norm": "frozen"}),
    "demo-clip0.1": _variant(clip_max_norm=0.1),
    # candidate additions
    "demo+dn": _variant(model_overrides={"dn_groups": 3}),
    "demo-b16": _b16(),
    # the classification weight and focal alpha at batch 16, without the lr drop (compare at
    # fixed images seen)
    "nodrop-cls2": _b16(cls_loss_coef=2.0, lr_drop_time=None),
    "nodrop-cls4": _b16(cls_loss_coef=4.0, lr_drop_time=None),
    "nodrop-cls8": _b16(cls_loss_coef=8.0, lr_drop_time=None),
    "nodrop-cls2-alpha0.5": _b16(cls_loss_coef=2.0, focal_alpha=0.5, lr_drop_time=None),
    "nodrop-cls8-alpha0.5": _b16(cls_loss_coef=8.0, focal_alpha=0.5, lr_drop_time=None),
    # the learning rate and the batch size on top of weight 8
    "nodrop-cls8-lr2e-3": _b16(cls_loss_coef=8.0, lr=2e-3, lr_backbone=2e-3, lr_drop_time=None),
    "nodrop-cls8-b8": _variant(cls_loss_coef=8.0, batch_size=8, lr_drop_time=None),
}


def run_one(name: str, data: str, out: Path, minutes: float, seed: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from dabdetr.engine.config import TrainConfig
    from dabdetr.engine.trainer import Trainer

    recipe = dict(RECIPES[name])
    cfg = TrainConfig(data=data, out=str(out / name), epochs=10_000, time_limit=minutes,
                      seed=seed, lr_drop=[], eval_every=1, progress=False, num_workers=1,
                      **recipe)
    Trainer(cfg).fit()


def load_history(run_dir: Path) -> list[dict]:
    """The evaluated epoch records of a run (also of one still running)."""
    return [r for r in read_log(run_dir / "metrics.jsonl", "epoch") if "AP" in r]


def plot(out: Path, names: list[str], title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    colors = plt.cm.tab20.colors
    for i, name in enumerate(names):
        hist = load_history(out / name)
        if not hist:
            continue
        mins = [h["minutes"] for h in hist]
        imgs = [h["images_seen"] / 1000 for h in hist]
        style = {"marker": ".", "label": name, "color": colors[(2 * i) % 20 + (2 * i) // 20 % 2]}
        axes[0].plot(mins, [h["AP50"] for h in hist], **style)
        axes[1].plot(mins, [h["AP"] for h in hist], **style)
        axes[2].plot(imgs, [h["AP"] for h in hist], **style)
    for ax, (x, y) in zip(axes, [("minutes (wall clock)", "val AP50"),
                                 ("minutes (wall clock)", "val AP"),
                                 ("thousand images seen", "val AP")], strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "convergence.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


MILESTONES = (8_000, 16_000)  # images seen; the demo's 10 minutes see about 20,000


def table(out: Path, names: list[str]) -> str:
    """Markdown: AP / AP50 at fixed numbers of images seen (the fair axis when runs shared
    the machine), then at the end of each run."""
    head = " | ".join(f"AP / AP50 at {m // 1000}k images" for m in MILESTONES)
    rows = [f"| run | {head} | end: minutes | images | AP | AP50 |",
            "|---|" + "---|" * (len(MILESTONES) + 4)]
    for name in names:
        hist = load_history(out / name)
        if not hist:
            rows.append(f"| {name} |" + " - |" * (len(MILESTONES) + 4))
            continue
        cells = []
        for m in MILESTONES:
            at = [h for h in hist if h["images_seen"] == m]
            cells.append(f"{at[0]['AP']:.3f} / {at[0]['AP50']:.3f}" if at else "-")
        last = hist[-1]
        rows.append(f"| {name} | {' | '.join(cells)} | {last['minutes']:.1f} | "
                    f"{last['images_seen']:,} | {last['AP']:.3f} | {last['AP50']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["naive", "demo"],
                        help=f"any of {sorted(RECIPES)}; with --report-only, any run "
                        "directory name under --out")
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per recipe")
    parser.add_argument("--data", default="runs/synth-standard-128",
                        help="synthetic dataset dir (generated if absent)")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--out", default="runs/convergence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="recipes run in parallel")
    parser.add_argument("--report-only", action="store_true", help="just plot existing runs")
    parser.add_argument("--title", default=None,
                        help="the plot's title (say which machine, date and command)")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown and not args.report_only:
        parser.error(f"unknown recipe(s) {unknown}; choose from {sorted(RECIPES)}")
    if args.run_one:
        run_one(args.run_one, args.data, out, args.minutes, args.seed, args.threads)
        return
    if not args.report_only:
        from dabdetr.data.synthetic import dataset_matches, generate_dataset

        if not dataset_matches(args.data, args.train, args.val, seed=12345,
                               difficulty="standard", image_size=128):
            generate_dataset(args.data, args.train, args.val, seed=12345, difficulty="standard",
                             image_size=128)
        threads = max(1, (os.cpu_count() or 2) // args.jobs)
        pending = list(args.recipes)
        running: list[tuple[str, subprocess.Popen]] = []
        while pending or running:
            while pending and len(running) < args.jobs:
                name = pending.pop(0)
                cmd = [sys.executable, __file__, "--run-one", name, "--data", args.data, "--out",
                       str(out), "--minutes", str(args.minutes), "--seed", str(args.seed),
                       "--threads", str(threads)]
                print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
                log = open(out / f"{name}.log", "w") if out.mkdir(parents=True, exist_ok=True) \
                    is None else None
                running.append((name, subprocess.Popen(cmd, stdout=log, stderr=log)))
            time.sleep(2)
            for item in list(running):
                if item[1].poll() is not None:
                    print(f"[{time.strftime('%H:%M:%S')}] done {item[0]} (exit {item[1].returncode})",
                          flush=True)
                    running.remove(item)
    print(table(out, args.recipes))
    print("plot:", plot(out, args.recipes, args.title))


if __name__ == "__main__":
    main()

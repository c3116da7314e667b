"""DAB-Deformable-DETR: our attention core against the authors', and transformers' Deformable DETR.

Three modes, each timing its sides in interleaved rounds (see _common.interleaved and
_common.ratio_line) after printing the machine:

- inference (default): the `dab-deformable-detr-r50` preset (random weights) on one 800x1088
  image, batch 1: `ours`, with `--authors-repo` the same model with the authors' pure-PyTorch
  `ms_deform_attn_core_pytorch` in place of our `ms_deform_attn` (`authors' core`: everything
  else shared, so the ratio is what the attention core changes end to end), and transformers'
  DeformableDetrForObjectDetection of the same size (`transformers`: a reference point, with its
  own random weights).
- `--train`: one training step of the same sides, batch 2 at 512x512: zero_grad, forward, the
  loss with auxiliary terms, backward, gradient clipping at 0.1, AdamW. Ours and the authors'
  core use the SetCriterion and AdamW of `dabdetr train`; transformers computes its own loss
  from `labels` and gets the fused AdamW its Trainer builds by default, on the parameters ours
  trains (backbone layer2..4 and everything after it).
- `--presets`: images/s of `dab-deformable-detr-r50` and `dab-deformable-cpu-small`, inference
  batch 1 on square images of each `--preset-sizes` side (default 400 and 800), all in one set of
  interleaved rounds.

Peak memory (inference and `--train`) is measured per side in a fresh child process.

    python benchmarks/bench_deformable.py --authors-repo ../DAB-DETR          # 800x1088, R50
    python benchmarks/bench_deformable.py --train --authors-repo ../DAB-DETR  # batch 2, 512x512
    python benchmarks/bench_deformable.py --presets                           # 400 and 800 px
    python benchmarks/bench_deformable.py --tiny [--train | --presets]        # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _deformable  # noqa: E402
import bench_train  # noqa: E402

from dabdetr.engine.config import TrainConfig  # noqa: E402
from dabdetr.models.criterion import SetCriterion  # noqa: E402
from dabdetr.models.matcher import HungarianMatcher  # noqa: E402

AUTHORS = "authors' core"
PRESETS = ("dab-deformable-detr-r50", "dab-deformable-cpu-small")


def parse_size(text: str) -> tuple[int, int]:
    """"HxW" as (H, W) (argparse type)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like 800x1088") from None
    return h, w


def parse_sides(text: str) -> list[int]:
    """"400,800" as [400, 800] (argparse type)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes {text!r} must look like 400,800") from None


def side_names(args: argparse.Namespace) -> list[str]:
    """The compared sides, ours first (the ratios are taken against it)."""
    return ["ours", *([AUTHORS] if args.authors_repo else []), "transformers"]


def core_swap(side: str, args: argparse.Namespace) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context in which `side` runs our model: the authors' attention core
    swapped in for the authors' side, nothing for ours."""
    if side != AUTHORS:
        return contextlib.nullcontext
    core = _deformable.authors_core(args.authors_repo)
    return lambda: _deformable.core_replaced(core)


# ---- inference -----------------------------------------------------------------------------

def inference_side(side: str, args: argparse.Namespace) -> Callable:
    """A callable (images, mask) -> (logits, boxes) for one side, without gradients."""
    config = _deformable.model_config(args.tiny)
    if side == "transformers":
        theirs = _deformable.transformers_model(config, args.device).requires_grad_(False)

        def run(images, mask):
            out = theirs(pixel_values=images, pixel_mask=(~mask).long())
            return out.logits, out.pred_boxes

        return run
    model = _deformable.ours(config, args.device).requires_grad_(False)
    swap = core_swap(side, args)

    def run(images, mask):
        with swap():
            out = model(images, mask)
        return out.pred_logits, out.pred_boxes

    return run


def image(size: tuple[int, int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One seeded random image [1, 3, H, W] and its mask [1, H, W] (no padding)."""
    h, w = size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, h, w, generator=gen).to(device)
    return images, torch.zeros(1, h, w, dtype=torch.bool, device=device)


def bench_inference(args: argparse.Namespace) -> tuple[list[str], str]:
    """Time one forward of every side; returns the sides and the title of their memory table."""
    h, w = args.size
    config = _deformable.model_config(args.tiny)
    print(f"# {describe(config)}, inference at {h}x{w}, batch 1, fp32, {args.device}")
    images, mask = image(args.size, args.device)
    runs = {side: inference_side(side, args) for side in side_names(args)}
    with torch.inference_mode():
        outputs = {side: run(images, mask) for side, run in runs.items()}
        times = _common.interleaved({s: (lambda r=r: r(images, mask)) for s, r in runs.items()},
                                    args.warmup, args.reps, args.device)
    if AUTHORS in outputs:
        print(f"# max abs diff {AUTHORS} vs ours: logits "
              f"{(outputs[AUTHORS][0] - outputs['ours'][0]).abs().max().item():.2e}, boxes "
              f"{(outputs[AUTHORS][1] - outputs['ours'][1]).abs().max().item():.2e}")
    print("# transformers: a Deformable DETR of the same size with its own random weights")
    print_times(times, args.reps)
    return list(runs), "peak memory of one forward (fresh process per side, after a warm-up):"


def child_inference(args: argparse.Namespace) -> dict:
    """Child process: one side's model size, what a warm-up forward leaves resident, and the
    peak growth of one forward (MiB)."""
    libraries_imported(args.child_side)
    before = _common.resident_mib(args.device)
    run = inference_side(args.child_side, args)
    model_mib = _common.resident_mib(args.device) - before
    images, mask = image(args.size, args.device)
    with torch.inference_mode():
        run(images, mask)
        kept_mib = _common.resident_mib(args.device) - before - model_mib
        with _common.PeakMemory(args.device) as peak:
            run(images, mask)
    return {"model_mib": model_mib, "kept_mib": kept_mib, "peak_mib": peak.mib,
            "exact": peak.exact}


# ---- training step ---------------------------------------------------------------------------

def ours_criterion(num_classes: int) -> SetCriterion:
    """The SetCriterion `dabdetr train` builds with its default options."""
    cfg = TrainConfig()
    matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou,
                               cfg.focal_alpha)
    weights = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef,
               "loss_giou": cfg.giou_loss_coef}
    return SetCriterion(num_classes, matcher, weights, cfg.focal_alpha)


def train_side(side: str, args: argparse.Namespace, batch_data) -> tuple[Callable, int]:
    """(one training step returning the loss, trainable parameters) for one side."""
    images, mask, targets = batch_data
    config = _deformable.model_config(args.tiny)
    if side == "transformers":
        model = _deformable.transformers_model(config, args.device).train()
        _deformable.freeze_like_ours(model)
        optimizer = peer_adamw(model, "model.backbone.")
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        pixel_mask = (~mask).long()

        def loss_fn():
            return model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss
    else:
        model = _deformable.ours(config, args.device).train()
        criterion = ours_criterion(config.num_classes)
        optimizer = bench_train.ours_optimizer(model)
        swap = core_swap(side, args)

        def loss_fn():
            with swap():
                return criterion.weighted_total(criterion(model(images, mask), targets))

    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, bench_train.CLIP)
        optimizer.step()
        return loss.detach()

    return step, _deformable.trainable(model)


def peer_adamw(model: torch.nn.Module, backbone_prefix: str) -> torch.optim.AdamW:
    """The recipe's fused AdamW (lr 1e-4, backbone 1e-5, weight decay 1e-4) for a peer model."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in trained if n.startswith(backbone_prefix)]
    rest = [p for n, p in trained if not n.startswith(backbone_prefix)]
    return torch.optim.AdamW(
        [{"params": rest}, {"params": backbone, "lr": bench_train.BACKBONE_LR}],
        lr=bench_train.LR, weight_decay=bench_train.WEIGHT_DECAY, fused=True)


def bench_step(args: argparse.Namespace) -> tuple[list[str], str]:
    """Time one training step of every side; returns the sides and the title of their memory
    table."""
    h, w = args.size
    config = _deformable.model_config(args.tiny)
    print(f"# {describe(config)}, training step, batch {args.batch} at {h}x{w}, fp32, "
          f"{args.device}")
    batch_data = _common.make_batch(args.batch, args.size, args.device)
    steps, counts = {}, {}
    for side in side_names(args):
        steps[side], counts[side] = train_side(side, args, batch_data)
    print("# trainable parameters: " + ", ".join(f"{s} {n:,}" for s, n in counts.items()))
    # the first step doubles as a warm-up round (and creates AdamW's state)
    losses = {side: step().item() for side, step in steps.items()}
    print("# first-step loss: " + ", ".join(f"{s} {v:.4f}" for s, v in losses.items())
          + " (transformers: its own weights and loss weighting)")
    times = _common.interleaved(steps, max(args.warmup - 1, 0), args.reps, args.device)
    print_times(times, args.reps)
    return list(steps), "peak memory of one step (fresh process per side, after a warm-up step):"


def child_step(args: argparse.Namespace) -> dict:
    """Child process: one side's model size and the peak growth of one training step (MiB),
    after a warm-up step."""
    batch_data = _common.make_batch(args.batch, args.size, args.device)
    libraries_imported(args.child_side)
    before = _common.resident_mib(args.device)
    step, _ = train_side(args.child_side, args, batch_data)
    model_mib = _common.resident_mib(args.device) - before
    step()  # creates AdamW's state
    with _common.PeakMemory(args.device) as peak:
        step()
    return {"model_mib": model_mib, "peak_mib": peak.mib, "exact": peak.exact}


# ---- presets ---------------------------------------------------------------------------------

def bench_presets(args: argparse.Namespace) -> tuple[list[str], str]:
    """Time both presets at every size in one set of rounds; no memory table (no sides)."""
    sizes = args.preset_sizes
    print(f"# presets {', '.join(PRESETS)}: inference, batch 1, fp32, square images of side "
          f"{', '.join(map(str, sizes))} px, {args.device}; one set of interleaved rounds")
    runs = {}
    for preset in PRESETS:
        config = _deformable.model_config(False, preset)
        print(f"#   {preset}: {describe(config)}")
        model = _deformable.ours(config, args.device).requires_grad_(False)
        for side in sizes:
            images, mask = image((side, side), args.device)
            runs[f"{preset} {side}"] = lambda m=model, x=images, k=mask: m(x, k)
    with torch.inference_mode():
        times = _common.interleaved(runs, args.warmup, args.reps, args.device)
    print(f"\n## {args.reps} interleaved rounds")
    print(f"  {'preset, side px':<32} {'best ms':>9} {'median ms':>9} {'img/s best':>10} "
          f"{'img/s median':>12}")
    for name, seconds in times.items():
        best, median = min(seconds), statistics.median(seconds)
        print(f"  {name:<32} {best * 1e3:9.1f} {median * 1e3:9.1f} {1 / best:10.2f} "
              f"{1 / median:12.2f}")
    return [], ""


# ---- shared ----------------------------------------------------------------------------------

def describe(config) -> str:
    """One line naming the model a DabDeformableDetrConfig describes."""
    return (f"DAB-Deformable-DETR {config.backbone}, {config.hidden_dim} wide, "
            f"{config.enc_layers}+{config.dec_layers} layers, {config.num_feature_levels} "
            f"levels, {config.num_queries} queries")


def libraries_imported(side: str) -> None:
    """Import what `side` needs before its model is measured, so the model's resident size
    leaves out the libraries' code."""
    if side == "transformers":
        _deformable.import_transformers()


def print_times(times: dict[str, list[float]], reps: int) -> None:
    """Best and median ms of every side and its ratio against ours."""
    print(f"\n## {reps} interleaved rounds")
    print(f"  {'side':<24} {'best ms':>9} {'median ms':>9}")
    for side, seconds in times.items():
        print(_common.time_row(side, seconds))
    for side in list(times)[1:]:
        print(_common.ratio_line(f"{side}/ours", times[side], times["ours"]))


def print_memory(args: argparse.Namespace, sides: list[str], title: str) -> None:
    """Run every side once more in a fresh child process and print its peak memory."""
    threads = torch.get_num_threads()
    mode = ["--train", "--batch", str(args.batch)] if args.train else []
    extra = [*mode, "--size", "x".join(map(str, args.size)), "--device", args.device,
             "--threads", str(threads), *(["--tiny"] if args.tiny else []),
             *(["--authors-repo", str(args.authors_repo)] if args.authors_repo else [])]
    results = {side: _common.run_child(__file__, ["--child-side", side, *extra], threads)
               for side in sides}
    print("\n".join([title, *_common.memory_lines(results)]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, with the defaults of the chosen mode filled in."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="time a training step")
    mode.add_argument("--presets", action="store_true",
                      help=f"images/s of the presets {' and '.join(PRESETS)}")
    p.add_argument("--authors-repo", type=Path, default=None, metavar="PATH",
                   help="a checkout of IDEA-Research/DAB-DETR: also time our model with the "
                        "authors' PyTorch attention core")
    p.add_argument("--size", type=parse_size, default=None,
                   help="input HxW (default 800x1088; --train 512x512)")
    p.add_argument("--batch", type=int, default=2, help="--train: images per step")
    p.add_argument("--preset-sizes", type=parse_sides, default=None,
                   help="--presets: comma-separated square sides in px (default 400,800)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure peak memory in child processes (default: on, off with --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: ResNet-18, 2+2 layers, 64 wide at 128x160 (--train "
                        "128x128; --presets: the real presets at 64 and 96 px), 1 round")
    p.add_argument("--child-side", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size is None:
        args.size = (128, 128 if args.train else 160) if args.tiny else (
            (512, 512) if args.train else (800, 1088))
    if args.preset_sizes is None:
        args.preset_sizes = [64, 96] if args.tiny else [400, 800]
    if args.reps is None:
        args.reps = 1 if args.tiny else 5
    if args.warmup is None:
        args.warmup = 0 if args.tiny else 1
    if args.memory is None:
        args.memory = not args.tiny
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.authors_repo is not None:
        _deformable.authors_core(args.authors_repo)  # a wrong path fails before any work
    if args.child_side:
        print(json.dumps(child_step(args) if args.train else child_inference(args)))
        return 0
    print(f"# {_common.machine_info(args.device)}")
    peak = _common.matmul_peak_gflops(args.device)
    bench = bench_step if args.train else bench_presets if args.presets else bench_inference
    sides, title = bench(args)
    print(f"# matmul peak (2048^2 fp32): {peak:.0f} GFLOP/s before the rounds, "
          f"{_common.matmul_peak_gflops(args.device):.0f} after")
    if args.memory and sides:
        print_memory(args, sides, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

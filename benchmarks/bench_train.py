"""One training step of dabdetr vs transformers' DabDetrForObjectDetection, same weights.

A step is: zero_grad, forward, set loss with auxiliary (per decoder layer) terms, backward,
gradient clipping at 0.1, AdamW step (lr 1e-4, backbone 1e-5, weight decay 1e-4) — the
published recipe. Ours uses SetCriterion (HungarianMatcher, focal + L1 + GIoU) and the
optimizer `dabdetr.engine.schedule.build_optimizer` makes. transformers computes its own loss from
`labels` (auxiliary_loss=True) and gets the AdamW its Trainer builds by default
(`adamw_torch_fused` for torch >= 2.8), so both sides run torch's fused AdamW kernel.
transformers is run twice: as shipped ("transformers", which trains its whole backbone) and
restricted to the parameters ours trains ("transformers-frozen": backbone layer2..layer4;
upstream freezes the stem and layer1). With `--authors-repo PATH` (a checkout of
IDEA-Research/DAB-DETR) the authors' own model and SetCriterion run as a further side
("authors"), with the optimizer their main.py builds: torch.optim.AdamW with torch's default
kernel choice (a per-parameter loop on the CPU, foreach on CUDA; `--authors-fused-adamw` gives
them the fused kernel the other sides use, which isolates the model and loss). Steps alternate
between the models; peak memory is measured per side in a fresh child process (after one
warm-up step, which creates the optimizer state).

    python benchmarks/bench_train.py                       # R50, batch 2 at 512x512, CPU
    python benchmarks/bench_train.py --device cuda --amp   # bf16 autocast
    python benchmarks/bench_train.py --authors-repo ../DAB-DETR  # + the authors' code
    python benchmarks/bench_train.py --tiny                # CI smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _authors  # noqa: E402
import _common  # noqa: E402

from dabdetr import DabDetrConfig  # noqa: E402

# "transformers" trains what DabDetrForObjectDetection trains as shipped: its whole backbone.
# "transformers-frozen" trains the same parameters as ours (the recipe: stem and layer1 frozen).
SIDES = ("transformers", "transformers-frozen", "ours")
LR, BACKBONE_LR, WEIGHT_DECAY, CLIP = 1e-4, 1e-5, 1e-4, 0.1


def _recipe_adamw(model: torch.nn.Module, in_backbone, fused: bool) -> torch.optim.AdamW:
    """The recipe's AdamW for a peer's model: parameters whose name `in_backbone` accepts get
    the backbone lr. fused=False leaves the kernel to torch's default (per-parameter loop on
    the CPU, foreach on CUDA); fused=True asks for the fused kernel where it exists."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in trained if in_backbone(n)]
    rest = [p for n, p in trained if not in_backbone(n)]
    fused = fused and next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW([{"params": rest}, {"params": backbone, "lr": BACKBONE_LR}],
                             lr=LR, weight_decay=WEIGHT_DECAY, fused=fused or None)


def ours_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The recipe's AdamW as `dabdetr train` builds it."""
    from dabdetr.engine.config import TrainConfig
    from dabdetr.engine.schedule import build_optimizer

    return build_optimizer(
        model, TrainConfig(lr=LR, lr_backbone=BACKBONE_LR, weight_decay=WEIGHT_DECAY))


def build_side(side: str, weights: Path, device: str, amp: bool, batch_data,
               authors_repo: Path | None = None, authors_fused: bool = False):
    """(step function returning the loss, number of trainable parameters) for one side."""
    images, mask, targets = batch_data
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
                if amp else contextlib.nullcontext())
    if side == "authors":
        import dabdetr

        model, criterion = _authors.build(authors_repo, dabdetr.load_model(weights), device)
        model.train()
        # their main.py: AdamW(param_dicts, lr, weight_decay), "backbone" in a name -> lr_backbone
        optimizer = _recipe_adamw(model, lambda n: _authors.BACKBONE_KEY in n, authors_fused)
        samples = _authors.nested(images, mask)

        def loss_fn():  # their engine.train_one_epoch: the weighted sum of the loss dict
            losses = criterion(model(samples), targets)
            coef = criterion.weight_dict
            return sum(losses[k] * coef[k] for k in losses if k in coef)
    elif side.startswith("transformers"):
        model = _common.load_transformers(weights, device).train()
        if side == "transformers-frozen":  # train layer2..4 of the backbone, like ours
            for name, p in model.model.backbone.named_parameters():
                if not any(f"layer{i}." in name for i in (2, 3, 4)):
                    p.requires_grad_(False)
        # transformers' Trainer default optim: "adamw_torch_fused" (torch >= 2.8)
        optimizer = _recipe_adamw(model, lambda n: n.startswith("model.backbone."), fused=True)
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        pixel_mask = (~mask).long()

        def loss_fn():
            return model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss
    else:
        import dabdetr
        from dabdetr.models.criterion import SetCriterion

        model = dabdetr.load_model(weights, device=device).train()
        criterion = SetCriterion(model.config.num_classes)
        optimizer = ours_optimizer(model)

        def loss_fn():
            return criterion.weighted_total(criterion(model(images, mask), targets))

    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        return loss.detach()

    return step, sum(p.numel() for p in params)


def child_memory(args: argparse.Namespace, batch_data) -> None:
    device = args.device
    before = _common.resident_mib(device)
    step, _ = build_side(args.child_side, Path(args.child_weights), device, args.amp, batch_data,
                         args.authors_repo, args.authors_fused_adamw)
    model_mib = _common.resident_mib(device) - before
    step()  # creates AdamW's state
    with _common.PeakMemory(device) as peak:
        step()
    print(json.dumps({"model_mib": model_mib, "peak_mib": peak.mib, "exact": peak.exact}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")),
                        default=None, help="HxW (default 512x512)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA, or CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _authors.add_argument(parser)
    parser.add_argument("--authors-fused-adamw", action="store_true",
                        help="give the authors' side torch's fused AdamW (default: the plain "
                             "torch.optim.AdamW of their main.py)")
    _common.add_child_arguments(parser, tiny_size="128x128")
    args = parser.parse_args(argv)
    child_options = _common.apply_child_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or ((128, 128) if args.tiny else (512, 512))
    batch_data = _common.make_batch(args.batch, size, args.device)
    if args.child_side:
        child_memory(args, batch_data)
        return
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 1)
    reps = args.reps if args.reps is not None else (1 if args.tiny else 8)
    memory = args.memory if args.memory is not None else not args.tiny
    device = args.device

    config = (_common.tiny_config() if args.tiny else DabDetrConfig(inverse_sigmoid_eps=1e-5))
    name = "tiny R18" if args.tiny else "DAB-DETR-R50"
    precision = "bf16 autocast" if args.amp else "fp32"
    print(f"# {name} training step, batch {args.batch} at {size[0]}x{size[1]}, {precision}, "
          f"{device}")
    print(f"# {_common.machine_info(device)}")
    # the host's state before and after the timed steps: on a shared machine the same code's
    # times move with its neighbours' load, and this says how fast the machine was meanwhile
    peak_before = _common.matmul_peak_gflops(device)
    with tempfile.TemporaryDirectory() as tmp:
        weights = _common.export_for_transformers(_common.random_model(config), Path(tmp) / "hf")
        sides = SIDES if args.authors_repo is None else ("authors", *SIDES)
        steps, counts, first_loss = {}, {}, {}
        for side in sides:
            steps[side], counts[side] = build_side(side, weights, device, args.amp, batch_data,
                                                   args.authors_repo, args.authors_fused_adamw)
        print("# trainable parameters: " + ", ".join(f"{s} {counts[s]:,}" for s in sides))
        if args.authors_repo is not None:
            kind = ("fused" if args.authors_fused_adamw
                    else "torch's default kernel, as their main.py")
            print(f"# AdamW: authors {kind}; transformers fused (its Trainer's default); "
                  "ours fused (build_optimizer)")
        for side in sides:  # the first step doubles as a warm-up round
            first_loss[side] = steps[side]().item()
        print("# first-step loss (each library's own weighting): "
              + ", ".join(f"{s} {first_loss[s]:.4f}" for s in sides))
        times = _common.interleaved(steps, max(warmup - 1, 0), reps, device)
        print(f"\n## {reps} interleaved steps")
        print(f"  {'side':<24} {'best ms':>9} {'median ms':>9}")
        for side in sides:
            print(_common.time_row(side, times[side]))
        for side in sides[:-1]:
            print(_common.ratio_line(f"{side}/ours", times[side], times["ours"]))
        print(f"# matmul peak (2048^2 fp32): {peak_before:.0f} GFLOP/s before the steps, "
              f"{_common.matmul_peak_gflops(device):.0f} after")
        if memory:
            extra = ["--batch", str(args.batch), "--size", f"{size[0]}x{size[1]}", *child_options]
            if args.authors_repo is not None:
                extra += ["--authors-repo", str(args.authors_repo)]
            if args.authors_fused_adamw:
                extra.append("--authors-fused-adamw")
            print(_common.memory_report(
                __file__, sides, weights, device, extra + (["--amp"] if args.amp else []),
                "  peak memory of one step (fresh process per side, after a warm-up step):"))


if __name__ == "__main__":
    main()

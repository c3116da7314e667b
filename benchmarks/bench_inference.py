"""Inference speed of dabdetr vs transformers' DabDetrForObjectDetection, same weights.

Builds a DAB-DETR-R50 (DabDetrConfig() defaults, inverse_sigmoid eps 1e-5 as transformers has
it) with random, well-scaled weights, exports it to a temporary Hugging Face directory and loads
that in transformers. Then, per image size, batch 1: interleaved forward passes of
transformers, ours (plain) and ours after `dabdetr.optimize.optimize_for_inference` (on CUDA
also that model replayed as CUDA graphs, `--optimize cudagraph`); ms/img,
achieved GFLOP/s (FLOPs counted once with FlopCounterMode) against a 2048^2 matmul measured in
the same run, the max abs difference of logits and boxes, and peak memory per side measured in
fresh child processes. With `--authors-repo PATH` (a checkout of IDEA-Research/DAB-DETR) the
authors' own model runs as a further side ("authors"), with the same weights.

    python benchmarks/bench_inference.py                      # R50, 800x1088 and 640x640
    python benchmarks/bench_inference.py --dc5 --sizes 800x1088
    python benchmarks/bench_inference.py --device cuda          # + ours-cudagraph
    python benchmarks/bench_inference.py --device cuda --no-tf32  # convolutions in full fp32
    python benchmarks/bench_inference.py --authors-repo ../DAB-DETR  # + the authors' code
    python benchmarks/bench_inference.py --int8 --bf16        # + the inexact faster modes
    python benchmarks/bench_inference.py --tiny               # CI smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _authors  # noqa: E402
import _common  # noqa: E402

from dabdetr import DabDetrConfig  # noqa: E402

SIDES = ("transformers", "ours", "ours-optimized")
# our sides and the `--optimize` mode (dabdetr.optimize.optimized) each runs
OURS_MODES = {"ours": "none", "ours-optimized": "fused", "ours-int8": "int8", "ours-bf16": "bf16",
              "ours-cudagraph": "cudagraph"}


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like 800x1088") from None
    return h, w


def build_side(side: str, weights: Path, device: str, authors_repo: Path | None = None):
    """A callable (images, mask) -> (logits, boxes) for one side, loaded from `weights`."""
    if side == "authors":
        import dabdetr

        theirs, _ = _authors.build(authors_repo, dabdetr.load_model(weights), device)
        theirs.requires_grad_(False)

        def run(images, mask):
            out = theirs(_authors.nested(images, mask))
            return out["pred_logits"], out["pred_boxes"]

        return run
    if side == "transformers":
        model = _common.load_transformers(weights, device).requires_grad_(False)

        def run(images, mask):
            out = model(pixel_values=images, pixel_mask=(~mask).long())
            return out.logits, out.pred_boxes

        return run
    import dabdetr
    from dabdetr.optimize import optimized

    # no parameter needs a gradient here (FlopCounterMode also requires that in no_grad)
    model = optimized(dabdetr.load_model(weights, device=device).requires_grad_(False),
                      OURS_MODES[side])

    def run(images, mask):
        out = model(images, mask)
        return out.pred_logits, out.pred_boxes

    return run


def child_memory(args: argparse.Namespace) -> None:
    """Child process: load one side, one warm-up forward (and what it leaves resident), then the
    peak of one forward."""
    device = args.device
    before = _common.resident_mib(device)
    run = build_side(args.child_side, Path(args.child_weights), device, args.authors_repo)
    model_mib = _common.resident_mib(device) - before
    h, w = args.sizes[0]
    images = torch.randn(1, 3, h, w, device=device)
    mask = torch.zeros(1, h, w, dtype=torch.bool, device=device)
    with torch.inference_mode():
        run(images, mask)
        # what stays resident after a forward (caches, pages of a memory-mapped weights file)
        kept_mib = _common.resident_mib(device) - before - model_mib
        with _common.PeakMemory(device) as peak:
            run(images, mask)
    print(json.dumps({"model_mib": model_mib, "kept_mib": kept_mib, "peak_mib": peak.mib,
                      "exact": peak.exact}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: [parse_size(v) for v in s.split(",")],
                        default=None, help="comma-separated HxW (default 800x1088,640x640)")
    parser.add_argument("--dc5", action="store_true", help="DAB-DETR-R50-DC5 (dilated layer4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--int8", action="store_true",
                        help="also time ours with dynamic int8 Linear layers (CPU)")
    parser.add_argument("--bf16", action="store_true",
                        help="also time ours with `--optimize bf16` (fused bfloat16 convolutions, "
                             "transformer under bfloat16 autocast; CUDA, or a CPU with "
                             "AVX512-BF16/AMX)")
    _authors.add_argument(parser)
    _common.add_child_arguments(parser, tiny_size="128x160")
    args = parser.parse_args(argv)
    child_options = _common.apply_child_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sizes is None:
        args.sizes = [(128, 160)] if args.tiny else [(800, 1088), (640, 640)]
    if args.child_side:
        child_memory(args)
        return
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 2)
    reps = args.reps if args.reps is not None else (1 if args.tiny else 5)
    memory = args.memory if args.memory is not None else not args.tiny
    device = args.device

    config = (_common.tiny_config(dilation=args.dc5) if args.tiny
              else DabDetrConfig(dilation=args.dc5, inverse_sigmoid_eps=1e-5))
    name = ("tiny R18" if args.tiny else "DAB-DETR-R50") + ("-DC5" if args.dc5 else "")
    modes = ", ours-int8 dynamic int8 Linear" * args.int8 + ", ours-bf16 bfloat16" * args.bf16
    print(f"# {name} inference, batch 1, fp32{modes}, {device}")
    print(f"# {_common.machine_info(device)}")
    peak = _common.matmul_peak_gflops(device)
    print(f"# matmul peak (2048^2 fp32): {peak:.0f} GFLOP/s"
          + (" (bf16 can exceed it)" if args.bf16 else ""))
    sides = list(SIDES) + ["ours-int8"] * args.int8 + ["ours-bf16"] * args.bf16
    if device.startswith("cuda"):  # the fused model replayed as CUDA graphs (GPU only)
        sides.append("ours-cudagraph")
    if args.authors_repo is not None:
        sides.insert(1, "authors")

    with tempfile.TemporaryDirectory() as tmp:
        weights = _common.export_for_transformers(_common.random_model(config), Path(tmp) / "hf")
        runs = {side: build_side(side, weights, device, args.authors_repo) for side in sides}
        child_args = child_options + ([] if args.authors_repo is None
                                    else ["--authors-repo", str(args.authors_repo)])
        for h, w in args.sizes:
            bench_size(runs, weights, (h, w), device, warmup, reps, peak, memory, child_args)


def bench_size(runs: dict, weights: Path, size: tuple[int, int], device: str, warmup: int,
               reps: int, peak: float, memory: bool, child_args: list[str]) -> None:
    """Time, compare and (optionally) measure the memory of every side at one image size."""
    h, w = size
    sides = list(runs)
    torch.manual_seed(0)
    images = torch.randn(1, 3, h, w, device=device)
    mask = torch.zeros(1, h, w, dtype=torch.bool, device=device)
    with torch.no_grad():  # FlopCounterMode's module tracker fails in inference_mode
        flops = _common.count_flops(lambda: runs["ours"](images, mask))
    with torch.inference_mode():
        outputs = {side: run(images, mask) for side, run in runs.items()}
        times = _common.interleaved(
            {side: (lambda run=run: run(images, mask)) for side, run in runs.items()},
            warmup, reps, device)
    print(f"\n## {h}x{w}: {flops / 1e9:.1f} GFLOP per image, {reps} interleaved rounds")
    print(f"  {'side':<24} {'best ms':>9} {'median ms':>9} {'GFLOP/s':>9} {'of peak':>8}")
    for side in sides:
        print(_common.time_row(side, times[side], flops=flops, peak=peak))
    ref_logits, ref_boxes = outputs["transformers"]
    for side in sides[1:]:
        logits, boxes = outputs[side]
        print(f"  max abs diff {side} vs transformers: logits "
              f"{(logits - ref_logits).abs().max().item():.2e}, boxes "
              f"{(boxes - ref_boxes).abs().max().item():.2e}")
    for side in sides[1:]:
        print(_common.ratio_line(f"transformers/{side}", times["transformers"], times[side]))
    if "authors" in runs:
        for side in sides[2:]:
            print(_common.ratio_line(f"authors/{side}", times["authors"], times[side]))
    # how fast the (possibly shared) host was just after this size's rounds
    print(f"# matmul peak after these rounds: {_common.matmul_peak_gflops(device):.0f} GFLOP/s")
    if memory:
        print(_common.memory_report(
            __file__, sides, weights, device, ["--sizes", f"{h}x{w}", *child_args],
            "  peak memory of one forward (fresh process per side, after a warm-up):"))


if __name__ == "__main__":
    main()

"""Winograd 3x3 convolutions against the direct ones, per shape, as a CPU training step runs them.

For each shape (batch N, C channels in and out, S x S pixels): forward + input and weight
gradients of a stride-1 3x3 convolution with a folded frozen norm, computed directly
(`_FoldedConv2d`: oneDNN, or a GEMM for the weight gradient where the backbone takes one) and as
Winograd's F(2x2, 3x3) and F(4x4, 3x3) (`dabdetr.models.winograd`). The three alternate within
each round; prints ms per call, the speed-up over the direct convolution, the largest error of
each against float64 (relative to the largest value), and the block the backbone picks
(`winograd_tile`; 0: direct). Where the compiled transforms of
`dabdetr.models.winograd_native` apply (channels divisible by 16), F(m x m) uses them, and
"F(m x m) torch" runs the same with the transforms as torch ops, for their speed-up. The default
shapes are R50's trained stride-1 3x3 convolutions at batch 2, 512x512 (layer2-4), and layer1's
(frozen in the recipe).

    python benchmarks/bench_winograd.py
    python benchmarks/bench_winograd.py --shapes 1x256x50 2x512x32   # N x C x S
    python benchmarks/bench_winograd.py --tiny                        # CI smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from dabdetr.models import winograd_native  # noqa: E402
from dabdetr.models.backbone import _FoldedConv2d, _gemm_weight_grad_pays  # noqa: E402
from dabdetr.models.winograd import winograd_conv3x3, winograd_tile  # noqa: E402

DEFAULT_SHAPES = ("2x64x128", "2x128x64", "2x256x32", "2x512x16")


def _shape(text: str) -> tuple[int, int, int]:
    try:
        n, c, s = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not N x C x S, e.g. 2x256x32") from None
    if min(n, c, s) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} has a size below 1")
    return n, c, s


def _inputs(n: int, c: int, s: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, s, s, generator=gen, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    # the module only describes the convolution to the backbone's choices: no weights needed
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False, device="meta")
    weight = (torch.randn(c, c, 3, 3, generator=gen, dtype=dtype) / (9 * c) ** 0.5)
    weight.requires_grad_(True)
    scale = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    shift = torch.randn(c, generator=gen, dtype=dtype)
    grad = torch.randn(n, c, s, s, generator=gen, dtype=dtype)
    grad = grad.contiguous(memory_format=torch.channels_last)
    return conv, x, weight, scale, shift, grad


def _variants(conv, x, weight, scale, shift):
    """name -> f(x, weight) for each way of computing the convolution: direct, F(2x2) and F(4x4)
    (with the compiled transforms where they apply), and, where they do, F(m x m) with the
    transforms as torch ops ("... torch")."""
    gemm = _gemm_weight_grad_pays(conv, x)
    geometry = ((1, 1), (1, 1), (1, 1))
    variants = {
        "direct": lambda x, w: _FoldedConv2d.apply(x, w, scale, shift, *geometry, gemm),
        "F(2x2)": lambda x, w: winograd_conv3x3(x, w, scale, shift, 2),
        "F(4x4)": lambda x, w: winograd_conv3x3(x, w, scale, shift, 4),
    }
    if winograd_native.usable(x, weight) is not None:
        for m in (2, 4):
            def torch_transforms(x, w, m=m):
                with winograd_native.disabled():
                    return winograd_conv3x3(x, w, scale, shift, m)

            variants[f"F({m}x{m}) torch"] = torch_transforms
    return variants


def _errors(n: int, c: int, s: int) -> dict[str, float]:
    """Largest error of output and gradients against float64, relative to the largest value."""
    conv, x, weight, scale, shift, grad = _inputs(n, c, s, torch.float32)
    exact_inputs = [t.detach().double().requires_grad_(t.requires_grad)
                    for t in (x, weight, scale, shift, grad)]
    ex, ew, es, eb, eg = exact_inputs
    exact_out = torch.nn.functional.conv2d(ex, ew * es[:, None, None, None], eb, padding=1)
    exact = (exact_out, *torch.autograd.grad(exact_out, (ex, ew), eg))
    errors = {}
    for name, fn in _variants(conv, x, weight, scale, shift).items():
        out = fn(x, weight)
        got = (out, *torch.autograd.grad(out, (x, weight), grad))
        errors[name] = max(((g.double() - e).abs().max() / e.abs().max()).item()
                           for g, e in zip(got, exact, strict=True))
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=_shape, default=None,
                        help=f"N x C x S per shape (default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--tiny", action="store_true", help="smoke test: small shapes, 2 reps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = args.shapes or [_shape(s) for s in DEFAULT_SHAPES]
    if args.tiny:
        shapes, args.reps = [(2, 8, 12), (1, 16, 7)], 2
    print(f"# stride-1 3x3 convolution, forward + input and weight gradients, float32, "
          f"{args.threads} threads, {args.reps} rounds")
    print(f"# {_common.machine_info('cpu')}")
    for n, c, s in shapes:
        conv, x, weight, scale, shift, grad = _inputs(n, c, s, torch.float32)

        def step(fn, x=x, weight=weight, grad=grad):
            return lambda: torch.autograd.grad(fn(x, weight), (x, weight), grad)

        fns = {name: step(fn) for name, fn in _variants(conv, x, weight, scale, shift).items()}
        times = _common.interleaved(fns, warmup=1, reps=args.reps, device="cpu")
        errors = _errors(n, c, s)
        print(f"\n## N={n} C={c} {s}x{s}: the backbone picks "
              f"{winograd_tile(conv, x) or 'direct'}")
        print(f"  {'variant':<24} {'best ms':>9} {'median ms':>9}  error vs float64")
        for name, seconds in times.items():
            print(f"{_common.time_row(name, seconds)}  {errors[name]:.1e}")
        for name in ("F(2x2)", "F(4x4)"):
            print(_common.ratio_line(f"direct/{name}", times["direct"], times[name]))
        for name in ("F(2x2)", "F(4x4)"):
            if f"{name} torch" in times:
                print(_common.ratio_line(f"{name} torch/{name}", times[f"{name} torch"],
                                         times[name]))
    print(f"\n# matmul peak after these rounds: {_common.matmul_peak_gflops('cpu'):.0f} GFLOP/s")


if __name__ == "__main__":
    main()

"""HungarianMatcher time vs number of queries and targets, and its share of a training step.

For each (queries, targets) pair: random predictions [B, Q, 91] and B images with the given
number of targets each; the best and median time of one matcher call (cost matrix + scipy's
linear_sum_assignment per image). The share of a training step: the matcher runs once per
decoder layer (6 with auxiliary losses); its time is compared with a measured training step of
a model (R50 at 512x512 batch 2 by default, ResNet-18 with --tiny) or with --step-ms.

    python benchmarks/bench_matcher.py
    python benchmarks/bench_matcher.py --step-ms 2800      # share of a step timed elsewhere
    python benchmarks/bench_matcher.py --tiny
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from dabdetr import DabDetrConfig  # noqa: E402
from dabdetr.models.criterion import SetCriterion  # noqa: E402
from dabdetr.models.matcher import HungarianMatcher  # noqa: E402
from dabdetr.models.outputs import DetectionOutput  # noqa: E402


def random_case(batch: int, queries: int, targets: int, num_classes: int, device: str):
    gen = torch.Generator().manual_seed(queries * 1000 + targets)
    out = DetectionOutput(
        pred_logits=torch.randn(batch, queries, num_classes, generator=gen).to(device),
        pred_boxes=(torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.1).to(device),
    )
    tgts = [{"boxes": (torch.rand(targets, 4, generator=gen) * 0.5 + 0.1).to(device),
             "labels": torch.randint(0, num_classes, (targets,), generator=gen).to(device)}
            for _ in range(batch)]
    return out, tgts


def time_matcher(matcher: HungarianMatcher, case, reps: int, device: str) -> list[float]:
    out, tgts = case
    matcher(out, tgts)  # warm-up
    return [_common.timed(lambda: matcher(out, tgts), device) for _ in range(reps)]


class TimedMatcher(HungarianMatcher):
    """HungarianMatcher that adds the time of its calls to `seconds`."""

    def __init__(self, device: str):
        super().__init__()
        self.device = device
        self.seconds = 0.0

    def forward(self, outputs, targets):
        _common.sync(self.device)
        start = time.perf_counter()
        result = super().forward(outputs, targets)
        self.seconds += time.perf_counter() - start
        return result


def measure_step(tiny: bool, device: str, reps: int) -> tuple[float, float, int]:
    """(step seconds, matcher seconds within it, decoder layers) for one training step."""
    import bench_train

    config = _common.tiny_config() if tiny else DabDetrConfig()
    model = _common.random_model(config).to(device).train()
    size = (128, 128) if tiny else (512, 512)
    images, mask, targets = _common.make_batch(2, size, device)
    matcher = TimedMatcher(device)
    criterion = SetCriterion(config.num_classes, matcher=matcher)
    optimizer = bench_train.ours_optimizer(model)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion.weighted_total(criterion(model(images, mask), targets))
        loss.backward()
        optimizer.step()

    step()
    steps, matched = [], []
    for _ in range(reps):
        matcher.seconds = 0.0
        steps.append(_common.timed(step, device))
        matched.append(matcher.seconds)
    return statistics.median(steps), statistics.median(matched), config.dec_layers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", default=None, help="comma-separated (default 100,300,900)")
    parser.add_argument("--targets", default=None, help="comma-separated (default 5,20,50,100)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=91)
    parser.add_argument("--reps", type=int, default=None, help="timed calls (default 10)")
    parser.add_argument("--step-ms", type=float, default=None,
                        help="training step time to compare with (default: measure one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tiny", action="store_true", help="smoke test: few sizes, 1 rep")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    queries = [int(v) for v in (args.queries or ("20" if args.tiny else "100,300,900")).split(",")]
    targets = [int(v) for v in (args.targets or ("5" if args.tiny else "5,20,50,100")).split(",")]
    reps = args.reps or (1 if args.tiny else 10)
    device = args.device

    print(f"# HungarianMatcher, batch {args.batch}, {args.num_classes} classes, {device}")
    print(f"# {_common.machine_info(device)}")
    matcher = HungarianMatcher()
    print(f"  {'queries':>8} {'targets':>8} {'best ms':>9} {'median ms':>9}")
    per_call = {}
    for q in queries:
        for t in targets:
            times = time_matcher(matcher, random_case(args.batch, q, t, args.num_classes, device),
                                 reps, device)
            per_call[q, t] = statistics.median(times)
            print(f"  {q:8d} {t:8d} {min(times) * 1e3:9.2f} {per_call[q, t] * 1e3:9.2f}")

    if args.step_ms is not None:
        layers = 6
        step = args.step_ms / 1e3
        q, t = (300, 20) if (300, 20) in per_call else next(iter(per_call))
        in_step = layers * per_call[q, t]
        source = f"given step {args.step_ms:.0f} ms, {layers} x matcher({q} queries, {t} targets)"
    else:
        step, in_step, layers = measure_step(args.tiny, device, reps=1 if args.tiny else 3)
        source = (f"measured {'tiny R18' if args.tiny else 'R50 512x512'} batch-2 step "
                  f"{step * 1e3:.0f} ms, its {layers} matcher calls")
    print(f"\nmatcher share of a training step: {100 * in_step / step:.1f}% "
          f"({in_step * 1e3:.1f} ms; {source})")
    print(f"ratio step/matcher: {step / in_step:.0f}x")


if __name__ == "__main__":
    main()

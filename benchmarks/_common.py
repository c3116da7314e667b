"""Shared pieces of the benchmarks: same-weight model pairs, interleaved timing, memory, machine.

Timing on a shared machine is noisy, so every benchmark runs the compared sides alternately
within one process (A B, B A, A B, ...) and reports the best and the median time of each side
plus their ratios. Peak memory is measured per side in a fresh child process (CPU: resident set
growth during the measured call, from /proc; CUDA: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from dabdetr import DabDetr, DabDetrConfig


def add_child_arguments(parser, tiny_size: str) -> None:
    """Options every benchmark script shares: memory mode, the --tiny smoke test and the
    hidden arguments of the per-side child processes."""
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure peak memory in child processes (default: on, off with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"smoke test: ResNet-18, 2+2 layers, {tiny_size}, 1 rep")
    parser.add_argument("--no-tf32", action="store_true",
                        help="CUDA: every side's float32 convolutions in full float32 (torch's "
                             "default lets cuDNN run them in TF32; float32 matmuls are full "
                             "float32 by default either way)")
    parser.add_argument("--child-side", help=argparse.SUPPRESS)
    parser.add_argument("--child-weights", help=argparse.SUPPRESS)


def apply_child_options(args: argparse.Namespace) -> list[str]:
    """Apply the options of `add_child_arguments` that change how the sides run (TF32 off on
    CUDA); returns them as arguments for the child processes."""
    passed: list[str] = []
    if args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        passed.append("--no-tf32")
    return passed


def tiny_config(**overrides) -> DabDetrConfig:
    """The --tiny smoke-test model: ResNet-18, 2 encoder + 2 decoder layers, 20 queries."""
    values = dict(backbone="resnet18", enc_layers=2, dec_layers=2, dim_feedforward=256,
                  num_queries=20, inverse_sigmoid_eps=1e-5)
    values.update(overrides)
    return DabDetrConfig(**values)


def random_model(config: DabDetrConfig, seed: int = 0) -> DabDetr:
    """A DabDetr with random but well-scaled weights (see `well_scaled`), in eval mode."""
    torch.manual_seed(seed)
    return well_scaled(DabDetr(config))


def well_scaled(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (freshly initialized, with a dabdetr `Backbone` as `model.backbone`) with
    random but well-scaled weights, in eval mode; draws from torch's global generator.

    Every parameter is perturbed (so no zero-initialized layer hides a difference) and the frozen
    batch-norm statistics are calibrated on a random image, so activations stay O(1) as with
    pretrained weights (a random ResNet with identity statistics reaches values ~1e4, where
    float32 rounding alone moves the outputs by ~1e-4).
    """
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        norms = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.1)
        # Residual branches end in a small scale, as in trained ResNets; with unit scales a
        # random 50-layer ResNet amplifies float32 rounding ~100x.
        for block in model.backbone.modules():
            if isinstance(block, (Bottleneck, BasicBlock)):
                last_norm = block.bn3 if isinstance(block, Bottleneck) else block.bn2
                last_norm.weight.uniform_(0.1, 0.3)

        def calibrate(module: FrozenBatchNorm2d, args: tuple) -> None:
            x = args[0]
            module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            module.running_var.copy_(x.var(dim=(0, 2, 3)))

        hooks = [n.register_forward_pre_hook(calibrate) for n in norms]
        model.backbone.body(torch.randn(1, 3, 256, 256))
        for h in hooks:
            h.remove()
    return model.eval()


def make_batch(batch: int, size: tuple[int, int], device: str, seed: int = 0):
    """Images [B, 3, H, W], mask [B, H, W] (no padding) and B target dicts with normalized
    cxcywh `boxes` and `labels` in 1..90 (COCO category ids)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    images = torch.randn(batch, 3, h, w, generator=gen).to(device)
    mask = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    targets = []
    for i in range(batch):
        n = 3 + 4 * i
        centers = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        boxes = torch.cat([centers, sizes], dim=1).to(device)
        labels = torch.randint(1, 91, (n,), generator=gen).to(device)
        targets.append({"boxes": boxes, "labels": labels})
    return images, mask, targets


def export_for_transformers(model: DabDetr, directory: Path) -> Path:
    """Write `model` as a transformers DabDetrForObjectDetection directory."""
    import dabdetr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the inverse_sigmoid eps note (we use 1e-5 already)
        dabdetr.export_huggingface(model, directory)
    return directory


def load_transformers(directory: Path, device: str):
    """transformers' DabDetrForObjectDetection from an exported directory, eval mode."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.DabDetrForObjectDetection.from_pretrained(directory).to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, reps: int,
                device: str) -> dict[str, list[float]]:
    """Seconds per call of each function; rounds alternate the order (forward, backward)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name], device))
    return times


def ratio_line(label: str, slow: list[float], fast: list[float]) -> str:
    """'ratio A/B: x (best), y (median), z (paired)': how many times faster `fast` is than
    `slow`. `paired` is the median over rounds of the ratio within each round (from
    `interleaved`, where both ran back to back), which cancels slow drifts of the host's speed
    that shift the two medians differently. The lowest and highest per-round ratios follow, a
    measure of how much the host's noise moves a single round."""
    best = min(slow) / min(fast)
    median = statistics.median(slow) / statistics.median(fast)
    line = f"ratio {label}: {best:.2f}x (best), {median:.2f}x (median)"
    if len(slow) == len(fast) > 1:
        rounds = [s / f for s, f in zip(slow, fast, strict=True)]
        line += (f", {statistics.median(rounds):.2f}x (paired; rounds "
                 f"{min(rounds):.2f}x-{max(rounds):.2f}x)")
    return line


def time_row(name: str, seconds: list[float], per: int = 1, flops: float | None = None,
             peak: float | None = None) -> str:
    best, med = min(seconds) / per * 1e3, statistics.median(seconds) / per * 1e3
    row = f"  {name:<24} {best:9.1f} {med:9.1f}"
    if flops is not None:
        gflops = flops / min(seconds) / 1e9
        row += f" {gflops:9.1f}"
        if peak:
            row += f" {100 * gflops / peak:7.0f}%"
    return row


def matmul_peak_gflops(device: str, n: int = 2048, reps: int = 5) -> float:
    """Best achieved GFLOP/s of an n x n float32 matmul (2 n^3 FLOP)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), device) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call, as torch.utils.flop_counter counts them (2 per multiply-add; it does
    not see oneDNN's fused convolutions, so count on the plain model)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def machine_info(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads)"]
    try:  # the version without importing transformers (seconds of start-up)
        parts.append(f"transformers {importlib.metadata.version('transformers')}")
    except importlib.metadata.PackageNotFoundError:
        pass
    if device.startswith("cuda"):
        parts.append(torch.cuda.get_device_name(device))
        parts.append(f"TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, "
                     f"matmuls {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    return ", ".join(parts)


# ---- memory ------------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed_memory() -> None:
    """Hand memory freed inside malloc back to the OS (glibc), so RSS counts live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory growth of a block of code, in MiB.

    CUDA: torch.cuda.max_memory_allocated above the allocation at entry. CPU: the process's
    peak resident set (VmHWM, reset through /proc/self/clear_refs where the kernel allows it)
    above the resident set at entry; without the reset, ru_maxrss is used, which can only
    under-report the growth if an earlier phase peaked higher (`exact` is then False).
    """

    def __init__(self, device: str):
        self.device = device
        self.exact = True
        self.mib = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        _release_freed_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            self.exact = False
        self.start = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.exact and (hwm := _status_kb("VmHWM")) is not None:
            peak = hwm * 1024
        else:
            self.exact = False
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mib = (peak - self.start) / 2**20


def resident_mib(device: str) -> float:
    """Memory in use now: CUDA allocated bytes, or the CPU resident set."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    _release_freed_memory()
    return (_status_kb("VmRSS") or 0) / 1024


def run_child(script: str, args: list[str], threads: int) -> dict:
    """Run `script` with `args` in a fresh interpreter; it prints one JSON line last."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_report(script: str, sides, weights, device: str, args: list[str],
                  title: str) -> str:
    """Run `script` once per side in a fresh child process (`--child-side SIDE
    --child-weights W --device D --threads T` plus `args`) and format the peak memories."""
    import torch

    threads = torch.get_num_threads()
    results = {
        side: run_child(script, ["--child-side", side, "--child-weights", str(weights),
                                 "--device", device, "--threads", str(threads), *args], threads)
        for side in sides
    }
    return "\n".join([title, *memory_lines(results)])


def memory_lines(results: dict[str, dict]) -> list[str]:
    """Format child results {side: {"model_mib", "peak_mib", "exact"}, optionally "kept_mib"
    (resident growth left by the warm-up round)}."""
    kept = all("kept_mib" in r for r in results.values())
    lines = [f"  {'side':<24} {'model MiB':>10}" + (f" {'kept MiB':>9}" if kept else "")
             + f" {'peak growth MiB':>16}"]
    for side, r in results.items():
        note = "" if r.get("exact", True) else "  (lower bound: peak RSS reset unavailable)"
        lines.append(f"  {side:<24} {r['model_mib']:10.0f}"
                     + (f" {r['kept_mib']:9.0f}" if kept else "")
                     + f" {r['peak_mib']:16.0f}{note}")
    if kept:
        lines.append("  (kept: resident growth left by the warm-up round)")
    return lines

"""DAB-Deformable-DETR inference: our deformable attention against the authors' PyTorch core.

The same model (random weights, the `dab-deformable-detr-r50` preset) runs twice per round on
one input, once with dabdetr's `ms_deform_attn` and once with the authors' pure-PyTorch
`ms_deform_attn_core_pytorch` (their CUDA kernel's reference) in its place; everything else is
shared, so the ratio is what the attention core changes end to end. Rounds alternate the order
and the paired ratio is reported (see _common.ratio_line).

    python benchmarks/bench_deformable.py --authors-repo ~/DAB-DETR            # 800x1088, R50
    python benchmarks/bench_deformable.py --tiny                              # seconds, ours only

`--authors-repo` is a checkout the user made (git clone https://github.com/IDEA-Research/DAB-DETR);
only the one file holding their core is loaded from it (its compiled-extension import gets an
empty stand-in module: the PyTorch core does not use it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from dabdetr.models import deformable_attention
from dabdetr.models.dab_deformable_detr import DabDeformableDetr
from dabdetr.presets import preset_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine_info, ratio_line, time_row  # noqa: E402

CORE_FILE = Path("models/dab_deformable_detr/ops/functions/ms_deform_attn_func.py")
TINY = {"backbone": "resnet18", "hidden_dim": 64, "nheads": 4, "enc_layers": 1,
        "dec_layers": 2, "dim_feedforward": 128, "num_queries": 10}


def authors_core(repo: Path) -> Callable:
    """`ms_deform_attn_core_pytorch` from a DAB-DETR checkout, loaded from its file alone."""
    path = repo.expanduser().resolve() / CORE_FILE
    if not path.is_file():
        raise SystemExit(f"{repo} has no {CORE_FILE}; expected a checkout of "
                         "https://github.com/IDEA-Research/DAB-DETR")
    if importlib.util.find_spec("MultiScaleDeformableAttention") is None:
        sys.modules["MultiScaleDeformableAttention"] = types.ModuleType(
            "MultiScaleDeformableAttention")
    spec = importlib.util.spec_from_file_location("authors_ms_deform_attn_func", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ms_deform_attn_core_pytorch


@contextlib.contextmanager
def core_replaced(core: Callable) -> Iterator[None]:
    """Our model's attention core swapped for the authors' (signature without level starts)."""
    ours = deformable_attention.ms_deform_attn
    deformable_attention.ms_deform_attn = (
        lambda value, shapes, starts, locations, weights: core(value, shapes, locations, weights))
    try:
        yield
    finally:
        deformable_attention.ms_deform_attn = ours


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--authors-repo", type=Path, default=None, metavar="PATH")
    p.add_argument("--size", default="800x1088", help="input HxW")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a tiny model at 128x160 (smoke test)")
    args = p.parse_args(argv)
    h, w = (128, 160) if args.tiny else map(int, args.size.lower().split("x"))
    config = preset_config("dab-deformable-detr-r50", **(TINY if args.tiny else {}))
    torch.manual_seed(0)
    model = DabDeformableDetr(config).eval()
    images = torch.randn(1, 3, h, w)

    def ours() -> object:
        with torch.no_grad():
            return model(images)

    sides: dict[str, Callable[[], object]] = {"ours": ours}
    if args.authors_repo is not None:
        core = authors_core(args.authors_repo)

        def theirs() -> object:
            with core_replaced(core):
                return ours()

        diff = (ours().pred_boxes - theirs().pred_boxes).abs().max().item()
        print(f"max |boxes ours - boxes with the authors' core|: {diff:.2e}")
        sides["authors' core"] = theirs
    print(machine_info("cpu"))
    print(f"DAB-Deformable-DETR {config.backbone}, {config.enc_layers}+{config.dec_layers} "
          f"layers, {config.num_queries} queries, inference at {h}x{w}, batch 1")
    times = interleaved(sides, args.warmup, args.reps, "cpu")
    print(f"  {'side':<24} {'best ms':>9} {'median ms':>9}")
    for name, seconds in times.items():
        print(time_row(name, seconds))
    if len(times) == 2:
        print(ratio_line("authors' core / ours", times["authors' core"], times["ours"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A fixed-list mutation check: does the test suite notice small bugs in the model, the matcher,
the criterion and the training loop?

Each mutant is (file under src/dabdetr, original snippet, replacement, why). The snippet must
occur exactly once in its file, so a mutant stays the same bug under unrelated edits and fails
loudly ("stale") when its code changes. For each mutant the script copies src/ to a temporary
directory, applies the one change there (the working tree is never edited), and runs only the
test files relevant to that source file with `pytest -x` and a timeout. A mutant is killed when
pytest fails; it survives when the tests pass.

    python tools/mutation.py                 # every mutant
    python tools/mutation.py --list          # the mutants and their test files
    python tools/mutation.py --only ema lr   # mutants whose name contains ema or lr
    python tools/mutation.py --only "EMA decay" -k ema   # and only the tests matching -k
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Test files run for a mutant of each source file, fastest-to-fail first (pytest -x stops at the
# first failure).
TESTS = {
    "models/transformer.py": ["test_model.py", "test_model_parity.py"],
    "models/position_encoding.py": ["test_model.py", "test_model_parity.py"],
    "models/dab_detr.py": ["test_two_stage.py", "test_model.py", "test_model_parity.py"],
    "models/denoising.py": ["test_denoising.py"],
    "models/matcher.py": ["test_criterion.py"],
    "models/criterion.py": ["test_criterion.py", "test_denoising.py", "test_two_stage.py"],
    "engine/train.py": ["test_training_values.py", "test_train.py"],
}


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str


M = Mutant
MUTANTS = [
    # --- models/transformer.py
    M("inverse_sigmoid default eps", "models/transformer.py",
      "def inverse_sigmoid(x: Tensor, eps: float = 1e-3)",
      "def inverse_sigmoid(x: Tensor, eps: float = 1e-5)"),
    M("inverse_sigmoid numerator unclamped", "models/transformer.py",
      "torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))",
      "torch.log(x / (1 - x).clamp(min=eps))"),
    M("modulated attention h/w swapped", "models/transformer.py",
      "scale_y = (ref_hw[..., 1] / reference[..., 3])",
      "scale_y = (ref_hw[..., 1] / reference[..., 2])"),
    M("modulation y by w_ref", "models/transformer.py",
      "scale_y = (ref_hw[..., 1] /", "scale_y = (ref_hw[..., 0] /"),
    M("decoder refinement drops the reference", "models/transformer.py",
      "new_reference = self._as_anchor((delta + inv_ref).sigmoid())",
      "new_reference = self._as_anchor(delta.sigmoid())"),
    M("query scale on the first layer", "models/transformer.py",
      "        elif layer_id == 0:\n            query_sine = sine[..., :d]\n",
      "        elif layer_id == -1:\n            query_sine = sine[..., :d]\n"),
    M("encoder pos not scaled", "models/transformer.py",
      "output = layer(output, pos * self.query_scale(output), mask)",
      "output = layer(output, pos, mask)"),
    M("decoder self-attention without query pos", "models/transformer.py",
      "q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)",
      "q = self.sa_qcontent_proj(tgt)"),
    M("cross-attention keeps query pos on every layer", "models/transformer.py",
      "if is_first or self.keep_query_pos:", "if True:"),
    M("decoder residual dropped", "models/transformer.py",
      "tgt = self.norm2(tgt + self.dropout(ca))", "tgt = self.norm2(self.dropout(ca))"),
    M("encoder FFN residual dropped", "models/transformer.py",
      "return self.norm2(src + self.dropout(ffn))", "return self.norm2(self.dropout(ffn))"),
    # --- models/position_encoding.py
    M("image PE temperatures swapped", "models/position_encoding.py",
      "pos_y = _sine(y_embed, self.num_feats, self.temperature_h)\n"
      "        pos_x = _sine(x_embed, self.num_feats, self.temperature_w)",
      "pos_y = _sine(y_embed, self.num_feats, self.temperature_w)\n"
      "        pos_x = _sine(x_embed, self.num_feats, self.temperature_h)"),
    M("image PE y/x order", "models/position_encoding.py",
      "torch.cat((pos_y, pos_x), dim=3)", "torch.cat((pos_x, pos_y), dim=3)"),
    M("image PE normalizer", "models/position_encoding.py",
      "y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale",
      "y_embed = y_embed / (y_embed[:, -1:, :] + eps)"),
    M("sine frequency exponent", "models/position_encoding.py",
      "2 * torch.div(dim_t, 2, rounding_mode=\"floor\") / num_feats",
      "torch.div(dim_t, 2, rounding_mode=\"floor\") / num_feats"),
    M("anchor sine x/y order", "models/position_encoding.py",
      "parts = [_sine(y, feats, temperature), _sine(x, feats, temperature)]",
      "parts = [_sine(x, feats, temperature), _sine(y, feats, temperature)]"),
    # --- models/dab_detr.py
    M("two-stage fill anchors not centred", "models/dab_detr.py",
      "        default[:2] = 0.5\n", ""),
    M("two-stage proposals off-centre", "models/dab_detr.py",
      "ys = torch.arange(height, device=mask.device, dtype=torch.float32) + 0.5",
      "ys = torch.arange(height, device=mask.device, dtype=torch.float32)"),
    M("two-stage selects the worst cells", "models/dab_detr.py",
      "top = scores.topk(k, dim=1).indices", "top = (-scores).topk(k, dim=1).indices"),
    M("two-stage padded cells selectable", "models/dab_detr.py",
      "anchors = torch.where(chosen_invalid, default, anchors)", "anchors = anchors"),
    M("model PE temperatures swapped", "models/dab_detr.py",
      "d, config.pe_temperature_h, config.pe_temperature_w",
      "d, config.pe_temperature_w, config.pe_temperature_h"),
    M("heads ignore the configured eps", "models/dab_detr.py",
      "inv_ref = inverse_sigmoid(references, self.config.inverse_sigmoid_eps)",
      "inv_ref = inverse_sigmoid(references)"),
    M("heads drop the reference", "models/dab_detr.py",
      "boxes = (deltas + inv_ref).sigmoid()", "boxes = deltas.sigmoid()"),
    M("denoising split off by one", "models/dab_detr.py",
      "out = self.heads(hs[:, :, split:], references[:, :, split:])",
      "out = self.heads(hs[:, :, split - 1:-1], references[:, :, split - 1:-1])"),
    # --- models/denoising.py
    M("denoising groups see each other", "models/denoising.py",
      "        allowed[block, block] = True\n", "        allowed[block, :total] = True\n"),
    M("matching sees denoising", "models/denoising.py",
      "allowed[total:, total:] = True", "allowed[total:, :] = True"),
    M("box noise on the centre only by w", "models/denoising.py",
      "torch.cat([wh / 2, wh], dim=-1)", "torch.cat([wh, wh], dim=-1)"),
    M("denoising target index", "models/denoising.py",
      "target_index[b, slots] = torch.arange(n, device=device).repeat(groups)",
      "target_index[b, slots] = torch.arange(n, device=device).flip(0).repeat(groups)"),
    # --- models/matcher.py
    M("matcher focal alpha", "models/matcher.py",
      "focal_alpha: float = 0.25,", "focal_alpha: float = 0.5,"),
    M("matcher focal gamma", "models/matcher.py",
      "focal_gamma: float = 2.0,", "focal_gamma: float = 1.0,"),
    M("matcher alpha on the wrong term", "models/matcher.py",
      "pos = alpha * (1 - prob) ** gamma", "pos = (1 - alpha) * (1 - prob) ** gamma"),
    M("matcher class cost sign", "models/matcher.py",
      "class_cost = pos[:, tgt_labels] - neg[:, tgt_labels]",
      "class_cost = neg[:, tgt_labels] - pos[:, tgt_labels]"),
    M("matcher L1 as L2", "models/matcher.py",
      "torch.cdist(pred_boxes, tgt_boxes, p=1)", "torch.cdist(pred_boxes, tgt_boxes, p=2)"),
    M("matcher GIoU sign", "models/matcher.py",
      "giou_cost = -generalized_box_iou(", "giou_cost = generalized_box_iou("),
    # --- models/criterion.py
    M("denoising losses not divided by groups", "models/criterion.py",
      "norm = num_boxes * meta[\"groups\"]", "norm = num_boxes"),
    M("focal loss times num_queries dropped", "models/criterion.py",
      "loss_ce = focal.mean(1).sum() / num_boxes * num_queries",
      "loss_ce = focal.mean(1).sum() / num_boxes"),
    M("L1 loss not normalized", "models/criterion.py",
      "loss_bbox = (matched - tgt_boxes).abs().sum() / num_boxes",
      "loss_bbox = (matched - tgt_boxes).abs().sum()"),
    M("encoder losses ignore repeat", "models/criterion.py",
      "self.layer_losses(enc, enc_targets, indices, num_boxes * k)",
      "self.layer_losses(enc, enc_targets, indices, num_boxes)"),
    M("num_boxes clamp", "models/criterion.py",
      "return max(distributed.all_reduce_mean(total).item(), 1.0)",
      "return max(distributed.all_reduce_mean(total).item(), 2.0)"),
    # --- engine/train.py
    M("EMA decay inverted", "engine/train.py",
      "get_ema_multi_avg_fn(cfg.ema_decay)", "get_ema_multi_avg_fn(1 - cfg.ema_decay)"),
    M("epoch lr_drop ignored", "engine/train.py",
      "drops = [e * self.steps_per_epoch for e in cfg.lr_drop]", "drops = []"),
    M("lr drop one epoch late", "engine/train.py",
      "drops = [e * self.steps_per_epoch for e in cfg.lr_drop]",
      "drops = [(e + 1) * self.steps_per_epoch for e in cfg.lr_drop]"),
    M("gradient clipping off", "engine/train.py",
      "self.model.parameters(), cfg.clip_max_norm))",
      "self.model.parameters(), float(\"inf\")))"),
    M("warm-up factor", "engine/train.py",
      "factor *= 0.001 + 0.999 * step / self.warmup_steps", "factor *= 1.0"),
    M("EMA not updated", "engine/train.py",
      "            self.ema.update_parameters(self.model)\n",
      "            pass\n"),
    M("accumulated loss not averaged", "engine/train.py",
      "self.scaler.scale(loss / len(batches)).backward()",
      "self.scaler.scale(loss).backward()"),
    M("gradients not zeroed", "engine/train.py",
      "        self.optimizer.zero_grad(set_to_none=True)", "        pass"),
]


def apply(mutant: Mutant, src: Path) -> None:
    path = src / "dabdetr" / mutant.file
    text = path.read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise ValueError(f"stale mutant {mutant.name!r}: its snippet occurs {count} times in "
                         f"{mutant.file}; update the snippet in tools/mutation.py")
    path.write_text(text.replace(mutant.original, mutant.replacement))


def run(mutant: Mutant, timeout: float, python: str, select: str | None = None
        ) -> tuple[str, float]:
    """'killed' (a test failed), 'survived' (the tests passed) or 'timeout' (counted as
    killed), and the seconds it took. Any other pytest exit (collection error, no test
    selected) is an error of the check itself, not a kill."""
    tests = [str(ROOT / "tests" / t) for t in TESTS[mutant.file]]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
        apply(mutant, src)
        env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
        env.pop("CI", None)
        cmd = [python, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
               *(["-k", select] if select else []), *tests]
        start = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.time() - start
        seconds = time.time() - start
        if proc.returncode not in (0, 1):  # 2-5: interrupted, internal, usage, no tests
            tail = proc.stdout.decode(errors="replace")[-2000:]
            raise RuntimeError(f"pytest exited {proc.returncode} for {mutant.name!r}:\n{tail}")
        return ("survived" if proc.returncode == 0 else "killed"), seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="run mutants whose name contains any of these")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    p.add_argument("-k", dest="select", help="pytest -k expression: run only these tests")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = p.parse_args()
    chosen = [m for m in MUTANTS
              if not args.only or any(o.lower() in m.name.lower() for o in args.only)]
    for m in chosen:  # every snippet must still match before anything runs
        apply_check = (ROOT / "src" / "dabdetr" / m.file).read_text().count(m.original)
        if apply_check != 1:
            print(f"stale mutant {m.name!r}: snippet occurs {apply_check} times in {m.file}")
            return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:45s} {m.file:28s} {' '.join(TESTS[m.file])}")
        return 0
    survivors = []
    for i, m in enumerate(chosen, 1):
        outcome, seconds = run(m, args.timeout, sys.executable, args.select)
        print(f"[{i}/{len(chosen)}] {outcome:8s} {seconds:6.0f}s  {m.name} ({m.file})",
              flush=True)
        if outcome == "survived":
            survivors.append(m)
    killed = len(chosen) - len(survivors)
    print(f"\nkilled {killed}/{len(chosen)}")
    for m in survivors:
        print(f"survived: {m.name} ({m.file}): {m.original!r} -> {m.replacement!r}")
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())

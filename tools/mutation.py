"""A fixed-list mutation check: does the test suite notice small bugs in the model, the matcher,
the criterion and the training loop?

Each mutant is (file under src/dabdetr, original snippet, replacement, test selection). The
snippet must occur exactly once in its file, so a mutant stays the same bug under unrelated edits
and fails loudly ("stale") when its code changes. First every test the chosen mutants will run
is run once on the unmutated source (a test failing there would count as a kill). Then, for each
mutant, the script copies src/ to a temporary directory, applies the one change there (the
working tree is never edited), and runs the test files mapped to that source file (TESTS),
narrowed by the mutant's pytest -k expression, with `pytest -x -m "not slow"` and a timeout. A
mutant is killed when pytest fails; it survives when the tests pass.

    python tools/mutation.py                 # every mutant
    python tools/mutation.py --list          # the mutants and the tests each runs
    python tools/mutation.py --only ema lr   # mutants whose name contains ema or lr
    python tools/mutation.py --file engine/  # mutants of the files under engine/
    python tools/mutation.py --only "EMA decay" -k ema   # tests matching -k instead of its own
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
# first failure). A mutant may narrow them with a pytest -k expression (`select`); pytest also
# matches -k against the module name, so "test_two_stage" selects that whole file.
TESTS = {
    "models/box_ops.py": ["test_model.py", "test_model_parity.py", "test_criterion.py"],
    "models/transformer.py": ["test_model.py", "test_model_parity.py"],
    "models/position_encoding.py": ["test_model.py", "test_model_parity.py"],
    "models/dab_detr.py": ["test_two_stage.py", "test_denoising.py", "test_model.py",
                           "test_model_parity.py"],
    "models/denoising.py": ["test_denoising.py"],
    "models/matcher.py": ["test_criterion.py"],
    "models/criterion.py": ["test_criterion.py", "test_denoising.py", "test_two_stage.py"],
    "engine/trainer.py": ["test_training_values.py", "test_train.py", "test_resume.py"],
    "engine/schedule.py": ["test_train.py", "test_training_values.py"],
    "engine/checkpoint.py": ["test_train.py", "test_resume.py"],
    "engine/sampling.py": ["test_train.py", "test_resume.py"],
}

# the model's numeric oracles: the authors' golden outputs and transformers' DAB-DETR
PARITY = "golden_outputs or transformers_to_ours"
# the resume tests: one process without workers, and with workers/dropout/denoising/EMA/bf16
RESUME = "resume_continues_exactly or resume_is_exact_with_workers"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    select: str | None = None  # pytest -k expression over TESTS[file]; None: every test there


M = Mutant
MUTANTS = [
    # --- models/box_ops.py
    M("inverse_sigmoid default eps", "models/box_ops.py",
      "def inverse_sigmoid(x: Tensor, eps: float = 1e-3)",
      "def inverse_sigmoid(x: Tensor, eps: float = 1e-5)", "inverse_sigmoid"),
    M("inverse_sigmoid numerator unclamped", "models/box_ops.py",
      "torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))",
      "torch.log(x / (1 - x).clamp(min=eps))", "inverse_sigmoid"),
    # --- models/transformer.py
    M("modulated attention h/w swapped", "models/transformer.py",
      "scale_y = (ref_hw[..., 1] / reference[..., 3])",
      "scale_y = (ref_hw[..., 1] / reference[..., 2])", PARITY),
    M("modulation y by w_ref", "models/transformer.py",
      "scale_y = (ref_hw[..., 1] /", "scale_y = (ref_hw[..., 0] /", PARITY),
    M("decoder refinement drops the reference", "models/transformer.py",
      "new_reference = self._as_anchor((delta + inv_ref).sigmoid())",
      "new_reference = self._as_anchor(delta.sigmoid())", PARITY),
    M("query scale on the first layer", "models/transformer.py",
      "        elif layer_id == 0:\n            query_sine = sine[..., :d]\n",
      "        elif layer_id == -1:\n            query_sine = sine[..., :d]\n", PARITY),
    M("encoder pos not scaled", "models/transformer.py",
      "output = layer(output, pos * self.query_scale(output), mask)",
      "output = layer(output, pos, mask)", PARITY),
    M("decoder self-attention without query pos", "models/transformer.py",
      "q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)",
      "q = self.sa_qcontent_proj(tgt)", PARITY),
    M("cross-attention keeps query pos on every layer", "models/transformer.py",
      "if is_first or self.keep_query_pos:", "if True:", PARITY),
    M("decoder residual dropped", "models/transformer.py",
      "tgt = self.norm2(tgt + self.dropout(ca))", "tgt = self.norm2(self.dropout(ca))", PARITY),
    M("encoder FFN residual dropped", "models/transformer.py",
      "return self.norm2(src + self.dropout(ffn))", "return self.norm2(self.dropout(ffn))",
      PARITY),
    # --- models/position_encoding.py
    M("image PE temperatures swapped", "models/position_encoding.py",
      "pos_y = _sine(y_embed, self.num_feats, self.temperature_h)\n"
      "        pos_x = _sine(x_embed, self.num_feats, self.temperature_w)",
      "pos_y = _sine(y_embed, self.num_feats, self.temperature_w)\n"
      "        pos_x = _sine(x_embed, self.num_feats, self.temperature_h)",
      "height_and_width_temperatures or " + PARITY),
    M("image PE y/x order", "models/position_encoding.py",
      "self.temperature_w)\n        return torch.cat((pos_y, pos_x), dim=3)",
      "self.temperature_w)\n        return torch.cat((pos_x, pos_y), dim=3)", PARITY),
    M("image PE normalizer", "models/position_encoding.py",
      "y_embed = (y_embed - offset) / (y_embed[:, -1:, :] + eps) * scale",
      "y_embed = (y_embed - offset) / (y_embed[:, -1:, :] + eps)", PARITY),
    M("sine frequency exponent", "models/position_encoding.py",
      "2 * torch.div(dim_t, 2, rounding_mode=\"floor\") / num_feats",
      "torch.div(dim_t, 2, rounding_mode=\"floor\") / num_feats", PARITY),
    M("anchor sine x/y order", "models/position_encoding.py",
      "parts = [_sine(y, feats, temperature), _sine(x, feats, temperature)]",
      "parts = [_sine(x, feats, temperature), _sine(y, feats, temperature)]", PARITY),
    # --- models/dab_detr.py
    M("two-stage fill anchors not centred", "models/dab_detr.py",
      "        default[:2] = 0.5\n", "", "test_two_stage"),
    M("two-stage proposals off-centre", "models/dab_detr.py",
      "ys = torch.arange(height, device=mask.device, dtype=torch.float32) + 0.5",
      "ys = torch.arange(height, device=mask.device, dtype=torch.float32)", "test_two_stage"),
    M("two-stage selects the worst cells", "models/dab_detr.py",
      "top = scores.topk(k, dim=1).indices", "top = (-scores).topk(k, dim=1).indices",
      "test_two_stage"),
    M("two-stage padded cells selectable", "models/dab_detr.py",
      "anchors = torch.where(chosen_invalid, default, anchors)", "anchors = anchors",
      "test_two_stage"),
    M("model PE temperatures swapped", "models/dab_detr.py",
      "d, config.pe_temperature_h, config.pe_temperature_w",
      "d, config.pe_temperature_w, config.pe_temperature_h",
      "height_and_width_temperatures or " + PARITY),
    M("heads ignore the configured eps", "models/dab_detr.py",
      "inv_ref = inverse_sigmoid(references, self.config.inverse_sigmoid_eps)",
      "inv_ref = inverse_sigmoid(references)", "inverse_sigmoid_eps or " + PARITY),
    M("heads drop the reference", "models/dab_detr.py",
      "boxes = (deltas + inv_ref).sigmoid()", "boxes = deltas.sigmoid()", PARITY),
    M("denoising split off by one", "models/dab_detr.py",
      "out = self.heads(hs[:, :, split:], references[:, :, split:])",
      "out = self.heads(hs[:, :, split - 1:-1], references[:, :, split - 1:-1])",
      "test_denoising"),
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
      "norm = num_boxes * meta[\"groups\"]", "norm = num_boxes", "test_denoising"),
    M("focal loss times num_queries dropped", "models/criterion.py",
      "loss_ce = focal.mean(1).sum() / num_boxes * num_queries",
      "loss_ce = focal.mean(1).sum() / num_boxes", "test_criterion"),
    M("L1 loss not normalized", "models/criterion.py",
      "loss_bbox = (matched - tgt_boxes).abs().sum() / num_boxes",
      "loss_bbox = (matched - tgt_boxes).abs().sum()", "test_criterion"),
    M("encoder losses ignore repeat", "models/criterion.py",
      "self.layer_losses(enc, enc_targets, indices, num_boxes * k)",
      "self.layer_losses(enc, enc_targets, indices, num_boxes)", "test_two_stage"),
    M("num_boxes clamp", "models/criterion.py",
      "return max(distributed.all_reduce_mean(total).item(), 1.0)",
      "return max(distributed.all_reduce_mean(total).item(), 2.0)", "test_criterion"),
    # --- engine/trainer.py
    M("EMA decay inverted", "engine/trainer.py",
      "get_ema_multi_avg_fn(cfg.ema_decay)", "get_ema_multi_avg_fn(1 - cfg.ema_decay)",
      "ema_is_the_exponential"),
    M("epoch lr_drop ignored", "engine/trainer.py",
      "drops = [e * self.steps_per_epoch for e in cfg.lr_drop]", "drops = []",
      "epoch_lr_drop"),
    M("lr drop one epoch late", "engine/trainer.py",
      "drops = [e * self.steps_per_epoch for e in cfg.lr_drop]",
      "drops = [(e + 1) * self.steps_per_epoch for e in cfg.lr_drop]", "epoch_lr_drop"),
    M("gradient clipping off", "engine/trainer.py",
      "self.model.parameters(), cfg.clip_max_norm))",
      "self.model.parameters(), float(\"inf\")))", "clipped_to_clip_max_norm"),
    M("EMA not updated", "engine/trainer.py",
      "            self.ema.update_parameters(self.model)\n",
      "            pass\n", "ema_is_the_exponential or options_ema_accumulate"),
    M("accumulated loss not averaged", "engine/trainer.py",
      "self.scaler.scale(loss / len(batches)).backward()",
      "self.scaler.scale(loss).backward()",
      "accumulated_micro_batches or options_ema_accumulate or " + RESUME),
    M("gradients not zeroed", "engine/trainer.py",
      "        self.optimizer.zero_grad(set_to_none=True)", "        pass",
      "ema_is_the_exponential or " + RESUME),
    M("loader generator state not saved", "engine/trainer.py",
      "rng_state(self.device, {\"train_loader\": loader_state})", "rng_state(self.device)",
      "resume_is_exact_with_workers"),
    M("loader generator not restored on resume", "engine/trainer.py",
      "            self.loader_generator.set_state(generators[\"train_loader\"])\n",
      "            pass\n", "resume_is_exact_with_workers"),
    M("mid-epoch checkpoint saves the drawn loader state", "engine/trainer.py",
      "loader_state = (self.loader_generator.get_state() if self.batch_in_epoch == 0\n"
      "                        else self.loader_epoch_state)",
      "loader_state = self.loader_generator.get_state()", "resume_is_exact_with_workers"),
    M("scheduler not restored on resume", "engine/trainer.py",
      "        self.scheduler.load_state_dict(ckpt[\"scheduler\"])\n", "", RESUME),
    M("EMA not restored on resume", "engine/trainer.py",
      "            self.ema.load_state_dict(ckpt[\"ema\"])", "            pass", RESUME),
    # --- engine/schedule.py
    M("warm-up factor", "engine/schedule.py",
      "factor *= 0.001 + 0.999 * self.step_count / self.warmup_steps", "factor *= 1.0",
      "schedule_warms_up"),
    M("lr drop one step late", "engine/schedule.py",
      "sum(self.step_count >= s for s in self.drop_steps)",
      "sum(self.step_count > s for s in self.drop_steps)", "schedule_warms_up or epoch_lr_drop"),
    M("time-based drop not applied", "engine/schedule.py",
      "+ int(self.dropped)", "", "schedule_warms_up or time_based_lr_drop"),
    M("backbone group gets the base lr", "engine/schedule.py",
      "groups.append({\"params\": backbone, \"lr\": cfg.lr_backbone})",
      "groups.append({\"params\": backbone, \"lr\": cfg.lr})",
      "fused_adamw or epoch_lr_drop"),
    # --- engine/checkpoint.py
    M("torch RNG not restored on resume", "engine/checkpoint.py",
      "    torch.set_rng_state(state[\"torch\"])\n", "", RESUME),
    M("python RNG not restored on resume", "engine/checkpoint.py",
      "    random.setstate((state[\"python_version\"], tuple(state[\"python\"]), "
      "state[\"python_gauss\"]))\n", "", "rng_state_round_trip or " + RESUME),
    # --- engine/sampling.py
    M("mid-epoch resume does not skip the seen samples", "engine/sampling.py",
      "return iter(list(super().__iter__())[self.skip :])",
      "return iter(list(super().__iter__()))", RESUME),
    M("augmentation seed ignores the epoch", "engine/sampling.py",
      "sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index",
      "sample_seed = self.seed * 1_000_003 * 10_000_019 + index", "augmentation_depends"),
    M("loading leaves Python's random reseeded", "engine/sampling.py",
      "                random.setstate(python_state)\n", "                pass\n",
      "augmentation_depends"),
]


def apply(mutant: Mutant, src: Path) -> None:
    path = src / "dabdetr" / mutant.file
    text = path.read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise ValueError(f"stale mutant {mutant.name!r}: its snippet occurs {count} times in "
                         f"{mutant.file}; update the snippet in tools/mutation.py")
    path.write_text(text.replace(mutant.original, mutant.replacement))


def pytest_cmd(python: str, files: list[str], select: str | None) -> list[str]:
    tests = [str(ROOT / "tests" / t) for t in files]
    return [python, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
            *(["-k", select] if select else []), *tests]


def pytest_run(src: Path, cmd: list[str], timeout: float) -> int | None:
    """pytest's exit code with `src` as the package source; None on timeout."""
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
    env.pop("CI", None)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode not in (0, 1):  # 2-5: interrupted, internal, usage, no tests
        tail = proc.stdout.decode(errors="replace")[-2000:]
        raise RuntimeError(f"pytest exited {proc.returncode} for {' '.join(cmd[3:])}:\n{tail}")
    if proc.returncode == 1:
        last = proc.stdout.decode(errors="replace").strip().splitlines()[-1:]
        pytest_run.last_summary = last[0] if last else ""  # type: ignore[attr-defined]
    return proc.returncode


def selection(mutant: Mutant, select: str | None) -> str | None:
    return select if select is not None else mutant.select


def baseline(chosen: list[Mutant], timeout: float, python: str, select: str | None) -> bool:
    """Run, on the unmutated source, every test the chosen mutants will run (one pytest per
    group of test files, the union of their -k expressions): a test that already fails would
    count as a kill."""
    groups: dict[tuple[str, ...], set[str | None]] = {}
    for m in chosen:
        groups.setdefault(tuple(TESTS[m.file]), set()).add(selection(m, select))
    ok = True
    for files, selects in groups.items():
        union = None if None in selects else " or ".join(f"({s})" for s in sorted(selects))
        start = time.time()
        rc = pytest_run(ROOT / "src", pytest_cmd(python, list(files), union), timeout * 2)
        state = "passes" if rc == 0 else "TIMEOUT" if rc is None else "FAILS"
        print(f"baseline {state} {time.time() - start:6.0f}s  {' '.join(files)}"
              f"{f' -k {union!r}' if union else ''}", flush=True)
        ok = ok and rc == 0
    return ok


def run(mutant: Mutant, timeout: float, python: str, select: str | None = None
        ) -> tuple[str, float]:
    """'killed' (a test failed), 'survived' (the tests passed) or 'timeout' (counted as
    killed), and the seconds it took. Any other pytest exit (collection error, no test
    selected) is an error of the check itself, not a kill."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
        apply(mutant, src)
        start = time.time()
        rc = pytest_run(src, pytest_cmd(python, TESTS[mutant.file], selection(mutant, select)),
                        timeout)
        seconds = time.time() - start
        if rc is None:
            return "timeout", seconds
        return ("survived" if rc == 0 else "killed"), seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="run mutants whose name contains any of these")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    p.add_argument("--file", nargs="*",
                   help="run mutants of source files starting with any of these (e.g. engine/)")
    p.add_argument("-k", dest="select",
                   help="pytest -k expression replacing every mutant's own test selection")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the run of the selected tests on the unmutated source")
    args = p.parse_args()
    chosen = [m for m in MUTANTS
              if not args.only or any(o.lower() in m.name.lower() for o in args.only)
              if not args.file or any(m.file.startswith(f) for f in args.file)]
    for m in chosen:  # every snippet must still match before anything runs
        apply_check = (ROOT / "src" / "dabdetr" / m.file).read_text().count(m.original)
        if apply_check != 1:
            print(f"stale mutant {m.name!r}: snippet occurs {apply_check} times in {m.file}")
            return 2
    print(f"{'mutant':48s} {'file':22s} tests (pytest -x -m 'not slow' [-k ...] FILES)")
    for m in chosen:
        k = selection(m, args.select)
        print(f"{m.name:48s} {m.file:22s} {' '.join(TESTS[m.file])}"
              f"{f' -k {k!r}' if k else ' (all)'}")
    if args.list:
        return 0
    if not args.no_baseline and not baseline(chosen, args.timeout, sys.executable, args.select):
        print("the unmutated source fails its tests: fix them before counting kills")
        return 2
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

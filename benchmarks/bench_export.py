"""Exported DAB-DETR in ONNX Runtime vs our PyTorch model and transformers, same weights.

Builds a DAB-DETR-R50 with random, well-scaled weights (`_common.random_model`), writes it as a
Hugging Face directory (for transformers) and exports it with `dabdetr.export_onnx` (dynamic
batch, height and width), plus two int8 versions of that file: `dabdetr.quantize.quantize_onnx`
(static, what `dabdetr export --int8` writes; here the random-weight model is calibrated on
`CALIBRATION_IMAGES` random-noise images of the first case's size, which is enough for timing
but says nothing about accuracy) and onnxruntime's dynamic quantization
(`quantize_dynamic`, weights int8, activations quantized per call).
Then per case (default: batch 1 at 800x1088, batch 4 at 640x640), interleaved rounds of

- transformers: DabDetrForObjectDetection (the reference);
- ours: the plain PyTorch model; ours-fused: `optimize_for_inference` (`--optimize fused`);
- ort-fp32: onnxruntime's CPU execution provider on the fp32 file; ort-int8: on the static int8
  file; ort-int8-dynamic: on the dynamic int8 file;

with ms/img, achieved GFLOP/s against a 2048^2 matmul measured in the same run, the max abs
difference of logits and boxes to ours, paired ratios, and peak memory per side in fresh child
processes. Random weights have no AP: `--ap-weights W --ap-data DIR` instead evaluates trained
weights eager, as an fp32 ONNX file and as its static int8 quantization (calibrated on
`--ap-calibration` images of the dataset's train split) on a dataset.

`--folder N` instead predicts a folder of N small generated images with `dabdetr predict`'s
streaming path and prints the peak resident memory after 1/10 of them and after all (flat
memory: the two agree).

    python benchmarks/bench_export.py                       # R50: 800x1088 b1, 640x640 b4
    python benchmarks/bench_export.py --cases 1x800x1088 --reps 3 --no-int8
    python benchmarks/bench_export.py --folder 2000         # memory of a 2,000-image folder
    python benchmarks/bench_export.py --ap-weights demo_out/model --ap-data demo_out/data
    python benchmarks/bench_export.py --tiny                # CI smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from dabdetr import DabDetrConfig  # noqa: E402

SIDES = ("transformers", "ours", "ours-fused", "ort-fp32", "ort-int8", "ort-int8-dynamic")
CALIBRATION_IMAGES = 2


def parse_case(text: str) -> tuple[int, int, int]:
    try:
        b, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"case {text!r} must look like 1x800x1088 (BxHxW)") from None
    return b, h, w


def build_side(side: str, folder: Path, threads: int):
    """A callable (images, mask) -> (logits, boxes) for one side, from the files in `folder`."""
    if side == "transformers":
        model = _common.load_transformers(folder / "hf", "cpu").requires_grad_(False)

        def run(images, mask):
            out = model(pixel_values=images, pixel_mask=(~mask).long())
            return out.logits, out.pred_boxes

        return run
    if side.startswith("ort-"):
        from dabdetr.runtime import OnnxDetector

        detector = OnnxDetector(folder / f"{side[4:]}.onnx", threads=threads)

        def run(images, mask):
            out = detector(images, mask)
            return out.pred_logits, out.pred_boxes

        return run
    import dabdetr
    from dabdetr.optimize import optimized

    model = optimized(dabdetr.load_model(folder / "hf").requires_grad_(False),
                      "fused" if side == "ours-fused" else "none")

    def run(images, mask):
        out = model(images, mask)
        return out.pred_logits, out.pred_boxes

    return run


def write_files(config: DabDetrConfig, folder: Path, int8: bool, size: tuple[int, int]) -> None:
    """hf/ (the weights), fp32.onnx and, with `int8`, int8.onnx (static, calibrated on random
    images of `size` (H, W)) and int8-dynamic.onnx in `folder`."""
    import dabdetr
    from dabdetr.export import export_onnx

    model = _common.random_model(config)
    _common.export_for_transformers(model, folder / "hf")
    export_onnx(dabdetr.load_model(folder / "hf"), folder / "fp32.onnx")
    if int8:
        quantize_static_random(folder / "fp32.onnx", folder / "int8.onnx", folder / "calib", size)
        quantize_dynamic_int8(folder / "fp32.onnx", folder / "int8-dynamic.onnx")


def quantize_static_random(source: Path, target: Path, images: Path,
                           size: tuple[int, int]) -> None:
    """`dabdetr.quantize.quantize_onnx` calibrated on CALIBRATION_IMAGES random-noise images of
    `size` (H, W), written to the folder `images`, so the graph runs at the timed size."""
    import numpy as np
    from PIL import Image

    from dabdetr.quantize import quantize_onnx

    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(CALIBRATION_IMAGES):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    quantize_onnx(source, target, images, num_images=CALIBRATION_IMAGES)


def quantize_dynamic_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantization: int8 weights, activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8)


def ap_change(weights: str, data: str, split: str, calibration: int) -> None:
    """COCO AP of a trained detector in PyTorch, as an fp32 ONNX export and as that file's
    static int8 quantization (`calibration` images of the train split), on one split of a
    dataset (`dabdetr evaluate` for each)."""
    import dabdetr
    from dabdetr.engine.evaluate import evaluate_weights
    from dabdetr.export import export_onnx
    from dabdetr.quantize import quantize_onnx

    print(f"# AP of {weights} on {data} ({split}), eager vs ONNX Runtime fp32 vs static int8 "
          f"({calibration} calibration images of {data}/train)")
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(dabdetr.load_model(weights), fp32)
        quantize_onnx(fp32, int8, Path(data) / "train", num_images=calibration)
        sides = {"ours": (weights, "pytorch"), "ort-fp32": (str(fp32), "onnxruntime"),
                 "ort-int8": (str(int8), "onnxruntime")}
        metrics = {side: evaluate_weights(path, data, split, device="cpu", num_workers=0,
                                          progress=False, backend=backend)
                   for side, (path, backend) in sides.items()}
    for side, m in metrics.items():
        print(f"  {side:<10} AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}")
    for key in ("AP", "AP50"):
        change = 100 * (metrics["ort-int8"][key] - metrics["ort-fp32"][key])
        print(f"  int8 - fp32 {key}: {change:+.2f} points")


def child_memory(args: argparse.Namespace) -> None:
    """Child process: one side, a warm-up call, then the peak of one call."""
    before = _common.resident_mib("cpu")
    run = build_side(args.child_side, Path(args.child_weights), torch.get_num_threads())
    model_mib = _common.resident_mib("cpu") - before
    b, h, w = args.cases[0]
    images, mask = torch.randn(b, 3, h, w), torch.zeros(b, h, w, dtype=torch.bool)
    with torch.inference_mode():
        run(images, mask)
        with _common.PeakMemory("cpu") as peak:
            run(images, mask)
    print(json.dumps({"model_mib": model_mib, "peak_mib": peak.mib, "exact": peak.exact}))


def bench_case(runs: dict, folder: Path, case: tuple[int, int, int], warmup: int, reps: int,
               peak: float, memory: bool, threads: int) -> None:
    b, h, w = case
    torch.manual_seed(0)
    images, mask = torch.randn(b, 3, h, w), torch.zeros(b, h, w, dtype=torch.bool)
    with torch.no_grad():
        flops = _common.count_flops(lambda: runs["ours"](images, mask))
    with torch.inference_mode():
        outputs = {side: run(images, mask) for side, run in runs.items()}
        times = _common.interleaved(
            {side: (lambda run=run: run(images, mask)) for side, run in runs.items()},
            warmup, reps, "cpu")
    print(f"\n## batch {b} at {h}x{w}: {flops / b / 1e9:.1f} GFLOP per image, {reps} interleaved "
          "rounds")
    print(f"  {'side':<24} {'best ms/img':>11} {'median':>9} {'GFLOP/s':>9} {'of peak':>8}")
    for side in runs:
        print(_common.time_row(side, times[side], per=b, flops=flops, peak=peak))
    ref_logits, ref_boxes = outputs["ours"]
    for side, (logits, boxes) in outputs.items():
        if side != "ours":
            print(f"  max abs diff {side} vs ours: logits {(logits - ref_logits).abs().max():.2e}, "
                  f"boxes {(boxes - ref_boxes).abs().max():.2e}")
    for side in runs:
        if side != "transformers":
            print(_common.ratio_line(f"transformers/{side}", times["transformers"], times[side]))
    if "ort-fp32" in runs:
        print(_common.ratio_line("ours-fused/ort-fp32", times["ours-fused"], times["ort-fp32"]))
    print(f"# matmul peak after these rounds: {_common.matmul_peak_gflops('cpu'):.0f} GFLOP/s")
    if memory:
        print(_common.memory_report(
            __file__, list(runs), folder, "cpu", ["--cases", f"{b}x{h}x{w}"],
            "  peak memory of one call (fresh process per side, after a warm-up):"))


def folder_memory(count: int, config: DabDetrConfig, workers: int, size: int) -> None:
    """Predict `count` generated 64x48..96x72 images; peak RSS after count/10 and after all."""
    import numpy as np
    from PIL import Image

    from dabdetr.inference import Predictor
    from dabdetr.streaming import JsonlWriter, stream_predictions, write_coco_files

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images"
        src.mkdir()
        rng = np.random.default_rng(0)
        for i in range(count):
            w, h = (64, 48) if i % 3 else (96, 72)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(src / f"{i:06d}.png")
        files = sorted(str(p) for p in src.iterdir())
        predictor = Predictor(_common.random_model(config), size=size, max_size=size * 2,
                              threshold=0.3, device="cpu")
        checkpoints = {max(1, count // 10), count}

        def peak_mib() -> float:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        done = 0

        def on_result(det, frame) -> None:
            nonlocal done
            writer.result(det, frame)
            done += 1
            if done in checkpoints:
                print(f"  peak RSS of the predicting process after {done} images: "
                      f"{peak_mib():.0f} MiB", flush=True)

        print(f"# folder of {count} images, {workers} decoding workers, short side {size}")
        out = Path(tmp) / "out"
        out.mkdir()
        with JsonlWriter(out / "predictions.jsonl", append=False) as writer:
            stream_predictions(files, predictor, on_result=on_result, on_failure=writer.failure,
                               workers=workers, progress=False)
        write_coco_files(out / "predictions.jsonl", out)
        print(f"  peak RSS after writing the COCO files: {peak_mib():.0f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=lambda s: [parse_case(v) for v in s.split(",")],
                        default=None, help="comma-separated BxHxW (default 1x800x1088,4x640x640)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    parser.add_argument("--device", choices=["cpu"], default="cpu",
                        help="CPU only (onnxruntime's CPU execution provider)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 ONNX sides")
    parser.add_argument("--folder", type=int, default=0, metavar="N",
                        help="instead: predict N generated images, peak RSS at N/10 and N")
    parser.add_argument("--workers", type=int, default=2, help="--folder decoding workers")
    parser.add_argument("--ap-weights", default=None, metavar="W",
                        help="instead: AP of trained weights W eager, ONNX fp32 and int8 on "
                             "--ap-data (e.g. the demo's model/ and data/)")
    parser.add_argument("--ap-data", default=None, metavar="DIR", help="dataset for --ap-weights")
    parser.add_argument("--ap-split", default="val", help="split for --ap-weights")
    parser.add_argument("--ap-calibration", type=int, default=32, metavar="N",
                        help="--ap-weights: calibrate the int8 file on N images of DIR/train")
    _common.add_child_arguments(parser, tiny_size="1x128x160")
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if args.cases is None:
        args.cases = [(1, 128, 160)] if args.tiny else [(1, 800, 1088), (4, 640, 640)]
    config = (_common.tiny_config() if args.tiny
              else DabDetrConfig(inverse_sigmoid_eps=1e-5))  # transformers' eps
    if args.child_side:
        child_memory(args)
        return
    if args.ap_weights:
        if not args.ap_data:
            parser.error("--ap-weights needs --ap-data")
        ap_change(args.ap_weights, args.ap_data, args.ap_split, args.ap_calibration)
        return
    if args.folder:
        folder_memory(args.folder, config, args.workers, 64 if args.tiny else 800)
        return
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 2)
    reps = args.reps if args.reps is not None else (1 if args.tiny else 5)
    memory = args.memory if args.memory is not None else not args.tiny
    sides = [s for s in SIDES if not (args.no_int8 and s.startswith("ort-int8"))]
    print(f"# {'tiny R18' if args.tiny else 'DAB-DETR-R50'} inference, fp32 (ort-int8: static "
          f"int8 of the convolutions, ort-int8-dynamic: dynamic int8), cpu, {threads} threads")
    print(f"# {_common.machine_info('cpu')}")
    peak = _common.matmul_peak_gflops("cpu")
    print(f"# matmul peak (2048^2 fp32): {peak:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_files(config, folder, "ort-int8" in sides, args.cases[0][1:])
        runs = {side: build_side(side, folder, threads) for side in sides}
        for case in args.cases:
            bench_case(runs, folder, case, warmup, reps, peak, memory, threads)


if __name__ == "__main__":
    main()

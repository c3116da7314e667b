#!/usr/bin/env bash
# The GPU checks in one go: the CUDA tests, then the training and inference benchmarks on CUDA.
#
#     bash benchmarks/gpu_checks.sh [LOG_DIR] [AUTHORS_REPO]
#
# Each stage writes LOG_DIR/<stage>.txt (default LOG_DIR: runs/gpu) and has its own time limit,
# so a slow stage cannot starve the rest; the script goes on after a failed stage and exits
# non-zero if any failed. With AUTHORS_REPO (a checkout of IDEA-Research/DAB-DETR) the
# benchmarks also time the authors' code. Uses the python3 on PATH (set PYTHON to change it).
set -uo pipefail
logs="${1:-runs/gpu}"
authors=()
[ -n "${2:-}" ] && authors=(--authors-repo "$2")
py="${PYTHON:-python3}"
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
failed=0

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee "$logs/$name.txt"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$logs/$name.txt"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$logs/$name.txt"
    [ "$rc" -eq 0 ] || failed=1
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import torch, torchvision, transformers; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'transformers', transformers.__version__, \
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee "$logs/env.txt"

stage tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
stage train_fp32 100 "$py" benchmarks/bench_train.py --device cuda --warmup 3 --reps 20 "${authors[@]}"
stage train_amp 100 "$py" benchmarks/bench_train.py --device cuda --amp --warmup 3 --reps 20 "${authors[@]}"
stage inference 240 "$py" benchmarks/bench_inference.py --device cuda --warmup 5 --reps 20 --bf16 \
    "${authors[@]}"
stage inference_no_tf32 50 "$py" benchmarks/bench_inference.py --device cuda --no-tf32 \
    --sizes 800x1088 --warmup 3 --reps 10 --no-memory
stage matcher 30 "$py" benchmarks/bench_matcher.py --device cuda --reps 5
exit "$failed"

#!/usr/bin/env bash
# The one script to run on a lent GPU machine (H200, torch 2.11+cu130 preinstalled, no TensorRT, no internet,
# 15 minutes of device time per session). From the repository root:
#     OUT=/some/folder bash tools/gpu_check.sh
# Steps, each with a timeout cut from what is left of BUDGET_S (default 450 s, under 8 minutes in all):
#   1. environment (nvidia-smi, torch, versions)
#   2. the GPU-marked tests: pytest -m gpu, then the Triton kernel tests (tests/kernels, on the GPU here)
#   3. ruyi-trt bench on the full-size random model (denoise stage: one transformer forward on the CFG batch),
#      512/768 x 24/120 frames, bf16: torch eager, FP8 GEMMs, FP8 attention, then every other fast path (compile,
#      cuDNN/flash/efficient SDPA, block streaming, CUDA graphs); the bench skips what no longer fits and rewrites
#      its results as it goes
#   4. python -m ruyi_trt.tools.streaming_check: the memory_check table measured on the card (four stages of the
#      unconstrained, 24 GiB and 12 GiB plans at 768x768 and 576x1008, 120 frames) and each plan's step time
#      relative to the unconstrained one; it rewrites its results after every case (STREAMING_S, default 300 s)
# A step that no longer fits is skipped with a note. Results in $OUT (8 files at most come back):
#   bench/bench.{json,md,png}, gpu_check.md (summary), gpu_check.log (every step's output), streaming/.
# The project is used from this tree without installing anything: a link named ruyi_trt on PYTHONPATH.
# CPU dry run of the same steps (tiny model, small shapes):  RUYI_GPU_CHECK_CPU=1 OUT=/tmp/x bash tools/gpu_check.sh
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:?set OUT to the folder for the results}"
BUDGET_S="${BUDGET_S:-450}"
PY="${PYTHON:-python3}"
CPU_MODE="${RUYI_GPU_CHECK_CPU:-0}"
START=$(date +%s)
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/gpu_check.md"
: >"$LOG"
printf '# gpu_check\n\n| step | result | seconds |\n|---|---|---|\n' >"$SUMMARY"

LINK_DIR="$(mktemp -d)"
ln -s "$REPO" "$LINK_DIR/ruyi_trt"
export PYTHONPATH="$LINK_DIR${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export RUYI_TRT_CACHE="${RUYI_TRT_CACHE:-$LINK_DIR/cache}" OUT_BENCH="$OUT/bench"
trap 'rm -rf "$LINK_DIR"' EXIT

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME MAX_SECONDS RESERVE_SECONDS COMMAND...: run with timeout min(MAX, left - RESERVE); skip if < 20 s.
step() {
    local name="$1" max="$2" reserve="$3"
    shift 3
    local limit=$(($(left) - reserve))
    ((limit > max)) && limit=$max
    if ((limit < 20)); then
        echo "| $name | skipped: $(left) s of the budget left | 0 |" >>"$SUMMARY"
        return
    fi
    export STEP_LIMIT=$limit
    echo "=== $name (timeout ${limit}s) ===" | tee -a "$LOG"
    local t0=$(date +%s) rc=0
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    local result="ok"
    if ((rc == 124 || rc == 137)); then result="timed out after ${limit}s"; elif ((rc != 0)); then result="exit $rc"; fi
    echo "| $name | $result | $(($(date +%s) - t0)) |" >>"$SUMMARY"
}

if [[ "$CPU_MODE" == 1 ]]; then
    BENCH_ARGS=(--model tiny --device cpu --dtype fp32 --size 64x64,64x96 --frames 8,16
        --backends torch,torch-sdpa-math,torch-cudagraph,ort,trt)
else
    BENCH_ARGS=(--model full-random --device cuda --dtype bf16 --resolution 512,768 --frames 24,120
        --backends torch,torch-fp8,torch-fp8-attn,torch-sdpa-cudnn,torch-compile,torch-fp8-all,torch-sdpa-flash,torch-sdpa-efficient,torch-lowgpu,torch-cudagraph,ort,trt)
fi
HAS_STREAMING=$("$PY" -c 'import importlib.util as u; print(int(u.find_spec("ruyi_trt.tools.streaming_check") is not None))' 2>/dev/null || echo 0)
STREAMING_S="${STREAMING_S:-300}"
STREAMING_RESERVE=$((HAS_STREAMING ? STREAMING_S : 0))

step environment 30 0 bash -c "nvidia-smi || true; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'; $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|onnx|onnxruntime|diffusers|transformers|matplotlib|psutil) ' || true"

step "pytest -m gpu" 60 $((STREAMING_RESERVE + 240)) bash -c "cd '$REPO' && $PY -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests; rc=\$?; [ \$rc = 5 ] && echo 'no GPU-marked tests collected' && rc=0; exit \$rc"

step "kernel tests" 60 $((STREAMING_RESERVE + 200)) bash -c "cd '$REPO' && $PY -m pytest -q -p no:cacheprovider tests/kernels"

# The bench stops starting measurements 75 s before its timeout, so one 768x768x120f step in flight can finish.
step "bench (denoise)" 420 "$STREAMING_RESERVE" bash -c '
    budget=$((STEP_LIMIT - 75))
    "$0" -c "from ruyi_trt.cli import main; main()" bench --stages denoise --steps 1 --warmup 1 --repeat 3 \
        --max-stage-seconds 8 --time-budget "$((budget > 30 ? budget : 30))" --out "$OUT_BENCH" "$@"' \
    "$PY" "${BENCH_ARGS[@]}"

if ((HAS_STREAMING)); then
    step streaming_check "$STREAMING_S" 0 "$PY" -m ruyi_trt.tools.streaming_check --out "$OUT/streaming"
else
    echo "| streaming_check | skipped: ruyi_trt.tools.streaming_check does not exist yet | 0 |" >>"$SUMMARY"
fi

echo "" >>"$SUMMARY"
echo "total: $(($(date +%s) - START)) s of a ${BUDGET_S} s budget" >>"$SUMMARY"
[[ -f "$OUT/bench/bench.md" ]] && { echo ""; cat "$OUT/bench/bench.md"; } >>"$SUMMARY"
cat "$SUMMARY"

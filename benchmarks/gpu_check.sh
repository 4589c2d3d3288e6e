#!/usr/bin/env bash
# The whole GPU check in one command, phase by phase, each under its own time limit so that one slow or
# broken phase never costs the others:
#
#   tests        kernel tests on the real GPU (compiled Triton, not the interpreter: BitDelta 1-bit and DeltaZip
#                2/4/8-bit dense and 2:4, unit, property and layer level, one launch per layer for stacked deltas)
#   engine       the serving engine on CUDA against single-request greedy references computed on the CPU; decode
#                steps replayed as CUDA graphs against eager ones (graphs-vs-eager.json); host syncs per step
#   coserve      hf-delta bench coserve on the small zoo (LoRA fine-tuning inside inference steps)
#   serve-small  hf-delta bench serve on the small zoo, 16 deltas (engine, naive swapping, merged, PEFT loop)
#   kernels      benchmarks/kernel_bench.py --quick (every delta format in one table; KERNEL_BENCH_ARGS adds flags;
#                decode batches autotune the split-K decode kernel against the tile kernel, before timing)
#   serve-7b     hf-delta bench serve on Llama-7B-shaped random weights with synthetic deltas, and a profile of
#                where its decode step's time goes (profile-synthetic-llama-7b.md)
#   coserve-7b   hf-delta bench coserve on the same 7B-shaped model: LoRA on the last 4 layers, 512-token
#                training sequences, 32 inference requests (fine-tuning throughput kept, TPOT p99 vs inference alone)
#   scale-7b     hf-delta bench scale: BitDelta with 200 distillation steps on the Llama-2-7B-shaped pair (peak GPU
#                memory, time; the pair is written to $HF_DELTA_BENCH_WORK first, ~27 GB)
#   stacking     benchmarks/stacking_bench.py: per-layer stacking of 16 deltas vs the resident slot buffers (last: it
#                runs on what is left of the budget)
#
#   bash benchmarks/gpu_check.sh                      # every phase, in that order
#   bash benchmarks/gpu_check.sh tests engine         # some phases
#
# The whole run stays within GPU_CHECK_BUDGET seconds (default 570: a 15-minute device session less the
# machine's start): each phase's limit is cut to what is left, and a phase with under 30 s left is skipped.
#
# The small-zoo phases read the zoo from $HF_DELTA_ZOO (default ~/.cache/hf_delta/zoo; `hf-delta zoo build
# --size small` makes it) and skip when it is missing. Results go to benchmarks/results/gpu/; with $OUT set
# (the device tool), the logs and results are also packed into $OUT/gpu_check.tar.gz and a summary printed last.
#
# GPU_CHECK_DRY_RUN=1 runs every phase on the CPU at toy sizes (tests collected, not run; the micro zoo;
# Triton's interpreter; results in the work dir): tests/test_gpu_check.py does, so a GPU session never finds
# a broken script.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then
    DEVICE=cpu SIZE=micro REQUESTS=2 SYNTHETIC=tiny DELTAS_7B=2 KERNEL_MODE=--cpu-smoke SCALE_SIZE=tiny DISTILL_STEPS=2
    COSERVE_7B=(--requests 2 --max-tokens 2 --finetune-steps 1 --max-length 16 --lora-layers 1)
    BUDGET=${GPU_CHECK_BUDGET:-3600}  # a slow shared CPU, not a device session
    STACKING_MODE=--cpu-smoke
    TEST_ARGS=(--collect-only -q)
    export TRITON_INTERPRET=1
else
    DEVICE=cuda SIZE=small REQUESTS=32 SYNTHETIC=llama-7b KERNEL_MODE=--quick SCALE_SIZE=7b DISTILL_STEPS=200
    COSERVE_7B=(--requests 32 --rate 4 --max-tokens 32 --finetune-steps 10 --max-length 512 --lora-layers 4)
    BUDGET=${GPU_CHECK_BUDGET:-570}
    TEST_ARGS=(-q -ra --durations=10)
    unset TRITON_INTERPRET  # the compiled kernels are what this checks
fi
# The checkout's sources, installed or not (src/ and kernels/ together make the hf_delta package).
export PYTHONPATH="$PWD/src:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
ALL_PHASES="tests engine coserve serve-small kernels serve-7b coserve-7b scale-7b stacking"
PHASES=${*:-$ALL_PHASES}
for p in $PHASES; do
    case " $ALL_PHASES " in *" $p "*) ;; *) echo "gpu_check: unknown phase $p (phases: $ALL_PHASES)"; exit 2 ;; esac
done
LOGS=$(mktemp -d)
WORK=${HF_DELTA_BENCH_WORK:-${TMPDIR:-/tmp}/hf-delta-gpu-work}
RESULTS=${GPU_CHECK_DRY_RUN:+$WORK/results}
RESULTS=${RESULTS:-benchmarks/results/gpu}
ZOO=${HF_DELTA_ZOO:-$HOME/.cache/hf_delta/zoo}
mkdir -p "$RESULTS" "$WORK"
SUMMARY="$LOGS/summary.txt"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || nvidia-smi
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| cuda", torch.version.cuda, "| triton", triton.__version__, "|",
torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run)")'
} 2>&1 | tee "$LOGS/env.txt"

BUDGET_END=$(($(date +%s) + BUDGET))

# phase NAME SECONDS COMMAND...: run COMMAND under a time limit (cut to the budget left), log it, record its exit
# status and duration.
phase() {
    local name=$1 limit=$2 start rc left
    shift 2
    left=$((BUDGET_END - $(date +%s)))
    if [ "$left" -lt 30 ]; then
        printf '%-12s skipped: %ds of the budget left\n' "$name" "$left" | tee -a "$SUMMARY"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    printf '%-12s exit %3d  %4ds\n' "$name" "$rc" "$(($(date +%s) - start))" | tee -a "$SUMMARY"
    tail -n 15 "$LOGS/$name.log"
}

has_small_zoo() {
    if [ -f "$ZOO/$SIZE/zoo.json" ]; then return 0; fi
    printf '%-12s skipped: no %s zoo under %s\n' "$1" "$SIZE" "$ZOO" | tee -a "$SUMMARY"
    return 1
}

for p in $PHASES; do
    case $p in
    tests)
        workers=()  # compile kernels in parallel where pytest-xdist is installed
        "$PY" -c 'import xdist' 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")
        # Default configs untuned (the heuristic's pick), so dozens of shapes do not each compile every
        # candidate; test_decode_kernel.py turns autotuning on for its own test of it.
        phase tests "${LIMIT_TESTS:-200}" env HF_DELTA_AUTOTUNE=0 "$PY" -m pytest tests/kernels tests/test_layers.py \
            -p no:cacheprovider "${TEST_ARGS[@]}" "${workers[@]}" ;;
    engine)
        phase engine "${LIMIT_ENGINE:-150}" env HF_DELTA_TEST_DEVICE=$DEVICE HF_DELTA_TEST_REPORT_DIR="$RESULTS" \
            "$PY" -m pytest tests/serving/test_engine.py tests/serving/test_decode_graphs.py \
            tests/serving/test_host_syncs.py -p no:cacheprovider "${TEST_ARGS[@]}" ;;
    coserve)
        has_small_zoo coserve && phase coserve "${LIMIT_COSERVE:-120}" "$PY" -m hf_delta.cli -v bench coserve \
            --size "$SIZE" --dir "$ZOO" --requests "$REQUESTS" --rate 2 --device "$DEVICE" --out "$RESULTS" --work-dir "$WORK" ;;
    serve-small)
        has_small_zoo serve-small && phase serve-small "${LIMIT_SERVE_SMALL:-120}" "$PY" benchmarks/serve.py -v \
            --size "$SIZE" --dir "$ZOO" --deltas "${DELTAS_7B:-16}" ${GPU_CHECK_DRY_RUN:+--requests "$REQUESTS"} \
            --systems engine,naive,merged \
            --device "$DEVICE" --load-repeats 3 --out "$RESULTS" --work-dir "$WORK" ;;
    kernels)
        # shellcheck disable=SC2086  # KERNEL_BENCH_ARGS is a list of flags
        phase kernels "${LIMIT_KERNELS:-150}" "$PY" benchmarks/kernel_bench.py $KERNEL_MODE \
            ${GPU_CHECK_DRY_RUN:+--out-dir "$RESULTS"} ${KERNEL_BENCH_ARGS:-} ;;
    stacking)
        phase stacking "${LIMIT_STACKING:-60}" "$PY" benchmarks/stacking_bench.py ${STACKING_MODE:-} --out-dir "$RESULTS" ;;
    serve-7b)
        phase serve-7b "${LIMIT_SERVE_7B:-300}" "$PY" benchmarks/serve.py -v --synthetic "$SYNTHETIC" \
            --deltas "${DELTAS_7B:-16}" --popularity skewed --requests "$REQUESTS" --rate inf --max-tokens 32 \
            --systems engine,naive --device "$DEVICE" --device-slots 16 --cpu-slots 16 --load-repeats 1 --warm --profile \
            --out "$RESULTS" --work-dir "$WORK" ;;
    coserve-7b)
        phase coserve-7b "${LIMIT_COSERVE_7B:-240}" "$PY" -m hf_delta.cli -v bench coserve --synthetic "$SYNTHETIC" \
            "${COSERVE_7B[@]}" --device "$DEVICE" --out "$RESULTS" --work-dir "$WORK" ;;
    scale-7b)
        phase scale-7b "${LIMIT_SCALE_7B:-420}" "$PY" -m hf_delta.cli bench scale --sizes "$SCALE_SIZE" \
            --methods bitdelta-distill --distill-steps "$DISTILL_STEPS" --device "$DEVICE" --out "$RESULTS" \
            --work-dir "$WORK" ;;
    esac
done

[ -z "${GPU_CHECK_DRY_RUN:-}" ] && find benchmarks/results -maxdepth 1 -name 'kernels-*' -newer "$LOGS/env.txt" \
    -exec cp {} "$RESULTS"/ \;
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_check.tar.gz" -C "$LOGS" . -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
fi
echo "--- gpu_check summary (logs in $LOGS)"
cat "$LOGS/env.txt" "$SUMMARY"
! grep -qv ' exit   0 \|skipped' "$SUMMARY"

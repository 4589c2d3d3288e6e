#!/usr/bin/env bash
# One command for a GPU session: versions, the kernel tests on the real GPU (compiled Triton, not the
# interpreter: BitDelta 1-bit and DeltaZip 2/4/8-bit dense and 2:4, unit and layer-level), then the kernel
# benchmark (every format in one table). Extra arguments go to benchmarks/kernels.py (e.g. --quick,
# --formats deltazip-4bit-2:4, --group-size 128).
# If $OUT is set, the logs and this run's benchmark results are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
unset TRITON_INTERPRET  # the compiled kernel is what this checks
LOG_DIR=${OUT:-$(mktemp -d)}
mkdir -p "$LOG_DIR"
start_marker=$(mktemp)

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || nvidia-smi
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| cuda", torch.version.cuda, "| triton", triton.__version__, "|", torch.cuda.get_device_name())'
} 2>&1 | tee "$LOG_DIR/gpu_env.txt"

# hf_delta.kernels maps to kernels/ only in an installed package (see pyproject.toml).
if ! "$PY" -c 'import hf_delta.kernels.bitdelta, hf_delta.kernels.deltazip' 2>/dev/null; then
    echo "hf_delta not importable here; trying an editable install without dependencies" | tee -a "$LOG_DIR/gpu_env.txt"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$LOG_DIR/gpu_env.txt"
    if ! "$PY" -c 'import hf_delta.kernels.bitdelta, hf_delta.kernels.deltazip' 2>&1 | tee -a "$LOG_DIR/gpu_env.txt"; then
        echo "gpu_check: cannot import hf_delta.kernels (missing dependencies above)"
        exit 2
    fi
fi

status=0
# No --confcutdir: the layer-level tests (test_layer_dispatch.py, the DeltaZip layer test) need the repo-wide
# micro_zoo fixture from tests/conftest.py (stdlib + hf_delta's own dependencies; builds the zoo in ~20 s).
"$PY" -m pytest tests/kernels -q -p no:cacheprovider -ra 2>&1 | tee "$LOG_DIR/gpu_pytest.txt"
test_status=${PIPESTATUS[0]}
[ "$test_status" -ne 0 ] && status=$test_status

"$PY" benchmarks/kernels.py "$@" 2>&1 | tee "$LOG_DIR/gpu_bench.txt"
bench_status=${PIPESTATUS[0]}
[ "$bench_status" -ne 0 ] && status=$bench_status

# Serving on Llama-7B-shaped random weights with synthetic deltas (about 6-8 minutes on an H100).
"$PY" benchmarks/serve.py -v --synthetic llama-7b --deltas 4,16 --popularity skewed --requests 48 --rate 16 \
    --max-tokens 32 --device-slots 8 --cpu-slots 8 --load-repeats 2 --work-dir "${TMPDIR:-/tmp}/hf-delta-serve" \
    2>&1 | tee "$LOG_DIR/gpu_serve.txt"
serve_status=${PIPESTATUS[0]}
[ "$serve_status" -ne 0 ] && status=$serve_status

if [ -n "${OUT:-}" ]; then
    find benchmarks/results -maxdepth 1 \( -name 'kernels-*' -o -name 'serve-synthetic-*' \) -newer "$start_marker" \
        -exec cp {} "$OUT"/ \;
fi
rm -f "$start_marker"
echo "gpu_check: tests exit $test_status, kernel benchmark exit $bench_status, serve benchmark exit $serve_status (logs in $LOG_DIR)"
exit $status

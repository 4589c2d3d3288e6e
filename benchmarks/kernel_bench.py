"""Benchmark the mixed-batch delta matmuls (BitDelta 1-bit, DeltaZip low-bit) against dense and per-delta baselines.

The command line of ``hf_delta.bench.kernels``, whose docstring says what it measures:
``python benchmarks/kernel_bench.py --help``.
"""

from hf_delta.bench.kernels import main

if __name__ == "__main__":
    raise SystemExit(main())

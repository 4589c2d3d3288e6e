"""Benchmark the mixed-batch delta matmuls (BitDelta 1-bit, DeltaZip low-bit) against dense and per-delta baselines.

    python benchmarks/kernel_bench.py            # full table on the current CUDA device
    python benchmarks/kernel_bench.py --quick    # fewer shapes and repetitions
    python benchmarks/kernel_bench.py --sweep    # also try several tile configs on decode cases, keep the best
    python benchmarks/kernel_bench.py --formats deltazip-4bit-2:4   # only some delta formats
    python benchmarks/kernel_bench.py --cpu-smoke  # tiny CPU run through the references: proves the script works

For Llama-7B layer shapes (N x K), decode and prefill batch sizes and 1-32 distinct deltas per batch (rows
spread over the deltas), and each delta format (``bitdelta-1bit``: signs + per-row scales, ``--passes``
sign passes; ``deltazip-4bit``: dense 4-bit; ``deltazip-4bit-2:4`` and ``deltazip-2bit-2:4``: 2:4 sparse;
DeltaZip scales per output channel, or per ``--group-size`` columns), it times:

* ``kernel``: the format's mixed-batch kernel with a plan built once per batch (as a serving engine does
  per step; one plan serves every format);
* ``base``:   one shared dense bf16 matmul ``x @ W.T`` (what the base model costs anyway);
* ``unpack``: per delta, decode it to a dense bf16 matrix (the library's own decoder), then a torch matmul
  on that delta's rows;
* ``peft``:   a PEFT-style Python loop over deltas with dense delta weights already in memory.

and a device-to-device copy in the same run. ``base`` and ``peft`` do not depend on the format and are
timed once per case. The kernel's bandwidth counts the bytes it must move (packed values, metadata and
scales of the distinct deltas, x, out read and written). The "decode layer" figure is base matmul + kernel
against its floor: (dense base weight + packed bytes of the distinct deltas + activations) / copy
bandwidth. Results go to ``benchmarks/results/kernels-<gpu>.json`` and ``.md``.
"""

from hf_delta.bench.kernels import main

if __name__ == "__main__":
    raise SystemExit(main())

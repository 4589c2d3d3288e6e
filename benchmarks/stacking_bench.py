"""Per-layer stacking of 16 deltas' packed tensors against the layers' resident slot buffers.

The command line of ``hf_delta.bench.stacking``, whose docstring says what it measures:
``python benchmarks/stacking_bench.py --help``.
"""

from hf_delta.bench.stacking import main

if __name__ == "__main__":
    raise SystemExit(main())

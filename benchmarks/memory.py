"""Resident-delta memory: what N deltas loaded beside one base add to the process (RSS and tensor bytes).

Run: python benchmarks/memory.py [--size small] [--n 8]
Writes benchmarks/results/memory-<size>.{json,md}.
"""

from hf_delta.bench.memory import main

if __name__ == "__main__":
    raise SystemExit(main())

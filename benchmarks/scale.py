"""Compression and loading at real model sizes on synthetic Llama-shaped checkpoints (= ``hf-delta bench scale``).

    python benchmarks/scale.py --sizes 0.85b --methods bitdelta,lowrank
    python benchmarks/scale.py --sizes 7b --methods bitdelta --dry-run   # shapes and bytes, writes nothing

Writes ``benchmarks/results/scale-<sizes>.{json,md}``; see docs/scale.md.
"""

from hf_delta.bench.scale import main

if __name__ == "__main__":
    raise SystemExit(main())

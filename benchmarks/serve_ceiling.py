"""How far any delta kernel could take the engine on this machine: the engine with its linear layers' delta
products skipped (wrong outputs, so an upper bound), beside the real engine and naive swapping, in one run.

    python benchmarks/serve_ceiling.py --size small --threads 1

Same workloads as ``hf-delta bench serve`` (16 deltas, 128 requests of 32 tokens, 64 requests/s and all at
once, uniform and skewed). Writes ``benchmarks/results/serve-ceiling-<size>.{json,md}``.
"""

from hf_delta.bench.ceiling import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Serving benchmark: the engine vs naive swapping, all-merged and a PEFT-style loop (= ``hf-delta bench serve``).

    python benchmarks/serve.py --size small --threads 1            # the zoo, CPU
    python benchmarks/serve.py --synthetic llama-7b --deltas 1,4,16  # random Llama-7B-shaped weights, GPU

Writes ``benchmarks/results/serve-<size>.{json,md,png}``; see docs/serving.md for what each system is.
"""

from hf_delta.bench.serve import main

if __name__ == "__main__":
    raise SystemExit(main())

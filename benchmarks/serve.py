"""Serving benchmark: the engine vs naive swapping, all-merged and a PEFT-style loop (= ``hf-delta bench serve``).

    python benchmarks/serve.py --size small --threads 1            # the zoo, CPU
    python benchmarks/serve.py --synthetic llama-7b --deltas 1,4,16  # random Llama-7B-shaped weights, GPU

Writes ``benchmarks/results/serve-<size>.{json,md,png}``; see docs/serving.md for what each system is.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hf_delta.serving.cli import add_bench_serve_arguments, bench_serve_main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    add_bench_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return bench_serve_main(args, command=" ".join(["python benchmarks/serve.py", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())

"""How far any delta kernel could take the engine on this machine: the engine with its linear layers' delta
products skipped (wrong outputs, so an upper bound), beside the real engine and naive swapping, in one run.

    python benchmarks/serve_ceiling.py --size small --threads 1

Same workloads as ``hf-delta bench serve`` (16 deltas, 128 requests of 32 tokens, 64 requests/s and all at
once, uniform and skewed). Writes ``benchmarks/results/serve-ceiling-<size>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from ..evaluation import to_markdown
from ..methods.base import CompressedWeight
from ..utils.loading import load_tokenizer
from .report import write_report
from .serve import expand, prepare_zoo
from .workload import BenchSettings, build_workload, run_engine, run_naive


@contextlib.contextmanager
def delta_products_skipped() -> Iterator[None]:
    """Every compressed linear delta adds nothing (routing, gathers, embeddings and norms still run)."""
    kinds = [CompressedWeight, *CompressedWeight.__subclasses__()]
    skipped = {"add_to_rows_many": classmethod(lambda cls, weights, x, out, rows: None),
               "add_to_rows_resident": classmethod(lambda cls, *args: True)}  # True: done, nothing added
    saved = {(kind, name): kind.__dict__.get(name) for kind in kinds for name in skipped}
    for (kind, name) in saved:
        setattr(kind, name, skipped[name])
    try:
        yield
    finally:
        for (kind, name), method in saved.items():
            if method is None:
                delattr(kind, name)
            else:
                setattr(kind, name, method)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--deltas", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "hf_delta" / "bench-serve"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings()
    base, served = prepare_zoo(args.size, None, Path(args.work_dir))
    names = expand(served, args.deltas)
    pad_id = load_tokenizer(base).pad_token_id
    cpu = {"device": torch.device("cpu"), "dtype": torch.float32}
    rows = []
    for rate in settings.rates:
        for popularity in settings.popularity:
            workload = build_workload(names, n_requests=settings.requests, rate=rate, popularity=popularity,
                                      seed=settings.seed, max_tokens=settings.max_tokens)
            engine = run_engine(base, names, workload, config=settings.engine, **cpu)["throughput_tok_s"]
            with delta_products_skipped():
                free = run_engine(base, names, workload, config=settings.engine, **cpu)["throughput_tok_s"]
            naive = run_naive(names, workload, pad_id=pad_id, max_batch=settings.max_batch, **cpu)["throughput_tok_s"]
            rows.append({"rate": f"{rate:g}", "deltas": args.deltas, "popularity": popularity,
                         "engine_tok_s": engine, "free_deltas_tok_s": free, "naive_tok_s": naive,
                         "engine_vs_naive": engine / naive, "free_deltas_vs_naive": free / naive,
                         "last_arrival_s": max(r.arrival for r in workload) if math.isfinite(rate) else 0.0})
            print(rows[-1], flush=True)
    command = f"python benchmarks/serve_ceiling.py --size {args.size}" + (
        f" --threads {args.threads}" if args.threads else "")
    md = f"`{command}`\n\n{__doc__.splitlines()[0]} {__doc__.splitlines()[1]}\n\n{to_markdown(rows)}\n"
    write_report(args.out, f"serve-ceiling-{args.size}", command=command, data={"command": command, "rows": rows},
                 markdown=md)
    print(md)
    return 0

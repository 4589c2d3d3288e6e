"""Resident-delta memory: what N deltas loaded beside one base add to the process (RSS and tensor bytes).

Run: python benchmarks/memory.py [--size small] [--n 8]
Writes benchmarks/results/memory-<size>.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import psutil
import torch

from ..compression import compress
from ..methods import BitDeltaConfig
from ..model import DeltaModel
from ..storage import Delta
from ..utils.loading import load_model
from ..utils.sizes import bf16_weight_bytes
from ..zoo import load_zoo
from .report import write_results


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="small")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    zoo = load_zoo(args.size)
    llama = [e for e in zoo.finetunes if e.base == "llama-base"]
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for i in range(args.n):  # the zoo has 4 llama fine-tunes: deltas i and i+4 differ in distillation seed
            entry = llama[i % len(llama)]
            model = compress(
                zoo["llama-base"].path, entry.path, BitDeltaConfig(distill_steps=0, seed=i), progress=False
            )
            folders.append(Path(tmp) / f"delta{i}")
            model.save_pretrained(folders[-1])
            del model
        base = load_model(zoo["llama-base"].path)
        model = DeltaModel(base)
        ids = torch.tensor([[1, 2, 3, 4]])
        model(input_ids=ids)  # warm up allocator and lazy inits before measuring
        before = rss()
        sizes = []
        for i, folder in enumerate(folders):
            delta = Delta.from_folder(folder)
            sizes.append(delta.nbytes())
            model.add_delta(f"d{i}", delta)
        after = rss()
        with torch.no_grad():
            model(input_ids=ids.repeat(args.n, 1), delta_names=[f"d{i}" for i in range(args.n)])
    added = after - before
    budget = sum(sizes) * 1.10
    row = {
        "deltas": args.n,
        "delta_bytes_each": sizes[0],
        "delta_bytes_total": sum(sizes),
        "rss_added": added,
        "budget_(1.1x)": int(budget),
        "within_budget": added <= budget,
        "base_bf16_bytes": bf16_weight_bytes(base),
    }
    md = write_results(
        [row],
        args.out,
        name=f"memory-{args.size}",
        command=f"python benchmarks/memory.py --size {args.size} --n {args.n}",
    )
    print(md)
    return 0

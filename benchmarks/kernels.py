"""Benchmark the mixed-batch 1-bit delta matmul against dense and per-delta baselines.

    python benchmarks/kernels.py            # full table on the current CUDA device
    python benchmarks/kernels.py --quick    # fewer shapes and repetitions
    python benchmarks/kernels.py --sweep    # also try several tile configs on decode cases, keep the best
    python benchmarks/kernels.py --cpu-smoke  # tiny CPU run through the reference: proves the script works

For Llama-7B layer shapes (N x K), decode and prefill batch sizes and 1-32 distinct deltas per batch (rows
spread over the deltas), it times:

* ``kernel``: ``bitdelta_matmul`` with a plan built once per batch (as a serving engine does per step);
* ``base``:   one shared dense bf16 matmul ``x @ W.T`` (what the base model costs anyway);
* ``unpack``: per delta, unpack signs to a dense bf16 matrix, then a torch matmul on that delta's rows;
* ``peft``:   a PEFT-style Python loop over deltas with dense delta weights already in memory.

and a device-to-device copy in the same run. The kernel's bandwidth counts the bytes it must move (packed
bits + scales of the distinct deltas, x, out read and written). The "decode layer" figure is base matmul +
kernel against its floor: (dense base weight + packed bits of the distinct deltas + activations) / copy
bandwidth. Results go to ``benchmarks/results/kernels-<gpu>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hf_delta.kernels.bitdelta import (
    BitDeltaKernelConfig,
    bitdelta_matmul,
    plan_bitdelta_batch,
)

from hf_delta.packing import unpack_signs

LAYERS = {"attn 4096x4096": (4096, 4096), "up 11008x4096": (11008, 4096), "down 4096x11008": (4096, 11008)}
DECODE_M = (1, 16, 64)
PREFILL_M = (512, 4096)
DELTAS = (1, 4, 16, 32)
SWEEP_CONFIGS = [
    BitDeltaKernelConfig(block_m=16, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (256, 128, 8, 3),
        (256, 128, 8, 4),
        (256, 64, 8, 3),
        (128, 128, 4, 3),
        (128, 256, 4, 3),
        (128, 128, 8, 4),
        (64, 128, 4, 3),
        (64, 256, 4, 4),
        (32, 256, 4, 3),
    ]
]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ===================================================================================================
# Timing
# ===================================================================================================


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbps(device: torch.device, nbytes: int, warmup: int, reps: int) -> float:
    """Device-to-device copy bandwidth, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ===================================================================================================
# One case
# ===================================================================================================


def make_inputs(n: int, k: int, m: int, n_deltas: int, stack: int, passes: int, device, dtype, gen):
    x = torch.randn(m, k, generator=gen, device="cpu").to(device=device, dtype=dtype)
    signs = torch.randint(0, 256, (stack, passes, n, (k + 7) // 8), generator=gen, dtype=torch.uint8)
    scales = 1e-3 * torch.rand(stack, passes, n, generator=gen)
    # Rows spread evenly over the deltas, in shuffled order (requests arrive interleaved).
    slots = (torch.arange(m) % n_deltas)[torch.randperm(m, generator=gen)].to(torch.int32)
    return x, signs.to(device), scales.to(device), slots.to(device)


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    gen: torch.Generator
    copy_gbps: float


def run_case(b: Bench, layer: str, n: int, k: int, m: int, n_deltas: int, dense_deltas, base_w) -> dict:
    """Time every method on one (layer, M, deltas) case; return the row of the results table."""
    args, device, dtype, copy_gbps, passes = b.args, b.device, b.dtype, b.copy_gbps, b.args.passes
    stack = dense_deltas.shape[0]
    x, signs, scales, slots = make_inputs(n, k, m, n_deltas, stack, passes, device, dtype, b.gen)
    out = torch.zeros(m, n, device=device, dtype=dtype)
    distinct = min(n_deltas, m)
    plan = plan_bitdelta_batch(slots, signs.shape[0])
    row_sets = [(slots == d).nonzero().squeeze(1) for d in range(distinct)]
    t = {}
    t["plan"] = time_ms(lambda: plan_bitdelta_batch(slots, signs.shape[0]), device, args.warmup, args.reps)
    t["kernel"] = time_ms(
        lambda: bitdelta_matmul(x, out, slots, signs, scales, plan=plan), device, args.warmup, args.reps
    )
    best_config = None
    if args.sweep and m <= 64 and device.type == "cuda":
        for cfg in SWEEP_CONFIGS:
            ms = time_ms(
                lambda cfg=cfg: bitdelta_matmul(x, out, slots, signs, scales, plan=plan, config=cfg),
                device,
                args.warmup,
                args.reps,
            )
            if ms < t["kernel"]:
                t["kernel"], best_config = ms, cfg
    t["base"] = time_ms(lambda: torch.mm(x, base_w.t()), device, args.warmup, args.reps)

    def unpack_loop():
        for d, rows in enumerate(row_sets):
            w = torch.zeros(n, k, device=device, dtype=torch.float32)
            for p in range(passes):
                w += scales[d, p, :, None] * unpack_signs(signs[d, p], k)
            out.index_add_(0, rows, x[rows] @ w.to(dtype).t())

    def peft_loop():
        for d in range(distinct):  # PEFT's mixed-batch forward: mask rows per adapter, dense weights
            rows = (slots == d).nonzero().squeeze(1)
            out[rows] += x[rows] @ dense_deltas[d].t()

    t["unpack"] = time_ms(unpack_loop, device, min(args.warmup, 3), max(3, args.reps // 5))
    t["peft"] = time_ms(peft_loop, device, args.warmup, args.reps)

    elt = x.element_size()
    bits_bytes = distinct * passes * n * ((k + 7) // 8) + distinct * passes * n * 4
    act_bytes = m * k * elt + 2 * m * n * elt
    kernel_bytes = bits_bytes + act_bytes
    kernel_gbps = kernel_bytes / (t["kernel"] * 1e-3) / 1e9
    floor_ms = (n * k * elt + bits_bytes + act_bytes) / (copy_gbps * 1e9) * 1e3
    return {
        "layer": layer,
        "N": n,
        "K": k,
        "M": m,
        "deltas": distinct,
        "passes": passes,
        "ms": {key: sig(v) for key, v in t.items()},
        "kernel_bytes": kernel_bytes,
        "kernel_GBps": sig(kernel_gbps),
        "kernel_pct_copy_bw": sig(100 * kernel_gbps / copy_gbps),
        "kernel_TFLOPs": sig(2 * m * n * k * passes / (t["kernel"] * 1e-3) / 1e12),
        "layer_ms": sig(t["base"] + t["kernel"]),
        "layer_floor_ms": sig(floor_ms),
        "layer_pct_floor": sig(100 * floor_ms / (t["base"] + t["kernel"])),
        "speedup_vs_peft": sig(t["peft"] / t["kernel"]),
        "speedup_vs_unpack": sig(t["unpack"] / t["kernel"]),
        "best_config": None if best_config is None else vars(best_config),
    }


# ===================================================================================================
# Driver and reports
# ===================================================================================================


def sig(x: float) -> float:
    """``x`` to 4 significant digits (CPU smoke runs give tiny GB/s that fixed decimals round to 0)."""
    return float(f"{x:.4g}")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def markdown(meta: dict, rows: list[dict]) -> str:
    head = (
        f"# bitdelta_matmul on {meta['device']}\n\n"
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}, {meta['passes']} pass(es); "
        f"copy bandwidth {meta['copy_GBps']:.0f} GB/s; {meta['date']}\n\n"
        "| layer | M | deltas | kernel ms | GB/s | % copy | TFLOP/s | base ms | layer % floor "
        "| unpack ms | peft ms | vs peft |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['layer']} | {r['M']} | {r['deltas']} | {r['ms']['kernel']:.4f} | {r['kernel_GBps']:.4g} "
        f"| {r['kernel_pct_copy_bw']:.1f} | {r['kernel_TFLOPs']:.2f} | {r['ms']['base']:.4f} "
        f"| {r['layer_pct_floor']:.1f} | {r['ms']['unpack']:.3f} | {r['ms']['peft']:.3f} "
        f"| {r['speedup_vs_peft']:.1f}x |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--sweep", action="store_true", help="try several tile configs on decode cases")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run through the reference")
    parser.add_argument("--passes", type=int, default=1, help="residual sign passes per delta (default 1)")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"where to write results ({RESULTS_DIR})")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        layers, decode, prefill, deltas = {"tiny 96x80": (96, 80)}, (1, 6), (), (1, 4)
        args.warmup, args.reps, copy_bytes = 1, 3, 1 << 24
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="hf-delta-bench-"))
        device_name = "cpu-smoke"
    elif not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device, nothing to time (--cpu-smoke tests the script itself).")
        return 0
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        layers, decode, prefill, deltas = LAYERS, DECODE_M, PREFILL_M, DELTAS
        if args.quick:
            layers = {key: LAYERS[key] for key in ("attn 4096x4096", "down 4096x11008")}
            decode, prefill, deltas = (1, 16), (512,), (1, 16)
        args.warmup, args.reps, copy_bytes = (5, 20, 1 << 29) if args.quick else (10, 50, 1 << 30)
        out_dir = args.out_dir or RESULTS_DIR
        device_name = torch.cuda.get_device_name(device)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    copy_gbps = copy_bandwidth_gbps(device, copy_bytes, args.warmup, args.reps)
    gen = torch.Generator().manual_seed(0)
    bench = Bench(args, device, dtype, gen, copy_gbps)
    rows = []
    for layer, (n, k) in layers.items():
        stack = max(deltas)
        # Dense delta weights for the PEFT-style baseline and a dense base weight, once per layer shape.
        dense_deltas = (1e-3 * torch.randn(stack, n, k, generator=gen)).to(device=device, dtype=dtype)
        base_w = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
        for m in (*decode, *prefill):
            for n_deltas in deltas:
                if n_deltas > m:  # fewer rows than deltas: same as n_deltas == m, already measured
                    continue
                row = run_case(bench, layer, n, k, m, n_deltas, dense_deltas, base_w)
                rows.append(row)
                print(
                    f"{layer:>16} M={m:<5} deltas={row['deltas']:<3} kernel {row['ms']['kernel']:.4f} ms "
                    f"{row['kernel_GBps']:>7.4g} GB/s ({row['kernel_pct_copy_bw']:5.1f}% copy) "
                    f"layer {row['layer_pct_floor']:5.1f}% of floor, {row['speedup_vs_peft']:.1f}x vs peft",
                    flush=True,
                )
        del dense_deltas, base_w
        if device.type == "cuda":
            torch.cuda.empty_cache()

    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "passes": args.passes,
        "copy_GBps": sig(copy_gbps),
        "quick": args.quick,
        "sweep": args.sweep,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python benchmarks/kernels.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"kernels-{slug(device_name)}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table = markdown(meta, rows)
    base.with_suffix(".md").write_text(table)
    print()
    print(table)
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

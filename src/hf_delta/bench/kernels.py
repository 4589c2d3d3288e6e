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
  per step; one plan serves every format), with the launcher's own config choice: on CUDA, decode batches
  autotune once per (shape, M bucket, deltas in use) between the split-K decode kernel and the tile kernel
  (``hf_delta.kernels.warmup`` does it first, outside any timed window; the table names the pick);
* ``base``:   one shared dense bf16 matmul ``x @ W.T`` (what the base model costs anyway);
* ``unpack``: per delta, decode it to a dense bf16 matrix (the library's own decoder), then a torch matmul
  on that delta's rows;
* ``peft``:   a PEFT-style Python loop over deltas with dense delta weights already in memory.

and a device-to-device copy in the same run. ``base`` and ``peft`` do not depend on the format and are
timed once per case. Every timed measurement follows untimed warm-up calls of the same function (the
report records how many), so no Triton compilation or autotuning is timed. The kernel's bandwidth counts
the bytes it must move (packed values, metadata and scales of the distinct deltas, x, out read and
written). The "decode layer" figure is base matmul + kernel
against its floor: (dense base weight + packed bytes of the distinct deltas + activations) / copy
bandwidth. Results go to ``benchmarks/results/kernels-<gpu>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
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

from ..kernels import DecodeConfig, chosen_configs, warmup
from ..kernels._common import interpret_enabled
from ..kernels.bitdelta import (
    BitDeltaKernelConfig,
    bitdelta_matmul,
    plan_bitdelta_batch,
)
from ..kernels.deltazip import DeltaZipKernelConfig, deltazip_matmul
from ..methods.deltazip import DeltaZipWeight
from ..packing import packed_width, unpack_signs
from .report import write_report

LAYERS = {"attn 4096x4096": (4096, 4096), "up 11008x4096": (11008, 4096), "down 4096x11008": (4096, 11008)}
DECODE_M = (1, 16, 64)
PREFILL_M = (512, 4096)
DELTAS = (1, 4, 16, 32)


def _decode_configs(cls: type, tiles: list[tuple[int, int, int, int]]) -> list:
    """Decode-tile candidates (``block_m`` 16) for ``--sweep``, from ``(block_n, block_k, num_warps, num_stages)``."""
    return [cls(block_m=16, block_n=bn, block_k=bk, num_warps=w, num_stages=s) for bn, bk, w, s in tiles]


# Tables, one (block_n, block_k, num_warps, num_stages) per entry, laid out by hand.
# fmt: off
SWEEP_CONFIGS = _decode_configs(BitDeltaKernelConfig, [
    (256, 128, 8, 3), (256, 128, 8, 4), (256, 64, 8, 3), (128, 128, 4, 3), (128, 256, 4, 3),
    (128, 128, 8, 4), (64, 128, 4, 3), (64, 256, 4, 4), (32, 256, 4, 3),
])
DZ_SWEEP_CONFIGS = _decode_configs(DeltaZipKernelConfig, [
    (128, 128, 4, 3), (128, 256, 8, 3), (64, 128, 4, 3), (64, 256, 4, 4), (32, 128, 4, 3), (32, 256, 4, 4),
    (256, 64, 8, 3),
])
# fmt: on
RESULTS_DIR = Path("benchmarks") / "results"  # from the repo root, like every benchmark's --out


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
# Delta formats: packed inputs, the kernel call, the decode-then-matmul baseline, bytes moved
# ===================================================================================================


@dataclass
class Format:
    """One delta format: how to make random packed deltas of it and how each method runs on them."""

    name: str
    bits: int  # 1 = BitDelta signs
    layout: str = "dense"  # DeltaZip layout

    def make(self, n: int, k: int, stack: int, b: Bench) -> dict[str, torch.Tensor | None]:
        """Random packed deltas ``[stack, ...]``, made on the device (valid codes: the decoders must accept them)."""
        kw = {"generator": b.dev_gen, "device": b.device}
        if self.bits == 1:
            passes = b.args.passes
            signs = torch.randint(0, 256, (stack, passes, n, (k + 7) // 8), dtype=torch.uint8, **kw)
            return {"signs": signs, "scales": 1e-3 * torch.rand(stack, passes, n, **kw)}
        values = k // 2 if self.layout == "2:4" else k
        # Every byte is a valid run of offset-binary ints; 2:4 positions must be ascending pairs of 0..3.
        qweight = torch.randint(0, 256, (stack, n, packed_width(values, self.bits)), dtype=torch.uint8, **kw)
        positions = None
        if self.layout == "2:4":
            pairs = [p0 | p1 << 2 for p0 in range(4) for p1 in range(p0 + 1, 4)]
            pairs = torch.tensor(pairs, dtype=torch.uint8, device=b.device)
            nibbles = pairs[torch.randint(0, 6, (stack, n, (k + 7) // 8, 2), **kw)]
            positions = nibbles[..., 0] | nibbles[..., 1] << 4
        groups = 1 if b.args.group_size is None else -(-k // b.args.group_size)
        scales = (1e-3 * torch.rand(stack, n, groups, **kw)).half()
        return {"qweight": qweight, "scales": scales, "positions": positions}

    def kernel(
        self, packed: dict, x, out, slots, plan, config=None, group_size: int | None = None, backend: str = "auto"
    ) -> None:
        if self.bits == 1:
            bitdelta_matmul(x, out, slots, packed["signs"], packed["scales"], plan=plan, config=config, backend=backend)
        else:
            deltazip_matmul(
                x,
                out,
                slots,
                *self.weights(packed),
                plan=plan,
                config=config,
                backend=backend,
                **self.options(packed, group_size),
            )

    def weights(self, packed: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked tensors the op takes after ``slots``."""
        return (packed["signs"], packed["scales"]) if self.bits == 1 else (packed["qweight"], packed["scales"])

    def options(self, packed: dict, group_size: int | None) -> dict[str, object]:
        """The op's format keywords (none for BitDelta)."""
        if self.bits == 1:
            return {}
        return {"bits": self.bits, "layout": self.layout, "group_size": group_size, "positions": packed["positions"]}

    def op(self) -> Callable[..., torch.Tensor]:
        return bitdelta_matmul if self.bits == 1 else deltazip_matmul

    def dense(self, packed: dict, d: int, k: int, group_size: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Delta ``d`` decoded to a dense matrix by the library's own (non-kernel) decoder."""
        if self.bits == 1:
            signs, scales = packed["signs"][d], packed["scales"][d]
            w = torch.zeros(signs.shape[1], k, device=signs.device, dtype=torch.float32)
            for p in range(signs.shape[0]):
                w += scales[p, :, None] * unpack_signs(signs[p], k)
            return w.to(dtype)
        n = packed["qweight"].shape[1]
        weight = DeltaZipWeight(
            (n, k),
            bits=self.bits,
            group_size=group_size,
            layout=self.layout,
            qweight=packed["qweight"][d],
            scales=packed["scales"][d],
            mask=None if packed["positions"] is None else packed["positions"][d],
        )
        return weight.to_dense(dtype)

    def delta_bytes(self, packed: dict) -> int:
        """Packed bytes of one delta (values, metadata, scales)."""
        return sum(t[0].numel() * t.element_size() for t in packed.values() if t is not None)

    def sweep(self) -> list:
        return SWEEP_CONFIGS if self.bits == 1 else DZ_SWEEP_CONFIGS


FORMATS = {
    f.name: f
    for f in (
        Format("bitdelta-1bit", 1),
        Format("deltazip-4bit", 4, "dense"),
        Format("deltazip-4bit-2:4", 4, "2:4"),
        Format("deltazip-2bit-2:4", 2, "2:4"),
    )
}


# ===================================================================================================
# One case
# ===================================================================================================


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    gen: torch.Generator  # CPU: batch composition
    dev_gen: torch.Generator  # on the device: weights, made where they are used (GBs at 7B shapes)
    copy_gbps: float
    formats: list[Format]
    backend: str  # "auto"; "triton" for a CPU smoke run under TRITON_INTERPRET=1 (the interpreted kernels)


def run_case(
    b: Bench, layer: str, n: int, k: int, m: int, n_deltas: int, dense_deltas, base_w, packed: dict[str, dict]
) -> list[dict]:
    """Time the baselines once and every selected format's kernel on one (layer, M, deltas) case.

    ``packed`` holds each format's random deltas for this layer shape. Returns one table row per format.
    """
    args, device, dtype, copy_gbps = b.args, b.device, b.dtype, b.copy_gbps
    stack = dense_deltas.shape[0]
    x = torch.randn(m, k, generator=b.gen).to(device=device, dtype=dtype)
    # Rows spread evenly over the deltas, in shuffled order (requests arrive interleaved).
    slots = (torch.arange(m) % n_deltas)[torch.randperm(m, generator=b.gen)].to(torch.int32).to(device)
    out = torch.zeros(m, n, device=device, dtype=dtype)
    distinct = min(n_deltas, m)
    plan = plan_bitdelta_batch(slots, stack)
    row_sets = [(slots == d).nonzero().squeeze(1) for d in range(distinct)]
    shared = {
        "plan": time_ms(lambda: plan_bitdelta_batch(slots, stack), device, args.warmup, args.reps),
        "base": time_ms(lambda: torch.mm(x, base_w.t()), device, args.warmup, args.reps),
    }

    def peft_loop():
        for d in range(distinct):  # PEFT's mixed-batch forward: mask rows per adapter, dense weights
            rows = (slots == d).nonzero().squeeze(1)
            out[rows] += x[rows] @ dense_deltas[d].t()

    shared["peft"] = time_ms(peft_loop, device, args.warmup, args.reps)

    elt = x.element_size()
    act_bytes = m * k * elt + 2 * m * n * elt
    rows = []
    for fmt in b.formats:
        packed_fmt = packed[fmt.name]
        group = args.group_size if fmt.bits > 1 else None
        t = dict(shared)
        # Compile and (on CUDA) autotune this batch's bucket before timing; time_ms warms up again anyway.
        before = chosen_configs()
        warmup(
            fmt.op(),
            *fmt.weights(packed_fmt),
            in_features=k,
            batch_sizes=(m,),
            deltas_in_use=(distinct,),
            dtype=dtype,
            backend=b.backend,
            **fmt.options(packed_fmt, group),
        )
        picked = [cfg for key, cfg in chosen_configs().items() if key not in before]
        unpicked = "PyTorch reference" if device.type == "cpu" and b.backend == "auto" else "tile (prefill default)"
        run = functools.partial(fmt.kernel, packed_fmt, x, out, slots, plan, group_size=group, backend=b.backend)
        t["kernel"] = time_ms(run, device, args.warmup, args.reps)
        best_config = None
        if args.sweep and m <= 64 and device.type == "cuda":
            for cfg in fmt.sweep():
                if group is not None and group % cfg.block_k:
                    continue  # per-element group scales: not the configuration anyone would pick
                ms = time_ms(functools.partial(run, cfg), device, args.warmup, args.reps)
                if ms < t["kernel"]:
                    t["kernel"], best_config = ms, cfg

        def unpack_loop(fmt=fmt, packed_fmt=packed_fmt, group=group):
            for d, rows_d in enumerate(row_sets):
                w = fmt.dense(packed_fmt, d, k, group, dtype)
                out.index_add_(0, rows_d, x[rows_d] @ w.t())

        t["unpack"] = time_ms(unpack_loop, device, min(args.warmup, 3), max(3, args.reps // 5))
        delta_bytes = distinct * fmt.delta_bytes(packed_fmt)
        kernel_bytes = delta_bytes + act_bytes
        kernel_gbps = kernel_bytes / (t["kernel"] * 1e-3) / 1e9
        floor_ms = (n * k * elt + delta_bytes + act_bytes) / (copy_gbps * 1e9) * 1e3
        flops = 2 * m * n * k * (args.passes if fmt.bits == 1 else 1)
        rows.append(
            {
                "layer": layer,
                "format": fmt.name,
                "N": n,
                "K": k,
                "M": m,
                "deltas": distinct,
                "passes": args.passes if fmt.bits == 1 else None,
                "group_size": group,
                "ms": {key: sig(v) for key, v in t.items()},
                "kernel_bytes": kernel_bytes,
                "kernel_GBps": sig(kernel_gbps),
                "kernel_pct_copy_bw": sig(100 * kernel_gbps / copy_gbps),
                "kernel_TFLOPs": sig(flops / (t["kernel"] * 1e-3) / 1e12),
                "layer_ms": sig(t["base"] + t["kernel"]),
                "layer_floor_ms": sig(floor_ms),
                "layer_pct_floor": sig(100 * floor_ms / (t["base"] + t["kernel"])),
                "speedup_vs_peft": sig(t["peft"] / t["kernel"]),
                "speedup_vs_unpack": sig(t["unpack"] / t["kernel"]),
                "best_config": None if best_config is None else vars(best_config),
                "config": describe(picked[0]) if picked else unpicked,
            }
        )
    return rows


# ===================================================================================================
# Driver and reports
# ===================================================================================================


def sig(x: float) -> float:
    """``x`` to 4 significant digits (CPU smoke runs give tiny GB/s that fixed decimals round to 0)."""
    return float(f"{x:.4g}")


def describe(config: object) -> str:
    """A kernel config in a table cell: which kernel, and its tiles."""
    if isinstance(config, DecodeConfig):
        split = "auto" if config.split_k is None else config.split_k
        return f"split-K r{config.block_r} n{config.block_n} k{config.block_k} s{split} w{config.num_warps}"
    return f"tile m{config.block_m} n{config.block_n} k{config.block_k} w{config.num_warps}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def markdown(meta: dict, rows: list[dict]) -> str:
    head = (
        f"# Mixed-batch delta kernels on {meta['device']}\n\n"
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}; bitdelta: {meta['passes']} pass(es); "
        f"deltazip: scales {scale_kind(meta['group_size'])}; copy bandwidth {meta['copy_GBps']:.0f} GB/s; "
        f"{meta['date']}\n\n{meta['warmup']}\n\n"
        "| layer | format | M | deltas | kernel ms | GB/s | % copy | TFLOP/s | base ms | layer % floor "
        "| unpack ms | peft ms | vs peft | config |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = [
        f"| {r['layer']} | {r['format']} | {r['M']} | {r['deltas']} | {r['ms']['kernel']:.4f} | {r['kernel_GBps']:.4g} "
        f"| {r['kernel_pct_copy_bw']:.1f} | {r['kernel_TFLOPs']:.2f} | {r['ms']['base']:.4f} "
        f"| {r['layer_pct_floor']:.1f} | {r['ms']['unpack']:.3f} | {r['ms']['peft']:.3f} "
        f"| {r['speedup_vs_peft']:.1f}x | {r['config']} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def scale_kind(group_size: int | None) -> str:
    return "per output channel" if group_size is None else f"per group of {group_size}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--sweep", action="store_true", help="try several tile configs on decode cases")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run through the reference")
    parser.add_argument("--passes", type=int, default=1, help="bitdelta: sign passes per delta (default 1)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="deltazip: input columns per scale (default: one scale per output channel)",
    )
    parser.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"comma-separated delta formats to time (default all: {','.join(FORMATS)})",
    )
    parser.add_argument("--out-dir", type=Path, default=None, help=f"where to write results ({RESULTS_DIR})")
    args = parser.parse_args(argv)
    unknown = [f for f in args.formats.split(",") if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
    formats = [FORMATS[f] for f in args.formats.split(",")]

    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        # N 40: a partial N tile; K 80: 10 bytes a row, byte loads with a K tail.
        layers, decode, prefill, deltas = {"tiny 40x80": (40, 80)}, (1, 6), (), (1, 4)
        args.warmup, args.reps, copy_bytes = 1, 2, 1 << 24
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="hf-delta-bench-"))
        device_name = "cpu-smoke"
    elif not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py: no CUDA device, nothing to time (--cpu-smoke tests the script itself).")
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
    dev_gen = torch.Generator(device=device).manual_seed(0)
    # A CPU smoke run under TRITON_INTERPRET=1 (gpu_check.sh's dry run) goes through the interpreted kernels.
    backend = "triton" if device.type == "cpu" and interpret_enabled() and triton_version != "not installed" else "auto"
    bench = Bench(args, device, dtype, gen, dev_gen, copy_gbps, formats, backend)
    rows = []
    for layer, (n, k) in layers.items():
        stack = max(deltas)
        # Dense delta weights for the PEFT-style baseline, a dense base weight and every format's packed
        # deltas, once per layer shape (what they hold does not change the timings).
        dense_deltas = (1e-3 * torch.randn(stack, n, k, generator=dev_gen, device=device)).to(dtype)
        base_w = torch.randn(n, k, generator=dev_gen, device=device).to(dtype)
        packed = {fmt.name: fmt.make(n, k, stack, bench) for fmt in formats}
        for m in (*decode, *prefill):
            for n_deltas in deltas:
                if n_deltas > m:  # fewer rows than deltas: same as n_deltas == m, already measured
                    continue
                for row in run_case(bench, layer, n, k, m, n_deltas, dense_deltas, base_w, packed):
                    rows.append(row)
                    print(
                        f"{layer:>16} {row['format']:>18} M={m:<5} deltas={row['deltas']:<3} "
                        f"kernel {row['ms']['kernel']:.4f} ms {row['kernel_GBps']:>7.4g} GB/s "
                        f"({row['kernel_pct_copy_bw']:5.1f}% copy) layer {row['layer_pct_floor']:5.1f}% of floor, "
                        f"{row['speedup_vs_peft']:.1f}x vs peft",
                        flush=True,
                    )
        del dense_deltas, base_w, packed
        if device.type == "cuda":
            torch.cuda.empty_cache()

    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "passes": args.passes,
        "group_size": args.group_size,
        "formats": [f.name for f in formats],
        "copy_GBps": sig(copy_gbps),
        "quick": args.quick,
        "sweep": args.sweep,
        "backend": backend,
        "warmup": (
            f"Warm-up: hf_delta.kernels.warmup for each case's batch (compiles and autotunes), then {args.warmup} "
            "untimed calls before every timed measurement; nothing timed compiles."
        ),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python benchmarks/kernel_bench.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    base = out_dir / f"kernels-{slug(device_name)}"
    table = write_report(
        out_dir,
        base.name,
        command=meta["command"],
        data={"meta": meta, "rows": rows},
        markdown=markdown(meta, rows),
        json_indent=1,
        json_newline=True,
    )
    print()
    print(table)
    print(f"wrote {base}.json and {base}.md")
    return 0

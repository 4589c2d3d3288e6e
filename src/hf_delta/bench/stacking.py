"""What resident slot buffers save: the per-layer stacking of every routed delta's packed tensors.

    python benchmarks/stacking_bench.py              # the current CUDA device, else the CPU
    python benchmarks/stacking_bench.py --cpu-smoke  # toy shapes on the CPU: proves the script works

Before resident buffers, a mixed batch over ``D`` deltas ran, in every delta-aware linear layer and every
step, a ``torch.stack`` of the ``D`` deltas' packed tensors (signs and scales; DeltaZip's values, scales and
2:4 positions) to hand the kernel one ``[D, ...]`` tensor, and the CPU path a ``torch.cat`` of the signs.
With resident buffers the kernel takes the layer's buffer as it is; what is left per layer is host work:
checking each routed delta still views its slot, the slot table, and a cache hit for the forward pass's
slot vector and tile plan. For Llama-7B layer shapes and 16 deltas this times, in one run:

* ``stack``: the old per-layer stacking for the kernel path (the bytes it copies are the ``D`` deltas'
  packed bytes);
* ``resident``: the resident path's per-layer host work, as ``DeltaLinear.forward`` does it;
* for one-pass BitDelta, the CPU path's ``torch.cat`` of the signs against reading the same rows from the
  buffer: a view when the deltas sit in consecutive slots (the usual case), else one gather (a copy too).

and the sum over one decode step of a 32-layer Llama-7B (q, k, v, o at 4096x4096; gate, up, down at
11008x4096's size). Results: ``benchmarks/results/stacking-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
from pathlib import Path

import torch

from ..layers import DeltaRouting
from ..methods.base import CompressedWeight
from ..methods.bitdelta import BitDeltaWeight
from ..methods.deltazip import DeltaZipWeight
from ..packing import lowbit_packed_width, packed_width
from ..slots import SlotBuffer
from .kernels import RESULTS_DIR, sig, slug, time_ms
from .report import environment, write_report

SHAPES = {"attn 4096x4096": (4096, 4096), "mlp 11008x4096": (11008, 4096)}
PER_DECODER_LAYER = {"attn 4096x4096": 4, "mlp 11008x4096": 3}  # q, k, v, o | gate, up, down (same size)
DECODER_LAYERS = 32
FORMATS = ("bitdelta-1bit", "deltazip-4bit", "deltazip-4bit-2:4")


def _random_weight(fmt: str, n: int, k: int, gen: torch.Generator, device: torch.device) -> CompressedWeight:
    """A delta of format ``fmt`` with random packed bytes (only their size matters to a copy), made on ``device``
    by ``gen`` (a generator of that device)."""

    def u8(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8, device=device)

    if fmt == "bitdelta-1bit":
        return BitDeltaWeight((n, k), u8(1, n, packed_width(k, 1)), torch.rand(1, n, generator=gen, device=device))
    layout = "2:4" if fmt.endswith("2:4") else "dense"
    values = k // 2 if layout == "2:4" else k
    return DeltaZipWeight(
        (n, k),
        bits=4,
        group_size=None,
        layout=layout,
        qweight=u8(n, lowbit_packed_width(values, 4)),
        scales=torch.rand(n, 1, generator=gen, device=device).half(),
        mask=u8(n, k // 8) if layout == "2:4" else None,
    )


def _stack(weights: list[CompressedWeight]) -> None:
    """The old per-layer preparation of a kernel launch: every tensor of every delta stacked."""
    if isinstance(weights[0], BitDeltaWeight):
        torch.stack([w.signs for w in weights])
        torch.stack([w._kernel_scales() for w in weights])
        return
    torch.stack([w.qweight for w in weights])
    torch.stack([w.scales for w in weights])
    if weights[0].layout == "2:4":
        torch.stack([w.mask for w in weights])


def _case(fmt: str, shape: str, n: int, k: int, deltas: int, device: torch.device, warmup: int, reps: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    own = [_random_weight(fmt, n, k, gen, device) for _ in range(deltas)]  # what the old path stacked
    names = [f"d{i}" for i in range(deltas)]
    resident = [w.shallow_copy() for w in own]
    buffer = SlotBuffer(resident[0], deltas)
    routing = DeltaRouting()
    for name, weight in zip(names, resident, strict=True):
        buffer.write(name, routing.add(name), weight)
    routing.row_slots = torch.arange(deltas, device=device)  # decode: one row per delta
    lead = torch.Size([deltas])

    def resident_path() -> None:  # DeltaLinear.forward's host work for one buffer, the plan already built
        index = [buffer.holds(name, w) for name, w in zip(names, resident, strict=True)]
        assert None not in index
        routing.slot_plan(lead, device, buffer.lut(names, len(routing.slots)), buffer.capacity)

    resident_path()  # builds the slot vector and plan once, as the first layer of a forward pass does
    packed = sum(t.numel() * t.element_size() for w in own for t in w.buffers())
    row = {
        "format": fmt,
        "layer": shape,
        "deltas": deltas,
        "packed_MB": sig(packed / 1e6),
        "stack_ms": sig(time_ms(lambda: _stack(own), device, warmup, reps)),
        "resident_ms": sig(time_ms(resident_path, device, warmup, reps)),
    }
    row["stack_vs_resident"] = sig(row["stack_ms"] / row["resident_ms"])
    if fmt == "bitdelta-1bit":  # the CPU serving path's signs: cat vs the buffer's rows (a view, or a gather)
        scattered = torch.randperm(deltas, generator=gen, device=device)
        row["cpu_cat_ms"] = sig(time_ms(lambda: torch.cat([w.signs for w in own]), device, warmup, reps))
        row["cpu_view_ms"] = sig(time_ms(lambda: buffer.tensors["signs"][0:deltas, 0], device, warmup, reps))
        row["cpu_gather_ms"] = sig(time_ms(lambda: buffer.tensors["signs"][scattered, 0], device, warmup, reps))
    return row


def _step_totals(rows: list[dict], formats: list[str]) -> list[dict]:
    """Per format: the old stacking and the resident host work summed over one 32-layer decode step."""
    out = []
    for fmt in formats:
        by_shape = {r["layer"]: r for r in rows if r["format"] == fmt}
        if set(by_shape) != set(PER_DECODER_LAYER):
            continue
        total = {
            key: DECODER_LAYERS * sum(PER_DECODER_LAYER[s] * by_shape[s][key] for s in PER_DECODER_LAYER)
            for key in ("stack_ms", "resident_ms", "packed_MB")
        }
        out.append(
            {
                "format": fmt,
                "step_stack_ms": sig(total["stack_ms"]),
                "step_resident_ms": sig(total["resident_ms"]),
                "step_copied_GB": sig(total["packed_MB"] / 1e3),
                "ratio": sig(total["stack_ms"] / total["resident_ms"]),
            }
        )
    return out


def markdown(meta: dict, rows: list[dict], steps: list[dict]) -> str:
    lines = [
        f"# Per-layer stacking vs resident slot buffers on {meta['device']}",
        "",
        f"`{meta['command']}`; torch {meta['torch']}; {meta['deltas']} deltas; median of {meta['reps']} after "
        f"{meta['warmup']} warm-up; {meta['date']}",
        "",
        "| layer | format | packed MB | stack ms | resident ms | stack / resident | CPU path: cat ms | view ms "
        "| gather ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['format']} | {r['packed_MB']:g} | {r['stack_ms']:g} | {r['resident_ms']:g} "
            f"| {r['stack_vs_resident']:g}x | {r.get('cpu_cat_ms', '')} | {r.get('cpu_view_ms', '')} "
            f"| {r.get('cpu_gather_ms', '')} |"
        )
    if steps:
        lines += [
            "",
            f"One decode step of a {DECODER_LAYERS}-layer Llama-7B (7 linear layers each):",
            "",
            "| format | stacking ms | resident ms | ratio | GB copied by stacking |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {s['format']} | {s['step_stack_ms']:g} | {s['step_resident_ms']:g} | {s['ratio']:g}x "
            f"| {s['step_copied_GB']:g} |"
            for s in steps
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="toy shapes on the CPU (tests the script)")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"where to write results ({RESULTS_DIR})")
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/stacking_bench.py", *(sys.argv[1:] if argv is None else argv)])
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if args.cpu_smoke:
        shapes, deltas, warmup, reps = {"tiny 96x80": (96, 80)}, 4, 1, 3
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="hf-delta-bench-"))
        device_name = f"{device.type}-smoke"
    else:
        shapes, deltas, warmup, reps = SHAPES, 16, 3, 15
        out_dir = args.out_dir or RESULTS_DIR
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    with torch.no_grad():
        for shape, (n, k) in shapes.items():
            for fmt in FORMATS:
                rows.append(_case(fmt, shape, n, k, deltas, device, warmup, reps))
                print(rows[-1], flush=True)
    steps = _step_totals(rows, list(FORMATS))
    meta = {
        "device": device_name,
        **environment(),
        "deltas": deltas,
        "warmup": warmup,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    name = f"stacking-{slug(device_name)}"
    table = write_report(
        out_dir,
        name,
        command=command,
        data={"meta": meta, "rows": rows, "decode_step": steps},
        markdown=markdown(meta, rows, steps),
        json_indent=1,
        json_newline=True,
    )
    print(table)
    print(f"wrote {out_dir / name}.json and .md")
    return 0

"""``hf-delta bench scale``: compression and loading at real model sizes, on synthetic Llama-shaped pairs.

For each size (``scale_pair.SHAPES``) and method, one child process compresses the fine-tune, saves the delta
and reports its own peak RSS (``ru_maxrss``), wall time, size ratio (fine-tune bf16 bytes / delta weight file
bytes) and the relative Frobenius error ``‖Δ̂ − Δ‖ / ‖Δ‖`` of a few sampled matrices (read from the two
checkpoints and the saved delta). ``load`` puts N copies of the 1-bit delta on the base
(``DeltaModel.from_pretrained``) and generates a few tokens. A setting that does not fit reports hf_delta's
``InsufficientMemoryError`` message; one that runs past ``--timeout`` or is killed is reported as such.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .options import add_bench_scale_arguments
from .scale_pair import SHAPES, pair_folders, plan_pair, write_pair

logger = logging.getLogger(__name__)

SCRIPT_DOC = """\
Compression and loading at real model sizes on synthetic Llama-shaped checkpoints (= ``hf-delta bench scale``).

    python benchmarks/scale.py --sizes 0.85b --methods bitdelta,lowrank
    python benchmarks/scale.py --sizes 7b --methods bitdelta --dry-run   # shapes and bytes, writes nothing

Writes ``benchmarks/results/scale-<sizes>.{json,md}``; see docs/scale.md.
"""

METHODS = ("bitdelta", "lowrank", "deltazip", "bitdelta-distill")
CALIBRATED = ("deltazip", "bitdelta-distill")
COLUMNS = ("size", "method", "status", "peak_rss_gb", "wall_s", "size_ratio", "rel_error", "delta_mb", "note")


def sampled_matrices(size: str) -> list[str]:
    """Module names whose reconstruction error is measured: early, middle and last layers, and the head."""
    layers = SHAPES[size][1]
    return ["model.layers.0.self_attn.q_proj", f"model.layers.{layers // 2}.mlp.down_proj",
            f"model.layers.{layers - 1}.self_attn.o_proj", "lm_head"]


def _config(method: str, args: dict[str, Any]):
    from ..methods import BitDeltaConfig, DeltaZipConfig, LowRankConfig

    if method == "bitdelta":
        return BitDeltaConfig(distill_steps=0)
    if method == "lowrank":
        return LowRankConfig(rank=args["rank"])
    if method == "deltazip":
        return DeltaZipConfig(bits=4, sparsity="2:4", calibration_samples=args["calibration"],
                              calibration_seq_len=args["seq_len"])
    return BitDeltaConfig(distill_steps=args["distill_steps"], distill_samples=args["distill_batch"],
                          distill_seq_len=args["seq_len"], distill_batch_size=args["distill_batch"])


def calibration_texts(vocab_size: int, n: int, seq_len: int, *, seed: int = 0) -> list[str]:
    """``n`` texts of ``seq_len`` random words of ``bench.synthetic.word_tokenizer`` (one token each)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab_size, (n, seq_len), generator=gen)
    return [" ".join(f"t{i}" for i in row.tolist()) for row in ids]


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _cuda_peak(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def relative_errors(base: Path, finetuned: Path, delta_dir: Path, modules: list[str]) -> dict[str, float]:
    """``‖Δ̂ − Δ‖ / ‖Δ‖`` per module, ``Δ`` = fine-tune − base as read from the checkpoints (float32)."""
    from ..storage import Delta
    from ..utils.checkpoint import Checkpoint

    delta = Delta.from_folder(delta_dir)
    b, f = Checkpoint(base), Checkpoint(finetuned)
    out = {}
    for module in modules:
        if module not in delta.weights:
            continue
        true = f.get(f"{module}.weight").float() - b.get(f"{module}.weight").float()
        approx = delta.weights[module].to_dense()
        out[module] = float((approx - true).norm() / true.norm())
    return out


def _weight_file_bytes(delta_dir: Path) -> int:
    return sum(p.stat().st_size for p in delta_dir.glob("delta_model*.safetensors"))


def _compress_child(spec: dict[str, Any]) -> dict[str, Any]:
    from ..compression import compress_delta
    from ..utils.checkpoint import Checkpoint
    from .synthetic import word_tokenizer

    base, finetuned, out = Path(spec["base"]), Path(spec["finetuned"]), Path(spec["delta_dir"])
    method, vocab = spec["method"], SHAPES[spec["size"]][3]
    losses: list[float] = []

    class _Losses(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            losses.extend(getattr(record, "refine_losses", []))

    logging.getLogger("hf_delta.compression").addHandler(_Losses())
    logging.getLogger("hf_delta.compression").setLevel(logging.INFO)
    kwargs: dict[str, Any] = {}
    if method in CALIBRATED:
        n = spec["calibration"] if method == "deltazip" else spec["distill_batch"]
        kwargs = {"calibration": calibration_texts(vocab, n, spec["seq_len"]), "tokenizer": word_tokenizer(vocab)}
    start = time.perf_counter()
    delta = compress_delta(base, finetuned, _config(method, spec), device=spec["device"], progress=False, **kwargs)
    delta.save_pretrained(out)
    row = {"wall_s": time.perf_counter() - start, "peak_rss": _peak_rss(), "cuda_peak": _cuda_peak(spec["device"])}
    del delta
    row["delta_bytes"] = _weight_file_bytes(out)
    row["finetune_bf16_bytes"] = Checkpoint(finetuned).nbytes()
    row["size_ratio"] = row["finetune_bf16_bytes"] / row["delta_bytes"]
    row["errors"] = relative_errors(base, finetuned, out, sampled_matrices(spec["size"]))
    row["rel_error"] = sum(row["errors"].values()) / max(len(row["errors"]), 1)
    if losses:
        row["loss_first"], row["loss_last"], row["loss_falls"] = losses[0], losses[-1], losses[-1] < losses[0]
    return row


def _load_child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..model import DeltaModel
    from ..utils.checkpoint import Checkpoint

    base, delta_dir, n = Path(spec["base"]), Path(spec["delta_dir"]), spec["deltas"]
    device = spec["device"]
    rss_start = _peak_rss()
    start = time.perf_counter()
    extra = {"device_map": device} if device.startswith("cuda") else {}
    model = DeltaModel.from_pretrained(base, delta_dir, "d0", **extra)
    for i in range(1, n):
        model.load_delta(delta_dir, f"d{i}")
    names = ["__base__", *(f"d{i}" for i in range(n))]
    ids = torch.randint(2, SHAPES[spec["size"]][3], (len(names), 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                       delta_names=names, max_new_tokens=spec["new_tokens"], do_sample=False, pad_token_id=0)
    row = {"wall_s": time.perf_counter() - start, "peak_rss": _peak_rss(), "rss_at_start": rss_start,
           "cuda_peak": _cuda_peak(device), "base_bf16_bytes": Checkpoint(base).nbytes(),
           "delta_bytes": n * _weight_file_bytes(delta_dir), "deltas": n}
    row["peak_over_weights"] = row["peak_rss"] / (row["base_bf16_bytes"] + row["delta_bytes"])
    return row


def child_main(spec_path: str) -> int:
    """Entry of a measurement subprocess: run the spec, write ``{"status", ...}`` to ``spec["result"]``."""
    from ..errors import InsufficientMemoryError

    spec = json.loads(Path(spec_path).read_text())
    try:
        row = _load_child(spec) if spec["method"] == "load" else _compress_child(spec)
        row["status"] = "ok"
    except InsufficientMemoryError as err:
        row = {"status": "insufficient memory", "note": str(err), "peak_rss": _peak_rss()}
    Path(spec["result"]).write_text(json.dumps(row))
    return 0


def run_child(spec: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh Python process (its peak RSS is that of the measurement alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "result": str(Path(tmp) / "result.json")}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "hf_delta.bench.scale", "--child", str(Path(tmp) / "spec.json")]
        try:
            proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "note": f"ran past --timeout {timeout:.0f} s"}
        result = Path(spec["result"])
        if proc.returncode == 0 and result.is_file():
            return json.loads(result.read_text())
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"status": "failed", "note": f"exit code {proc.returncode}: {tail[0][:300]}"}


def _row(size: str, method: str, res: dict[str, Any]) -> dict[str, Any]:
    row = {"size": size, "method": method, **res}
    row["peak_rss_gb"] = round(res["peak_rss"] / 1e9, 3) if res.get("peak_rss") else None
    if res.get("delta_bytes"):
        row["delta_mb"] = round(res["delta_bytes"] / 1e6, 2)
    if "loss_falls" in res:
        row["note"] = f"distillation loss {res['loss_first']:.4g} -> {res['loss_last']:.4g}"
    if method == "load" and res.get("status") == "ok":
        row["note"] = (f"{res['deltas']} deltas + base: peak RSS {res['peak_over_weights']:.2f}x their bytes "
                       f"({(res['base_bf16_bytes'] + res['delta_bytes']) / 1e9:.2f} GB)")
    return row


def dry_run(sizes: list[str], methods: list[str]) -> list[dict[str, Any]]:
    """Per size: parameters, bytes and shards that would be written, checked against a meta model's names."""
    from ..compression.memory import STREAM_BYTES_PER_VALUE, available_bytes

    rows = []
    for size in sizes:
        plan = plan_pair(size)
        free = available_bytes()
        rows.append({"size": size, "methods": ",".join(methods), "parameters": plan.parameters,
                     "checkpoint_gb": round(plan.bf16_bytes / 1e9, 2), "shards": len(plan.shards()),
                     "stream_need_gb": round(STREAM_BYTES_PER_VALUE * plan.largest_matrix / 1e9, 2),
                     "available_gb": None if free is None else round(free / 1e9, 1)})
    return rows


def bench_scale(args: argparse.Namespace, *, command: str) -> str:
    """Write the pairs, run every measurement in its own process, write ``scale-<sizes>.{json,md}``."""
    from .report import write_results

    if args.dry_run:
        rows = dry_run(args.sizes, args.methods)
        return write_results(rows, args.out, name=f"scale-{'-'.join(args.sizes)}-dry-run", command=command)
    work = Path(args.work_dir)
    shared = {"device": args.device, "rank": args.rank, "calibration": args.calibration, "seq_len": args.seq_len,
              "distill_steps": args.distill_steps, "distill_batch": args.distill_batch,
              "deltas": args.deltas, "new_tokens": args.new_tokens}
    rows = []
    for size in args.sizes:
        write_pair(work, size, seed=args.seed)
        base, finetuned = pair_folders(work, size, seed=args.seed)
        for method in args.methods:
            spec = {**shared, "size": size, "method": method, "base": str(base), "finetuned": str(finetuned),
                    "delta_dir": str(work / f"delta-{size}-seed{args.seed}-{method}")}
            if method == "load":
                bitdelta = work / f"delta-{size}-seed{args.seed}-bitdelta"
                if not (bitdelta / "delta_config.json").is_file():
                    run_child({**spec, "method": "bitdelta", "delta_dir": str(bitdelta)}, timeout=args.timeout)
                spec["delta_dir"] = str(bitdelta)
            logger.info("Measuring %s on %s", method, size)
            rows.append(_row(size, method, run_child(spec, timeout=args.timeout)))
            logger.info("%s", rows[-1])
    extra = {"seed": args.seed, "sampled_matrices": {s: sampled_matrices(s) for s in args.sizes}}
    return write_results(rows, args.out, name=f"scale-{'-'.join(args.sizes)}", command=command, extra=extra,
                         columns=COLUMNS, notes=_NOTES)


_NOTES = """
peak_rss_gb: the measurement process's own peak RSS (ru_maxrss), Python and torch included. size_ratio: the
fine-tune's bf16 bytes / the delta's weight file bytes. rel_error: mean over the sampled matrices of
‖Δ̂ − Δ‖ / ‖Δ‖. Synthetic pairs: see hf_delta/bench/scale_pair.py and docs/scale.md.
"""


def bench_scale_main(args: argparse.Namespace, *, command: str | None = None) -> int:
    """Run ``bench scale`` and print its Markdown table (``command`` is recorded with the results)."""
    print(bench_scale(args, command=command or " ".join(["hf-delta", *sys.argv[1:]])))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/scale.py``: the same flags as ``hf-delta bench scale``, plus ``-v``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=SCRIPT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    add_bench_scale_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return bench_scale_main(args, command=" ".join(["python benchmarks/scale.py", *argv]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        raise SystemExit(child_main(sys.argv[2]))
    raise SystemExit(main())

"""Prepare the served deltas (zoo or synthetic), run the ``bench serve`` grid, write JSON + Markdown + plot."""

from __future__ import annotations

import argparse
import gc
import logging
import math
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..evaluation import to_markdown
from ..serving.engine.config import engine_config_from_args
from .options import add_bench_serve_arguments
from .report import write_report
from .workload import (
    BenchRequest,
    BenchSettings,
    Served,
    build_workload,
    measure_load_times,
    run_engine,
    run_merged,
    run_naive,
    run_peft,
)

logger = logging.getLogger(__name__)

SCRIPT_DOC = """\
Serving benchmark: the engine vs naive swapping, all-merged and a PEFT-style loop (= ``hf-delta bench serve``).

    python benchmarks/serve.py --size small --threads 1            # the zoo, CPU
    python benchmarks/serve.py --synthetic llama-7b --deltas 1,4,16  # random Llama-7B-shaped weights, GPU

Writes ``benchmarks/results/serve-<size>.{json,md,png}``; see docs/serving.md for what each system is.
"""

ZOO_FAMILY = ("llama-arith", "llama-cipher", "llama-facts", "llama-chat")


def _compress_once(base: Path, finetune: Path, dest: Path) -> Path:
    if not (dest / "delta_config.json").is_file():
        from ..compression import compress
        from ..methods import BitDeltaConfig

        logger.info("Compressing %s for the serving benchmark", finetune.name)
        compress(base, finetune, BitDeltaConfig(distill_steps=0), progress=False).save_pretrained(dest)
    return dest


def prepare_zoo(size: str, zoo_dir: str | Path | None, work_dir: Path) -> tuple[Path, list[Served]]:
    """The zoo's Llama base and one ``Served`` per Llama fine-tune (BitDelta without distillation)."""
    from ..utils.loading import load_tokenizer
    from ..zoo.build import load_zoo, task_prompt

    zoo = load_zoo(size, zoo_dir)
    base = zoo["llama-base"].path
    served = []
    for name in ZOO_FAMILY:
        entry = zoo[name]
        delta = _compress_once(base, entry.path, work_dir / f"delta-{size}-{name}")
        tokenizer = load_tokenizer(delta if (delta / "tokenizer_config.json").is_file() else base)
        task = zoo.task(name)
        prompts = [tokenizer(task_prompt(tokenizer, task, ex), add_special_tokens=False)["input_ids"]
                   for ex in task.heldout[:32]]
        served.append(Served(name, delta, entry.path, prompts))
    return base, served


def expand(served: Sequence[Served], n: int) -> list[Served]:
    """``n`` served names cycling over ``served``: names past the first round are aliases of the same repos."""
    out = []
    for i in range(n):
        s = served[i % len(served)]
        out.append(replace(s, name=f"{s.name}-v{i // len(served)}", alias_of=s.name if i >= len(served) else None))
    return out


def _default_memory_limit(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)


def run_grid(base: Path, served: Sequence[Served], settings: BenchSettings, *, device: torch.device,
             dtype: torch.dtype, pad_id: int) -> list[dict[str, Any]]:
    """Every (number of deltas, popularity, system) of ``settings``; one row each."""
    rows = []
    limit = settings.memory_limit or _default_memory_limit(device)
    for rate in settings.rates:
        for n in settings.deltas:
            names = expand(served, n)
            for popularity in settings.popularity if n > 1 else ("uniform",):
                workload = build_workload(names, n_requests=settings.requests, rate=rate, popularity=popularity,
                                          seed=settings.seed, max_tokens=settings.max_tokens)
                for system in settings.systems:
                    logger.info("bench serve: rate %s, %d deltas, %s, %s", rate, n, popularity, system)
                    row = _run_system(system, base, names, workload, settings, limit, device=device, dtype=dtype,
                                      pad_id=pad_id)
                    rows.append({"rate": f"{rate:g}", "deltas": n, "popularity": popularity, "system": system,
                                 "distinct_repos": len({s.delta for s in names}), **row})
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


def _run_system(system: str, base: Path, names: Sequence[Served], workload: Sequence[BenchRequest],
                settings: BenchSettings, limit: int, *, device: torch.device, dtype: torch.dtype,
                pad_id: int) -> dict[str, Any]:
    kw = {"device": device, "dtype": dtype}
    if system == "engine":
        return run_engine(base, names, workload, config=replace(settings.engine), profile=settings.profile,
                          warm=settings.warm, **kw)
    if system == "naive":
        return run_naive(names, workload, pad_id=pad_id, max_batch=settings.max_batch, **kw)
    if system == "merged":
        return run_merged(names, workload, pad_id=pad_id, max_batch=settings.max_batch, memory_limit=limit, **kw)
    if system == "peft":
        return run_peft(base, names, workload, pad_id=pad_id, max_batch=settings.max_batch, **kw)
    raise ValueError(f"Unknown system {system!r}; choose from engine, naive, merged, peft.")


def ratios(rows: Sequence[dict[str, Any]], base_bytes: int) -> list[dict[str, Any]]:
    """Engine throughput over each baseline and memory over the base, per (rate, deltas, popularity)."""
    out = []
    for key in sorted({(r["rate"], r["deltas"], r["popularity"]) for r in rows}):
        group = {r["system"]: r for r in rows
                 if (r["rate"], r["deltas"], r["popularity"]) == key and "skipped" not in r}
        eng = group.get("engine")
        if eng is None:
            continue
        line: dict[str, Any] = {"rate": key[0], "deltas": key[1], "popularity": key[2]}
        for other in ("naive", "merged", "peft"):
            if other in group:
                line[f"engine_vs_{other}"] = eng["throughput_tok_s"] / group[other]["throughput_tok_s"]
        line["engine_weight_x_base"] = eng["weight_bytes"] / base_bytes
        if "merged" in group:
            line["merged_weight_x_base"] = group["merged"]["weight_bytes"] / base_bytes
        line["kv_within_budget"] = eng["kv_peak_tokens"] <= eng["kv_budget_tokens"]
        out.append(line)
    return out


_COLUMNS = ("rate", "deltas", "popularity", "system", "throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms",
            "tpot_p99_ms", "weight_mib", "peak_rss_mib", "loads", "skipped")


def write_serve_report(result: dict[str, Any], out: Path, name: str) -> str:
    """``<name>.json``, ``<name>.md`` and (with matplotlib) ``<name>.png`` under ``out``; returns the Markdown."""
    rows = [{**r, "weight_mib": r.get("weight_bytes", 0) / 2**20 if "weight_bytes" in r else None,
             "peak_rss_mib": r["peak_rss_bytes"] / 2**20 if r.get("peak_rss_bytes") else None}
            for r in result["rows"]]
    meta = result["meta"]
    md = [f"`{meta['command']}`", "", f"{meta['note']}", "", to_markdown(rows, _COLUMNS), "",
          "Ratios (engine throughput over each system; weights counted by the engine over the base's):", "",
          to_markdown(result["ratios"]), "", "Load time from local disk to ready (median):", "",
          to_markdown([result["load_time"]]), ""]
    return write_report(out, name, command=meta["command"], data=result, markdown="\n".join(md),
                        plot=lambda path: plot(result["rows"], path), json_default=str)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Throughput against the number of deltas, one line per system, one panel per (rate, popularity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["rate"], r["popularity"]) for r in rows if r["deltas"] > 1}) or sorted(
        {(r["rate"], r["popularity"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (rate, pop) in zip(axes[0], panels, strict=True):
        for system in dict.fromkeys(r["system"] for r in rows):
            pts = sorted((r["deltas"], r["throughput_tok_s"]) for r in rows if r["system"] == system
                         and r["rate"] == rate and "throughput_tok_s" in r
                         and (r["popularity"] == pop or r["deltas"] == 1))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("deltas served")
        ax.set_ylabel("throughput (tokens/s)")
        ax.set_title(f"{pop} popularity, {'all requests at once' if rate == 'inf' else f'{rate} requests/s'}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_serve(*, size: str | None, zoo_dir: str | Path | None, synthetic: str | None, settings: BenchSettings,
                out: str | Path, work_dir: str | Path, device: str | None, dtype: str | None, command: str,
                load_repeats: int = 5) -> str:
    """Run the whole benchmark and write its results; returns the Markdown."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    if synthetic:
        from .synthetic import prepare_synthetic

        torch_dtype = getattr(torch, dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
        base, served, pad_id = prepare_synthetic(synthetic, work, device=dev, dtype=torch_dtype)
        label = f"synthetic-{synthetic}"
        note = (f"Synthetic {synthetic}-shaped random base and one random BitDelta delta registered under every "
                "name; the 'fine-tune' checkpoint loaded by naive/merged is the base checkpoint itself (same size "
                "and load cost; outputs are not compared).")
    else:
        from ..utils.loading import load_tokenizer

        torch_dtype = getattr(torch, dtype or "float32")
        base, served = prepare_zoo(size or "small", zoo_dir, work)
        pad_id = load_tokenizer(base).pad_token_id
        label = size or "small"
        note = (f"{len(served)} distinct Llama fine-tunes of the {label} zoo (BitDelta, no distillation); with more "
                "served names than that, names cycle over them (`-vK` aliases: separate copies in every system, "
                "same weights).")
    rows = run_grid(base, served, settings, device=dev, dtype=torch_dtype, pad_id=pad_id)
    from transformers import AutoModelForCausalLM

    from .workload import model_bytes

    base_bytes = model_bytes(AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype))
    result = {
        "meta": {"command": command, "note": note, "device": str(dev), "dtype": str(torch_dtype),
                 "python": platform.python_version(), "torch": torch.__version__,
                 "cuda": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                 "threads": torch.get_num_threads(), "base_weight_bytes": base_bytes,
                 "settings": {**asdict(settings), "engine": asdict(settings.engine)}},
        "rows": rows,
        "ratios": ratios(rows, base_bytes),
        "load_time": measure_load_times(base, served[0], device=dev, dtype=torch_dtype, repeats=load_repeats),
    }
    profiles = [{"rate": r["rate"], "deltas": r["deltas"], "popularity": r["popularity"], **r.pop("profile")}
                for r in rows if "profile" in r]
    for r in rows:
        for k, v in list(r.items()):
            if isinstance(v, float) and not math.isfinite(v):
                r[k] = None
    if profiles:
        write_profile_report(profiles, Path(out), f"profile-{label}", command=command, device=dev)
    return write_serve_report(result, Path(out), f"serve-{label}")


def write_profile_report(profiles: Sequence[dict[str, Any]], out: Path, name: str, *, command: str,
                         device: torch.device) -> str:
    """``<name>.json`` and ``<name>.md``: where each profiled engine's decode step spends its time."""
    from .step_profile import CATEGORIES, profile_markdown

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    md = [f"`{command}`", "", f"Decode steps of each engine after its timed run ({gpu or 'CPU'}), milliseconds per "
          f"step by category ({', '.join(CATEGORIES)}; host = wall time the device is idle; see "
          "hf_delta/bench/step_profile.py). Profiled steps run eagerly; graphs_wall_ms is the same step replaying "
          "CUDA graphs.", "", profile_markdown(profiles), ""]
    data = {"meta": {"command": command, "device": str(device), "gpu": gpu}, "rows": list(profiles)}
    return write_report(out, name, command=command, data=data, markdown="\n".join(md))


def bench_serve_main(args: argparse.Namespace, *, command: str | None = None) -> int:
    """Run ``bench serve`` and print its Markdown table (``command`` is recorded with the results)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(deltas=args.deltas, popularity=args.popularity, systems=args.systems,
                             requests=args.requests, rates=args.rate, max_tokens=args.max_tokens, seed=args.seed,
                             max_batch=args.max_batch or args.max_running, profile=args.profile, warm=args.warm,
                             engine=engine_config_from_args(args))
    print(bench_serve(size=args.size, zoo_dir=args.dir, synthetic=args.synthetic, settings=settings, out=args.out,
                      work_dir=args.work_dir, device=args.device, dtype=args.dtype, load_repeats=args.load_repeats,
                      command=command or " ".join(["hf-delta", *sys.argv[1:]])))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/serve.py``: the same flags as ``hf-delta bench serve``, plus ``-v``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=SCRIPT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    add_bench_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return bench_serve_main(args, command=" ".join(["python benchmarks/serve.py", *argv]))

"""``hf-delta bench coserve``: inference and LoRA fine-tuning on one engine, four ways, on the zoo.

Systems, one fresh engine each, all on the same seeded Poisson inference workload (``bench.build_workload``
over the zoo's BitDelta deltas) and the same fine-tuning job (the arithmetic task's training pairs, same LoRA,
same seed):

* ``inference``: the workload alone (TPOT/TTFT reference);
* ``finetune``: the job alone, one whole training step per engine step (peak fine-tuning throughput);
* ``coserve``: the workload with the job co-served under a TPOT SLO (``slo_factor`` × inference's TPOT p50);
* ``turns``: naive turn-taking, one whole training step between decode steps.

Fine-tuning throughput counts trained (loss) tokens of finished optimizer steps per second of the run (for the
systems with inference, from the first arrival to the last completion). Activation memory compares one
co-served sequence's saved layer inputs + one layer's recompute with standard PEFT training of the same batch
(bytes autograd saves, parameters excluded).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..serving.engine.engine import Engine, EngineConfig
from ..serving.engine.sampling import SamplingParams
from ..serving.training.budget import CoServeScheduler
from ..serving.training.jobs import IGNORE, Hyperparameters, batches
from ..serving.training.state import SavedTensorMeter
from ..serving.training.trainer import CoServingTrainer
from .serve import prepare_zoo
from .workload import BenchRequest, build_workload, drive_engine, summarize

logger = logging.getLogger(__name__)


@dataclass
class CoserveSettings:
    """What ``bench coserve`` runs (the CLI fills it from its flags)."""

    requests: int = 64
    rate: float = 2.0
    max_tokens: int = 32
    seed: int = 0
    slo_factor: float = 1.15
    idle_factor: float = 4.0
    finetune_steps: int = 30
    lora_r: int = 8
    batch_size: int = 4
    learning_rate: float = 2e-3
    engine: EngineConfig | None = None


def _job(trainer: CoServingTrainer, pairs: list[dict[str, str]], settings: CoserveSettings, out: Path):
    from peft import LoraConfig

    lora = LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, target_modules="all-linear")
    hyper = Hyperparameters(batch_size=settings.batch_size, learning_rate=settings.learning_rate, n_epochs=1000,
                            seed=settings.seed, max_length=64)
    return trainer.submit(lora=lora, data=pairs, output_dir=out, hyperparameters=hyper)


def _drive(engine: Engine, workload: list[BenchRequest], job=None) -> dict[str, Any]:
    """Run ``workload`` on ``engine``; with a co-served ``job``, add its fine-tuning progress in that window."""
    done, t0 = drive_engine(engine, workload)
    row = summarize(workload, done, t0)
    if job is not None:
        start, end = t0 + min(r.arrival for r in workload), max(d.finish for d in done.values())
        row.update(_ft_stats(job, start, end))
    return row


def _ft_stats(job, start: float, end: float) -> dict[str, Any]:
    """Fine-tuning tokens/s of optimizer steps that finished in ``[start, end]`` (monotonic clock)."""
    trained = sum(h["tokens"] for h in job.history if start <= h["wall"] <= end)
    steps = sum(1 for h in job.history if start <= h["wall"] <= end)
    return {"ft_steps": steps, "ft_tokens": trained, "ft_tokens_s": trained / (end - start),
            "ft_final_loss": job.history[-1]["loss"] if job.history else None,
            "activation_bytes": max((h["activation_bytes"] for h in job.history), default=None)}


def _finetune_alone(engine: Engine, job, steps: int) -> dict[str, Any]:
    """``steps`` optimizer steps after a first one (job start-up and first-call costs are not counted)."""
    while not job.history and not job.finished:
        engine.step()
    start = time.monotonic()
    while len(job.history) < steps + 1 and not job.finished:
        engine.step()
    row = _ft_stats(job, start, time.monotonic())
    row["seconds"] = time.monotonic() - start
    return row


def peft_activation_bytes(base: str | Path, job) -> int:
    """Bytes autograd saves when standard PEFT trains the job's first batch (parameters excluded)."""
    from peft import LoraConfig, get_peft_model

    from ..utils.loading import load_model

    model = get_peft_model(load_model(base), LoraConfig(r=job.lora.r, lora_alpha=job.lora.alpha,
                                                        target_modules=job.lora.modules))
    batch = next(batches(job.examples, job.hyper))
    width = max(len(e.inputs) + 1 for e in batch)
    ids = torch.ones((len(batch), width), dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(batch):
        ids[i, : len(e.inputs) + 1] = torch.tensor([*e.inputs, e.targets[-1]])
        labels[i, : len(e.inputs) + 1] = torch.tensor([IGNORE, *e.targets])
        mask[i, : len(e.inputs) + 1] = 1
    with SavedTensorMeter(exclude=list(model.parameters())) as meter:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return meter.bytes


def bench_coserve(*, size: str = "small", zoo_dir: str | Path | None = None, settings: CoserveSettings,
                  out: str | Path = "benchmarks/results", work_dir: str | Path, command: str,
                  device: str | None = None) -> str:
    """Run the four systems and write ``coserve-<size>.{json,md,png}``; returns the Markdown.

    ``device``: where the engines run (default: CUDA when there is a GPU, else the CPU).
    """
    from ..zoo.build import load_zoo
    from .report import write_results

    work = Path(work_dir)
    base, served = prepare_zoo(size, zoo_dir, work)
    task = load_zoo(size, zoo_dir).task("llama-arith")
    pairs = [{"prompt": ex.prompt, "response": ex.answer} for ex in task.train]
    workload = build_workload(served, n_requests=settings.requests, rate=settings.rate, popularity="uniform",
                              seed=settings.seed, max_tokens=settings.max_tokens)
    config = settings.engine or EngineConfig(device_slots=8, cpu_slots=8, kv_cache_tokens=8192, max_running=64)
    deltas = {s.name: s.delta for s in served}

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def engine() -> Engine:
        e = Engine(base, deltas=deltas, config=config, device=dev)
        e.generate([[1, 2, 3]], model=[served[0].name], params=SamplingParams(max_tokens=2))  # warm-up
        return e

    rows: list[dict[str, Any]] = []
    curves: dict[str, list[dict[str, float]]] = {}
    logger.info("bench coserve: inference alone")
    alone = _drive(engine(), workload)
    rows.append({"system": "inference", **alone})
    slo_ms = settings.slo_factor * alone["tpot_p50_ms"]
    logger.info("bench coserve: fine-tuning alone")
    eng = engine()
    job = _job(CoServingTrainer(eng, policy="turns"), pairs, settings, work / "coserve-ft-alone")
    ft = _finetune_alone(eng, job, settings.finetune_steps)
    eng.trainer.cancel(job.id)
    eng.step()
    rows.append({"system": "finetune", **ft})
    curves["finetune"] = job.history
    peft_bytes = peft_activation_bytes(base, job)
    for policy in ("coserve", "turns"):
        logger.info("bench coserve: %s", policy)
        eng = engine()
        sched = CoServeScheduler(tpot_slo_ms=slo_ms, idle_step_ms=settings.idle_factor * slo_ms)
        trainer = CoServingTrainer(eng, scheduler=sched, policy=policy)
        job = _job(trainer, pairs, settings, work / f"coserve-ft-{policy}")
        row = _drive(eng, workload, job)
        trainer.cancel(job.id)
        eng.step()
        row.update(tpot_slo_ms=slo_ms if policy == "coserve" else None, paused_steps=trainer.counters["paused_steps"],
                   step_model=sched.model.as_dict() if policy == "coserve" else None)
        rows.append({"system": policy, **row})
        curves[policy] = job.history
    summary = _summary(rows, peft_bytes)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k) for k in columns} for r in rows]  # every row with every column (the table's header)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    settings_json = {k: v for k, v in vars(settings).items() if k != "engine"}
    notes = "\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items()) + "\n"
    losses = {k: [{"step": h["step"], "loss": h["loss"], "time": h["time"]} for h in v] for k, v in curves.items()}
    return write_results(rows, out, name=f"coserve-{size}", command=command, notes=notes,
                         plot=lambda path: _plot(rows, curves, path),
                         extra={"summary": summary, "device": str(dev), "gpu": gpu, "settings": settings_json,
                                "loss_curves": losses})


def _summary(rows: list[dict[str, Any]], peft_bytes: int) -> dict[str, Any]:
    by = {r["system"]: r for r in rows}
    inf, ft, co, turns = by["inference"], by["finetune"], by["coserve"], by["turns"]
    ours = co.get("activation_bytes") or ft.get("activation_bytes")
    return {
        "ft_throughput_kept_coserve": co["ft_tokens_s"] / ft["ft_tokens_s"],
        "ft_throughput_kept_turns": turns["ft_tokens_s"] / ft["ft_tokens_s"],
        "tpot_p99_ratio_coserve": co["tpot_p99_ms"] / inf["tpot_p99_ms"],
        "tpot_p99_ratio_turns": turns["tpot_p99_ms"] / inf["tpot_p99_ms"],
        "activation_bytes_coserve": ours, "activation_bytes_peft": peft_bytes,
        "activation_memory_factor": peft_bytes / ours if ours else None,
    }


def _plot(rows: list[dict[str, Any]], curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    names = [r["system"] for r in rows]
    ax1.bar(names, [r.get("tpot_p99_ms") or 0 for r in rows], color="tab:blue")
    ax1.set_ylabel("TPOT p99 (ms)")
    ax2.bar(names, [r.get("ft_tokens_s") or 0 for r in rows], color="tab:orange")
    ax2.set_ylabel("fine-tuning tokens/s")
    for name, hist in curves.items():
        ax3.plot([h["time"] for h in hist], [h["loss"] for h in hist], label=name)
    ax3.set_xlabel("seconds since the job started")
    ax3.set_ylabel("training loss")
    ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_coserve_main(args, *, command: str) -> int:
    """Run ``bench coserve`` from parsed flags and print its Markdown."""
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = CoserveSettings(requests=args.requests, rate=args.rate, max_tokens=args.max_tokens, seed=args.seed,
                               slo_factor=args.slo_factor, idle_factor=args.idle_factor,
                               finetune_steps=args.finetune_steps)
    print(bench_coserve(size=args.size, zoo_dir=args.dir, settings=settings, out=args.out, work_dir=args.work_dir,
                        command=command, device=args.device))
    return 0

"""``hf-delta bench coserve``: inference and LoRA fine-tuning on one engine, four ways, on the zoo or on a
synthetic model of a real shape.

Systems, one fresh engine each, all on the same seeded Poisson inference workload (``bench.build_workload``
over BitDelta deltas) and the same fine-tuning job (same LoRA, same seed):

* ``inference``: the workload alone (TPOT/TTFT reference);
* ``finetune``: the job alone, one whole training step per engine step (peak fine-tuning throughput);
* ``coserve``: the workload with the job co-served under a TPOT SLO (``slo_factor`` × inference's TPOT p50);
* ``turns``: naive turn-taking, one whole training step between decode steps.

On the zoo, the deltas are its Llama fine-tunes' and the job trains every linear layer on the arithmetic task's
training pairs. With ``synthetic`` (e.g. ``llama-7b``: ``bench.synthetic``'s random Llama-7B-shaped base and a
random 1-bit delta served under ``deltas`` names) the job trains LoRA on every linear layer of the last
``lora_layers`` decoder layers, on random texts of ``max_length`` tokens (every token trained): the shapes and
lengths of a real job, where a step's time is the GPU's rather than the host's.

Fine-tuning throughput counts trained (loss) tokens of finished optimizer steps per second of the run (for the
systems with inference, from the first arrival to the last completion). Activation memory compares one
co-served sequence's saved layer inputs + one layer's recompute with standard PEFT training of the same batch
(bytes autograd saves, parameters excluded).
"""

from __future__ import annotations

import gc
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
from .serve import expand, prepare_zoo
from .workload import BenchRequest, Served, build_workload, drive_engine, summarize

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
    max_length: int = 64  # tokens per training sequence (synthetic texts have exactly this many)
    lora_layers: int | None = None  # LoRA on the last this many decoder layers (None: every layer)
    deltas: int = 4  # served names of the synthetic delta
    cuda_graphs: bool = True  # inference-only decode steps replayed as CUDA graphs (co-served steps run eagerly)
    engine: EngineConfig | None = None


def _targets(settings: CoserveSettings, num_layers: int) -> str:
    """LoRA's ``target_modules``: every linear layer, or a pattern of those in the last ``lora_layers`` layers."""
    if settings.lora_layers is None:
        return "all-linear"
    first = max(0, num_layers - settings.lora_layers)
    return rf"model\.layers\.({'|'.join(str(i) for i in range(first, num_layers))})\..*"


def _job(trainer: CoServingTrainer, data: list[Any], settings: CoserveSettings, out: Path):
    from peft import LoraConfig

    num_layers = trainer.engine.model.config.num_hidden_layers
    lora = LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r,
                      target_modules=_targets(settings, num_layers))
    hyper = Hyperparameters(batch_size=settings.batch_size, learning_rate=settings.learning_rate, n_epochs=1000,
                            seed=settings.seed, max_length=settings.max_length)
    return trainer.submit(lora=lora, data=data, output_dir=out, hyperparameters=hyper)


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


def _finetune_alone_run(eng: Engine, data: list[Any], settings: CoserveSettings, work: Path) -> tuple[dict, Any]:
    """The ``finetune`` system on ``eng`` (its row and the job); nothing of it outlives the call but the job."""
    job = _job(CoServingTrainer(eng, policy="turns"), data, settings, work / "coserve-ft-alone")
    row = _finetune_alone(eng, job, settings.finetune_steps)
    eng.trainer.cancel(job.id)
    eng.step()
    return row, job


def _coserve_run(eng: Engine, policy: str, workload: list[BenchRequest], data: list[Any], settings: CoserveSettings,
                 slo_ms: float, work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``coserve`` or ``turns`` system on ``eng``: its row and the job's loss history."""
    sched = CoServeScheduler(tpot_slo_ms=slo_ms, idle_step_ms=settings.idle_factor * slo_ms)
    trainer = CoServingTrainer(eng, scheduler=sched, policy=policy)
    job = _job(trainer, data, settings, work / f"coserve-ft-{policy}")
    row = _drive(eng, workload, job)
    trainer.cancel(job.id)
    eng.step()
    row.update(tpot_slo_ms=slo_ms if policy == "coserve" else None, paused_steps=trainer.counters["paused_steps"],
               step_model=sched.model.as_dict() if policy == "coserve" else None)
    return row, job.history


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


def random_texts(count: int, length: int, vocab_size: int, *, seed: int) -> list[str]:
    """``count`` texts of ``length`` random words of ``bench.synthetic.word_tokenizer`` (one token each)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab_size, (count, length), generator=gen)
    return [" ".join(f"t{i}" for i in row) for row in ids.tolist()]


def _prepare(size: str, zoo_dir: str | Path | None, synthetic: str | None, settings: CoserveSettings, work: Path,
             device: torch.device, dtype: torch.dtype) -> tuple[Path, list[Served], list[Any], str]:
    """The base, the served deltas, the fine-tuning data and the results' label."""
    if synthetic is None:
        from ..zoo.build import load_zoo

        base, served = prepare_zoo(size, zoo_dir, work)
        task = load_zoo(size, zoo_dir).task("llama-arith")
        return base, served, [{"prompt": ex.prompt, "response": ex.answer} for ex in task.train], size
    from .synthetic import SHAPES, prepare_synthetic

    base, served, _ = prepare_synthetic(synthetic, work, device=device, dtype=dtype)
    # One token fewer than max_length: the end-of-sequence token tokenize_dataset appends makes it max_length.
    texts = random_texts(4 * settings.batch_size, settings.max_length - 1, SHAPES[synthetic]["vocab_size"],
                         seed=settings.seed)
    return base, expand(served, settings.deltas), texts, f"synthetic-{synthetic}"


def bench_coserve(*, size: str = "small", zoo_dir: str | Path | None = None, settings: CoserveSettings,
                  out: str | Path = "benchmarks/results", work_dir: str | Path, command: str,
                  device: str | None = None, synthetic: str | None = None, dtype: str | None = None) -> str:
    """Run the four systems and write ``coserve-<size>.{json,md,png}`` (``coserve-synthetic-<shape>.*`` with
    ``synthetic``); returns the Markdown.

    ``device``: where the engines run (default: CUDA when there is a GPU, else the CPU). ``dtype``: of the base
    (default bfloat16 on CUDA for a synthetic model, else float32).
    """
    from .report import write_results

    work = Path(work_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype or ("bfloat16" if synthetic and dev.type == "cuda" else "float32"))
    base, served, data, label = _prepare(size, zoo_dir, synthetic, settings, work, dev, torch_dtype)
    workload = build_workload(served, n_requests=settings.requests, rate=settings.rate, popularity="uniform",
                              seed=settings.seed, max_tokens=settings.max_tokens)
    config = settings.engine or EngineConfig(device_slots=8, cpu_slots=8, kv_cache_tokens=8192, max_running=64,
                                             cuda_graphs=settings.cuda_graphs)
    deltas = {s.name: s.delta for s in served}
    previous: list[Engine] = []

    def engine() -> Engine:
        for old in previous:  # one model in memory at a time (a 7B base is most of a GPU's)
            old.close()
        previous.clear()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        e = Engine(base, deltas=deltas, config=config, device=dev, dtype=torch_dtype)
        e.generate([[1, 2, 3]], model=[served[0].name], params=SamplingParams(max_tokens=2))  # warm-up
        previous.append(e)
        return e

    rows: list[dict[str, Any]] = []
    curves: dict[str, list[dict[str, float]]] = {}
    logger.info("bench coserve: inference alone")
    alone = _drive(engine(), workload)
    rows.append({"system": "inference", **alone})
    slo_ms = settings.slo_factor * alone["tpot_p50_ms"]
    logger.info("bench coserve: fine-tuning alone")
    ft, job = _finetune_alone_run(engine(), data, settings, work)
    rows.append({"system": "finetune", **ft})
    curves["finetune"] = job.history
    # Standard PEFT training of a 7B-shaped model runs on the CPU here: measured on the zoo only.
    peft_bytes = peft_activation_bytes(base, job) if synthetic is None else None
    for policy in ("coserve", "turns"):
        logger.info("bench coserve: %s", policy)
        row, curves[policy] = _coserve_run(engine(), policy, workload, data, settings, slo_ms, work)
        rows.append({"system": policy, **row})
    for old in previous:
        old.close()
    summary = _summary(rows, peft_bytes)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k) for k in columns} for r in rows]  # every row with every column (the table's header)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    settings_json = {k: v for k, v in vars(settings).items() if k != "engine"}
    notes = "\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items()) + "\n"
    losses = {k: [{"step": h["step"], "loss": h["loss"], "time": h["time"]} for h in v] for k, v in curves.items()}
    return write_results(rows, out, name=f"coserve-{label}", command=command, notes=notes,
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
        "activation_memory_factor": peft_bytes / ours if ours and peft_bytes else None,
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
    synthetic = args.synthetic is not None  # a real job's shape: longer sequences, LoRA on the last layers
    settings = CoserveSettings(requests=args.requests, rate=args.rate, max_tokens=args.max_tokens, seed=args.seed,
                               slo_factor=args.slo_factor, idle_factor=args.idle_factor,
                               finetune_steps=args.finetune_steps,
                               max_length=args.max_length or (512 if synthetic else 64),
                               lora_layers=args.lora_layers or (4 if synthetic else None), deltas=args.deltas,
                               cuda_graphs=args.cuda_graphs)
    print(bench_coserve(size=args.size, zoo_dir=args.dir, settings=settings, out=args.out, work_dir=args.work_dir,
                        command=command, device=args.device, synthetic=args.synthetic, dtype=args.dtype))
    return 0

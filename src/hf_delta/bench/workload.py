"""``hf-delta bench serve``: the engine against three ways of serving many fine-tunes without it.

Systems, all fed the same seeded Poisson workload (token ids, arrival times, fixed output lengths):

* ``engine``: this package (continuous batching, per-token delta slots, residency tiers).
* ``naive``: "vanilla Hugging Face" swapping: batches of one fine-tune's requests, and switching fine-tune
  means loading that fine-tune's full weights from local disk (``from_pretrained``), then ``generate``.
* ``merged``: every fine-tune loaded in full and kept resident (the memory-hungry upper bound; skipped when
  it does not fit), batches of one fine-tune's requests with ``generate``.
* ``peft``: a ``DeltaModel`` with all deltas attached and ``generate(delta_names=[...])`` over mixed static
  batches: PEFT's per-adapter loop, no continuous batching.

Throughput is generated tokens over the time from the first arrival to the last completion; TTFT is
measured from each request's scheduled arrival; per-token latency is (finish - first token) / (tokens - 1).
"""

from __future__ import annotations

import gc
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from ..model import DeltaModel
from ..serving.engine.engine import Engine, EngineConfig, process_rss
from ..serving.engine.sampling import SamplingParams
from ..storage import Delta
from ..utils.sizes import model_bytes, storage_bytes


@dataclass
class BenchRequest:
    """One request of a workload: which served name, its prompt ids, when it arrives (seconds from start)."""

    index: int
    name: str
    prompt_ids: list[int]
    arrival: float
    max_tokens: int


@dataclass
class Served:
    """A served name: its delta repo and the full fine-tune it was compressed from (for the baselines)."""

    name: str
    delta: Path
    finetune: Path
    prompts: list[list[int]]
    alias_of: str | None = None  # several names may share one delta/fine-tune (said so in the results)


def build_workload(served: Sequence[Served], *, n_requests: int, rate: float, popularity: str, seed: int,
                   max_tokens: int) -> list[BenchRequest]:
    """Poisson arrivals at ``rate`` requests/s; names drawn uniformly or Zipf(1)-skewed (``popularity``)."""
    rng = random.Random(seed)
    weights = [1.0] * len(served) if popularity == "uniform" else [1.0 / (i + 1) for i in range(len(served))]
    t, out = 0.0, []
    for i in range(n_requests):
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
        s = rng.choices(served, weights=weights)[0]
        out.append(BenchRequest(i, s.name, list(rng.choice(s.prompts)), t, max_tokens))
    return out


@dataclass
class _Done:
    first: float
    finish: float
    tokens: int


class _PeakRSS:
    """Sample the process RSS every few milliseconds in a thread; ``peak`` is the highest seen."""

    def __init__(self, every: float = 0.005):
        self.peak = process_rss() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, process_rss() or 0)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def summarize(workload: Sequence[BenchRequest], done: dict[int, _Done], t0: float) -> dict[str, Any]:
    """Throughput, TTFT and per-token latency percentiles of a finished run (times relative to ``t0``)."""
    start = t0 + min(r.arrival for r in workload)
    end = max(d.finish for d in done.values())
    tokens = sum(d.tokens for d in done.values())
    ttft = [done[r.index].first - (t0 + r.arrival) for r in workload]
    tpot = [(d.finish - d.first) / (d.tokens - 1) for d in done.values() if d.tokens > 1]
    return {"requests": len(done), "tokens": tokens, "seconds": end - start, "throughput_tok_s": tokens / (end - start),
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "tpot_p50_ms": 1e3 * _pct(tpot, 50) if tpot else None,
            "tpot_p99_ms": 1e3 * _pct(tpot, 99) if tpot else None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _cuda_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None



def load_full(folder: str | Path, *, device: torch.device, dtype: torch.dtype):
    """A full checkpoint from local disk straight onto ``device`` (what a vanilla Hugging Face server does)."""
    if device.type == "cuda":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=str(device)).eval()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def checkpoint_numel(folder: str | Path) -> int:
    """Number of values in a checkpoint's safetensors files (read from their headers, not loaded)."""
    from safetensors import safe_open

    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


# ------------------------------------------------------------------------------------------------ engine
def drive_engine(engine: Engine, workload: Sequence[BenchRequest], *,
                 after_step: Callable[[], None] | None = None) -> tuple[dict[int, _Done], float]:
    """Submit each request at its arrival time and step ``engine`` until all are done; returns their timings
    and the start of the clock (``time.monotonic``)."""
    params = {n: SamplingParams(max_tokens=n, ignore_eos=True) for n in {r.max_tokens for r in workload}}
    handles: dict[int, Any] = {}
    pending = sorted(workload, key=lambda r: r.arrival)
    i = 0
    t0 = time.monotonic()
    while i < len(pending) or not all(h.done for h in handles.values()):
        now = time.monotonic() - t0
        while i < len(pending) and pending[i].arrival <= now:
            r = pending[i]
            handles[r.index] = engine.submit(r.name, r.prompt_ids, params=params[r.max_tokens])
            i += 1
        if engine.step() == 0:
            idle = not engine.scheduler.has_work()
            wait = pending[i].arrival - now if idle and i < len(pending) else 0.0005
            time.sleep(max(0.0, min(wait, 0.01)))
        if after_step is not None:
            after_step()
    done = {}
    for idx, h in handles.items():
        res = h.result()
        done[idx] = _Done(res.timing["first_token"], res.timing["finished"], res.completion_tokens)
    return done, t0


def run_engine(base: str | Path, served: Sequence[Served], workload: Sequence[BenchRequest], *,
               config: EngineConfig, device: torch.device, dtype: torch.dtype, profile: bool = False,
               warm: bool = False) -> dict[str, Any]:
    """Drive an ``Engine`` step by step, submitting each request at its arrival time; with ``profile``, then
    profile decode steps of its first requests (``row["profile"]``, see ``bench.step_profile``).

    The engine first runs one request on the base. With ``warm``, it first runs the workload's requests at once
    (4 tokens each) over every served name in turn instead: the deltas that fit the device slots are loaded and
    attached, and the kernels compiled and tuned for those batches, before the timed window (which then measures
    steady-state serving; ``loads`` counts only the loads inside it).
    """
    engine = Engine(base, deltas={s.name: s.delta for s in served}, config=config, device=device, dtype=dtype)
    if warm:
        names = [served[i % len(served)].name for i in range(max(len(workload), len(served)))]
        prompts = [workload[i % len(workload)].prompt_ids for i in range(len(names))]
        engine.generate(prompts, model=names, params=SamplingParams(max_tokens=4, ignore_eos=True))
    else:
        engine.generate([[1, 2, 3]], params=SamplingParams(max_tokens=2))  # warm-up on the base only
    warm_loads = engine.residency.counters["loads"]
    engine.counters.update(steps=0, tokens=0, generated=0)
    _reset_cuda_peak(device)
    weight_peak = 0

    def sample_weights() -> None:
        nonlocal weight_peak
        if engine.counters["steps"] % 8 == 0:
            weight_peak = max(weight_peak, engine.residency.weight_bytes()["total"])

    with _PeakRSS() as rss:
        done, t0 = drive_engine(engine, workload, after_step=sample_weights)
        _sync(device)
    row = summarize(workload, done, t0)
    weight_peak = max(weight_peak, engine.residency.weight_bytes()["total"])
    row.update(weight_bytes=weight_peak, peak_rss_bytes=rss.peak, cuda_peak_bytes=_cuda_peak(device),
               kv_budget_tokens=engine.cache.capacity, kv_budget_bytes=engine.cache.nbytes,
               kv_peak_tokens=engine.cache.peak_used_tokens,
               loads=engine.residency.counters["loads"] - warm_loads, attaches=engine.residency.counters["attaches"],
               preemptions=engine.scheduler.preemptions, steps=engine.counters["steps"])
    if engine.graphs is not None:
        row.update({f"graph_{k}": v for k, v in engine.graphs.counters.items()})
    if profile:
        from .step_profile import profile_decode

        first = workload[: min(len(workload), config.max_running, 32)]
        row["profile"] = profile_decode(engine, [(r.name, r.prompt_ids) for r in first])
    engine.close()
    return row


# ---------------------------------------------------------------------------------------------- baselines
class _Clock(BaseStreamer):
    """A ``generate`` streamer that only records when each step's tokens came out."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass


def _generate(model, batch: Sequence[BenchRequest], *, pad_id: int, device: torch.device, **kwargs) -> dict[int, _Done]:
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[row, width - len(r.prompt_ids):] = 1
    longest = max(r.max_tokens for r in batch)
    clock = _Clock()
    with torch.inference_mode():
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                       min_new_tokens=longest, do_sample=False, pad_token_id=pad_id, streamer=clock, **kwargs)
    _sync(device)
    steps = clock.times[1:]  # the first put is the prompt
    return {r.index: _Done(steps[0], steps[r.max_tokens - 1], r.max_tokens) for r in batch}


def _static_batches(workload: Sequence[BenchRequest], pick: Callable[[list[BenchRequest]], list[BenchRequest]],
                    run: Callable[[list[BenchRequest]], dict[int, _Done]]) -> tuple[dict[int, _Done], float]:
    """Serve arrived requests in batches chosen by ``pick``; each batch runs to completion."""
    pending = sorted(workload, key=lambda r: r.arrival)
    queue: list[BenchRequest] = []
    done: dict[int, _Done] = {}
    i = 0
    t0 = time.monotonic()
    while len(done) < len(workload):
        now = time.monotonic() - t0
        while i < len(pending) and pending[i].arrival <= now:
            queue.append(pending[i])
            i += 1
        if not queue:
            time.sleep(max(0.0, min(pending[i].arrival - now, 0.01)))
            continue
        batch = pick(queue)
        for r in batch:
            queue.remove(r)
        done.update(run(batch))
    return done, t0


def _same_name_batch(max_batch: int) -> Callable[[list[BenchRequest]], list[BenchRequest]]:
    def pick(queue: list[BenchRequest]) -> list[BenchRequest]:
        name = queue[0].name  # the oldest request's fine-tune, with every queued request for it
        return [r for r in queue if r.name == name][:max_batch]

    return pick


def run_naive(served: Sequence[Served], workload: Sequence[BenchRequest], *, pad_id: int, max_batch: int,
              device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Swap whole fine-tunes: load from local disk whenever the next batch is for another name."""
    folders = {s.name: s.finetune for s in served}
    state: dict[str, Any] = {"name": None, "model": None, "loads": 0, "load_seconds": 0.0, "bytes": 0}

    def run(batch: list[BenchRequest]) -> dict[int, _Done]:
        name = batch[0].name
        if state["name"] != name:
            state["model"] = None
            gc.collect()
            start = time.perf_counter()
            state["model"] = load_full(folders[name], device=device, dtype=dtype)
            _sync(device)
            state["load_seconds"] += time.perf_counter() - start
            state["loads"] += 1
            state["name"] = name
            state["bytes"] = model_bytes(state["model"])
        return _generate(state["model"], batch, pad_id=pad_id, device=device)

    _reset_cuda_peak(device)
    with _PeakRSS() as rss:
        done, t0 = _static_batches(workload, _same_name_batch(max_batch), run)
    row = summarize(workload, done, t0)
    row.update(weight_bytes=state["bytes"], peak_rss_bytes=rss.peak, cuda_peak_bytes=_cuda_peak(device),
               loads=state["loads"], load_seconds=state["load_seconds"])
    return row


def run_merged(served: Sequence[Served], workload: Sequence[BenchRequest], *, pad_id: int, max_batch: int,
               device: torch.device, dtype: torch.dtype, memory_limit: int) -> dict[str, Any]:
    """Every fine-tune resident in full (one copy per served name), batches of one name's requests."""
    one = checkpoint_numel(served[0].finetune) * dtype.itemsize
    if one * len(served) > memory_limit:
        return {"skipped": f"needs {one * len(served) / 2**20:.0f} MiB of weights, over the "
                           f"{memory_limit / 2**20:.0f} MiB limit"}
    _reset_cuda_peak(device)
    with _PeakRSS() as rss:
        models = {s.name: load_full(s.finetune, device=device, dtype=dtype) for s in served}
        done, t0 = _static_batches(workload, _same_name_batch(max_batch),
                                   lambda b: _generate(models[b[0].name], b, pad_id=pad_id, device=device))
    row = summarize(workload, done, t0)
    row.update(weight_bytes=sum(model_bytes(m) for m in models.values()), peak_rss_bytes=rss.peak,
               cuda_peak_bytes=_cuda_peak(device))
    models.clear()
    gc.collect()
    return row


def run_peft(base: str | Path, served: Sequence[Served], workload: Sequence[BenchRequest], *, pad_id: int,
             max_batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """All deltas attached to one ``DeltaModel``; oldest queued requests in mixed static batches."""
    model = DeltaModel(load_full(base, device=device, dtype=dtype))
    for s in served:
        model.add_delta(s.name, Delta.from_folder(s.delta))
    _reset_cuda_peak(device)
    with _PeakRSS() as rss:
        done, t0 = _static_batches(
            workload, lambda q: q[:max_batch],
            lambda b: _generate(model, b, pad_id=pad_id, device=device, delta_names=[r.name for r in b]))
    row = summarize(workload, done, t0)
    delta_bytes = storage_bytes(model.attached_tensors())
    row.update(weight_bytes=model_bytes(model.base_model) + delta_bytes, peak_rss_bytes=rss.peak,
               cuda_peak_bytes=_cuda_peak(device))
    return row


# -------------------------------------------------------------------------------------------- load time
def measure_load_times(base: str | Path, served: Served, *, device: torch.device, dtype: torch.dtype,
                       repeats: int = 5) -> dict[str, Any]:
    """Median seconds from local disk to ready: a delta (read + attach to the loaded base) vs the full fine-tune.

    Like the engine, only the first delta of a base pays the base-fingerprint check (``delta_first_load_s``);
    the first full load is a warm-up too (imports, page cache).
    """
    model = DeltaModel(load_full(base, device=device, dtype=dtype))
    delta_times, full_times = [], []
    for k in range(repeats + 1):
        start = time.perf_counter()
        model.add_delta(f"load-{k}", Delta.from_folder(served.delta), ignore_base_mismatch=k > 0)
        _sync(device)
        delta_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        full = load_full(served.finetune, device=device, dtype=dtype)
        _sync(device)
        full_times.append(time.perf_counter() - start)
        del full
    d, f = sorted(delta_times[1:])[repeats // 2], sorted(full_times[1:])[repeats // 2]
    return {"delta_load_s": d, "full_load_s": f, "speedup": f / d, "delta_first_load_s": delta_times[0],
            "finetune": served.finetune.name}


@dataclass
class BenchSettings:
    """What ``bench_serve`` runs (the CLI fills it from its flags)."""

    deltas: Sequence[int] = (1, 4, 16, 64)
    popularity: Sequence[str] = ("uniform", "skewed")
    systems: Sequence[str] = ("engine", "naive", "merged", "peft")
    requests: int = 128
    # Poisson arrival rates (requests/s): a moderate load for latencies, and inf (every request at once) for
    # throughput at saturation, where a batching engine and the baselines all run as fast as they can.
    rates: Sequence[float] = (64.0, math.inf)
    max_tokens: int = 32
    seed: int = 0
    max_batch: int = 256
    memory_limit: int | None = None
    profile: bool = False  # profile the engine's decode steps after each timed run (bench.step_profile)
    warm: bool = False  # run the workload once over every served name before timing the engine (see run_engine)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(device_slots=16, cpu_slots=16,
                                                                      kv_cache_tokens=16384, max_running=256))

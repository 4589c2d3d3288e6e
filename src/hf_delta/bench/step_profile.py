"""Where a decode step's time goes: ``torch.profiler`` over a few engine steps, op time by category.

``hf-delta bench serve --profile`` runs this on each engine after its timed run (so profiling never slows the
numbers it reports): the workload's first requests are prefilled, then ``steps`` decode steps are profiled.
Every op's self time (device time on a GPU, CPU time on the CPU) goes to the innermost of these scopes it ran in:

* ``base``: the base model's linear and embedding layers (matmuls, the embedding lookup), a delta layer's own
  base layer included;
* ``delta``: a delta-aware wrapper outside its base layer (delta kernels, routing, gathers and scatters);
* ``attention``: the paged attention function (KV writes, gathers, softmax);
* ``sampling``: penalties, the draw and the read-back of the tokens;
* ``other``: the rest of the step (norms, rotary embeddings, activations, residual adds, packing the batch).

``host`` is the step's wall time the device is idle in: on a GPU, wall time minus the kernels' time (Python,
launches, syncs); on the CPU, wall time minus the ops' self time (Python between ops).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.autograd.profiler import record_function
from transformers.pytorch_utils import Conv1D

from ..layers import DeltaWrapper
from ..serving.engine import engine as engine_module
from ..serving.engine import step as step_module
from ..serving.engine.engine import Engine
from ..serving.engine.sampling import SamplingParams
from ..utils.host_syncs import HostSyncCounter

CATEGORIES = ("base", "delta", "attention", "sampling", "other")
_SYNC_STEPS = 2
_BASE_LAYERS = (torch.nn.Linear, torch.nn.Embedding, Conv1D)  # wrapped by a delta layer or not
_SCOPE = "hf_delta::"


@contextlib.contextmanager
def _scoped(engine: Engine) -> Iterator[None]:
    """Label the step's parts with ``record_function`` scopes while profiling (hooks and wrappers removed after)."""
    handles = []
    open_scopes: dict[int, list[Any]] = {}

    def enter(label: str):
        def hook(module, *args):
            scope = record_function(_SCOPE + label)
            scope.__enter__()
            open_scopes.setdefault(id(module), []).append(scope)

        return hook

    def leave(module, *args):
        open_scopes[id(module)].pop().__exit__(None, None, None)

    for module in engine.model.modules():
        label = "delta" if isinstance(module, DeltaWrapper) else "base" if isinstance(module, _BASE_LAYERS) else None
        if label is not None:
            handles.append(module.register_forward_pre_hook(enter(label)))
            handles.append(module.register_forward_hook(leave, always_call=True))
    from transformers import AttentionInterface

    attention = step_module.paged_attention
    pick = engine_module.pick_tokens

    def timed_attention(*args, **kwargs):
        with record_function(_SCOPE + "attention"):
            return attention(*args, **kwargs)

    def timed_pick(*args, **kwargs):
        with record_function(_SCOPE + "sampling"):
            return pick(*args, **kwargs)

    AttentionInterface.register(step_module.ATTENTION_NAME, timed_attention)
    engine_module.pick_tokens = timed_pick
    try:
        yield
    finally:
        AttentionInterface.register(step_module.ATTENTION_NAME, attention)
        engine_module.pick_tokens = pick
        for handle in handles:
            handle.remove()


def _category(event) -> str:
    """The innermost labelled scope around ``event`` (``other`` outside every label)."""
    node = event
    while node is not None:
        if node.name.startswith(_SCOPE):
            return node.name[len(_SCOPE) :]
        node = node.cpu_parent
    return "other"


def categorise(events, *, on_device: bool) -> dict[str, float]:
    """Self time in microseconds per category over profiler ``events`` (device time when ``on_device``).

    A label's own CPU time is Python inside its scope (host time, not counted); its own device time is kernels
    launched straight from Python in it (Triton), which are its category's.
    """
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        if on_device:
            own = event.self_device_time_total
        else:
            own = 0.0 if event.name.startswith(_SCOPE) else event.self_cpu_time_total
        totals[_category(event)] += own
    return totals


def profile_decode(engine: Engine, prompts: Sequence[tuple[str, Sequence[int]]], *, steps: int = 8) -> dict[str, Any]:
    """Profile ``steps`` decode steps of ``engine`` over ``prompts`` (``(model, token ids)``, all decoding at once).

    Returns per-step milliseconds: ``wall`` (under the profiler), each category's op time, ``busy`` (their sum)
    and ``host`` (see the module docstring); ``eager_wall_ms`` (the same steps without the profiler) and, with
    graphs on, ``graphs_wall_ms`` (replaying them); host syncs per step (``syncs_per_step``, and
    ``graphs_syncs_per_step`` replaying); plus the number of rows and steps profiled. The profiled steps run
    eagerly: a replayed CUDA graph hides which op is which.
    """
    from torch.profiler import ProfilerActivity, profile

    device = engine.model.device
    on_device = device.type == "cuda"
    params = SamplingParams(max_tokens=3 * steps + 2 * _SYNC_STEPS + 4, ignore_eos=True)
    handles = [engine.submit(model, ids, params=params) for model, ids in prompts]
    while not all(engine._requests.get(h.request_id) and engine._requests[h.request_id].output_ids for h in handles):
        if engine.step() == 0:
            time.sleep(0.001)  # a delta still loading
    engine.step()  # one decode step outside the windows: kernels compiled
    extra = {}
    graphs = engine.graphs
    if graphs is not None:
        engine.step()  # the same mix seen twice: captured
        extra["graphs_wall_ms"] = _timed_steps(engine, steps, on_device)
        extra["graph_steps"] = graphs.counters["graph_steps"]
        extra["graphs_syncs_per_step"] = _syncs_per_step(engine)
    engine.graphs = None  # eager from here: a replayed graph hides which op is which
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    try:
        extra["eager_wall_ms"] = _timed_steps(engine, steps, on_device)
        extra["syncs_per_step"] = _syncs_per_step(engine)
        with _scoped(engine), profile(activities=activities) as prof:
            wall_ms = _timed_steps(engine, steps, on_device)
    finally:
        engine.graphs = graphs
    for h in handles:
        engine.abort(h.request_id)
    engine.step()
    events = prof.events()
    times = categorise(events, on_device=on_device)
    per_step = {k: v / 1e3 / steps for k, v in times.items()}
    busy = sum(per_step.values())
    return {
        "rows": len(prompts),
        "steps": steps,
        "time": "device" if on_device else "cpu",
        "wall_ms": wall_ms,
        **{f"{k}_ms": v for k, v in per_step.items()},
        "busy_ms": busy,
        "host_ms": max(0.0, wall_ms - busy),
        **extra,
    }


def _syncs_per_step(engine: Engine) -> float:
    """Host syncs per engine step (``HostSyncCounter``; on a GPU, of its tensors only) over ``_SYNC_STEPS`` steps."""
    device = engine.model.device
    with HostSyncCounter("cuda" if device.type == "cuda" else None) as syncs:
        for _ in range(_SYNC_STEPS):
            engine.step()
    return syncs.count / _SYNC_STEPS


def _timed_steps(engine: Engine, steps: int, on_device: bool) -> float:
    """Milliseconds per engine step over ``steps`` steps (the device drained before and after each)."""
    device = engine.model.device
    wall = 0.0
    for _ in range(steps):
        if on_device:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        engine.step()
        if on_device:
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - start
    return 1e3 * wall / steps


def profile_markdown(profiles: Sequence[dict[str, Any]]) -> str:
    """One table row per profiled engine: ms per step and each category's share of the wall time."""
    from ..evaluation import to_markdown

    rows = []
    for p in profiles:
        row = {k: p[k] for k in p if not k.endswith("_ms")}
        for name in ("eager_wall_ms", "graphs_wall_ms", "syncs_per_step", "graphs_syncs_per_step"):
            if name in p:
                row[name] = round(p[name], 3)
        for name in (*CATEGORIES, "host"):
            row[f"{name}_ms"] = round(p[f"{name}_ms"], 3)
            row[f"{name}_%"] = round(100 * p[f"{name}_ms"] / p["wall_ms"], 1) if p["wall_ms"] else None
        row["wall_ms"] = round(p["wall_ms"], 3)
        rows.append(row)
    return to_markdown(rows)

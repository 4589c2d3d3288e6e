"""Iteration-level scheduling: which requests' tokens go into the next forward pass.

Every step (one forward pass):

1. Running requests come first, oldest admission first: a decoding request contributes its one new token,
   a request still in prefill its next chunk. A request that needs a new KV block when none is free
   preempts the most recently admitted running request (its blocks are freed; it goes back to the waiting
   queue keeping its generated tokens and recomputes them when it is readmitted).
2. Waiting requests are admitted while the token budget (``max_batch_tokens``), the number of running
   requests (``max_running``), free KV blocks (the whole prompt must fit) and a device slot for the
   request's delta allow. Requests whose delta is already in the batch go first (oldest first), then the
   others in arrival order: a step's cost grows with the number of distinct deltas in it (each delta's
   compressed weights are read once per step), so batches are kept dense in few deltas. Long prompts are
   prefilled in chunks, so new requests never stall running decodes for more than one step's budget.

Fairness: a request may be overtaken by younger ones (for deltas already running, or because its own
delta is not resident yet), but only in ``fairness_steps`` steps. After that it is a *barrier*: requests
are admitted strictly in arrival order up to it, and nobody younger is admitted until it is. Running
requests then drain (each has at most ``max_tokens`` left), a device slot frees up and the cold delta gets
it, so a hot delta cannot starve requests for cold ones.
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from ...model import BASE_NAME
from .config import EngineConfig
from .kv_cache import PagedKVCache
from .residency import ResidencyManager
from .sampling import SamplingParams

_DEFAULTS = EngineConfig()  # the one source of the engine's default sizes

_order = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request as the engine tracks it."""

    id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int] = frozenset()
    arrival: float = field(default_factory=time.monotonic)
    seq: int = field(default_factory=lambda: next(_order))
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: str = "waiting"
    overtaken: int = 0
    preemptions: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    state: dict[str, Any] = field(default_factory=dict)  # engine-side: text stream, generator, sink

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def __lt__(self, other: Request) -> bool:  # waiting-queue order: arrival, then submission order
        return (self.arrival, self.seq) < (other.arrival, other.seq)


class Scheduler:
    """Waiting queue, running set and the per-step plan (see the module docstring)."""

    def __init__(self, cache: PagedKVCache, residency: ResidencyManager, *,
                 max_batch_tokens: int = _DEFAULTS.max_batch_tokens, max_running: int = _DEFAULTS.max_running,
                 fairness_steps: int = _DEFAULTS.fairness_steps):
        self.cache = cache
        self.residency = residency
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.fairness_steps = fairness_steps
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.watermark = max(1, cache.num_blocks // 100)
        self.preemptions = 0

    def add(self, request: Request) -> None:
        request.status = "waiting"
        bisect.insort(self.waiting, request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        """Forget ``request`` wherever it is, freeing its KV blocks and its pin on its delta."""
        if request.status == "running":
            self.running.remove(request)
            self._unpin(request)
        elif request.status == "waiting" and request in self.waiting:
            self.waiting.remove(request)
        self.cache.release(request.id)
        request.status = "finished"

    def _unpin(self, request: Request) -> None:
        if request.model != BASE_NAME:
            self.residency.release(request.model)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._unpin(request)
        self.cache.release(request.id)
        request.num_computed = 0
        request.preemptions += 1
        self.preemptions += 1
        self.add(request)

    def schedule(self) -> list[tuple[Request, int]]:
        """The requests of the next step and how many of their tokens it computes."""
        budget = self.max_batch_tokens
        plan: list[tuple[Request, int]] = []
        for request in list(self.running):
            if request.status != "running":
                continue  # preempted earlier in this loop
            n = min(request.num_tokens - request.num_computed, budget)
            if n <= 0:
                continue
            while not self.cache.reserve(request.id, request.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is request:
                    break
            if request.status != "running":
                continue
            plan.append((request, n))
            budget -= n
        barrier = next((r for r in self.waiting if r.overtaken >= self.fairness_steps), None)
        pool = self.waiting[: self.waiting.index(barrier) + 1] if barrier is not None else list(self.waiting)
        hot = {r.model for r in self.running}
        youngest: Request | None = None
        while pool and budget > 0 and len(self.running) < self.max_running:
            pick = pool[0] if barrier is not None else next((r for r in pool if r.model in hot), pool[0])
            pool.remove(pick)
            if not self._admit(pick):
                continue
            n = min(pick.num_tokens, budget)
            plan.append((pick, n))
            budget -= n
            hot.add(pick.model)
            youngest = pick if youngest is None or youngest < pick else youngest
        if youngest is not None:
            for request in self.waiting:
                if request < youngest:
                    request.overtaken += 1
        return plan

    def _admit(self, request: Request) -> bool:
        need = self.cache.extra_blocks(request.id, request.num_tokens)
        if need + (self.watermark if self.running else 0) > self.cache.free_blocks:
            return False
        if request.model != BASE_NAME and not self.residency.acquire(request.model):
            return False
        self.cache.reserve(request.id, request.num_tokens)
        self.waiting.remove(request)
        self.running.append(request)
        request.status = "running"
        return True

    def wanted_deltas(self) -> list[str]:
        """Deltas of waiting requests in the order they will be admitted (what to prefetch first)."""
        return list(dict.fromkeys(r.model for r in self.waiting if r.model != BASE_NAME))

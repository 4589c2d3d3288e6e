"""How far the demo's first start has come: the stages still to run (zoo training, compression, engine start),
the one running now, the percent done and the time left.

``prepare_zoo_demo`` plans the stages and reports their steps; the start page (``start_page``) shows a
``snapshot``. The time left comes from the seconds per step measured so far: a kind of stage not seen yet is
estimated from the kinds seen, scaled by how much work a step of each kind does (tokens per step).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One step of the first start.

    Attributes:
        name: what the page shows, e.g. ``"fine-tune llama-arith"``.
        kind: stages of one kind run at the same speed per unit of ``work`` (``"train"``, ``"distill"``...).
        steps: how many steps it has.
        work: how much one step does, in any unit shared by the stages (tokens per step).
    """

    name: str
    kind: str
    steps: int
    work: float = 1.0


@dataclass(frozen=True)
class Snapshot:
    """What the start page shows."""

    stage: str
    percent: float
    eta_s: float | None  # None until a step has been timed
    elapsed_s: float
    ready: bool
    error: str | None = None


class StartupProgress:
    """Thread-safe progress of a planned list of stages; ``update`` is a ``utils.progress`` listener."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._stages: list[Stage] = []
        self._done: dict[str, int] = {}
        self._seconds: dict[str, float] = {}  # seconds spent on each kind so far
        self._work: dict[str, float] = {}  # work done on each kind so far
        self._current = "starting"
        self._last: float | None = None
        self._started = clock()
        self._ready = False
        self._error: str | None = None

    def plan(self, stages: Sequence[Stage]) -> None:
        """Add ``stages`` to what is still to run (names must be new)."""
        with self._lock:
            self._stages.extend(stages)

    def begin(self, name: str) -> None:
        """A stage without steps of its own (loading, starting the engine) runs now."""
        with self._lock:
            self._current, self._last = name, self._clock()

    def update(self, name: str, done: int, total: int) -> None:
        """``done`` of ``total`` steps of stage ``name`` have run (a ``ProgressListener``)."""
        now = self._clock()
        with self._lock:
            stage = next((s for s in self._stages if s.name == name), None)
            if stage is None:
                self._current, self._last = name, now
                return
            before = self._done.get(name, 0)
            if done > before and self._last is not None and self._current == name:
                self._seconds[stage.kind] = self._seconds.get(stage.kind, 0.0) + now - self._last
                self._work[stage.kind] = self._work.get(stage.kind, 0.0) + (done - before) * stage.work
            self._done[name] = min(done, stage.steps)
            self._current, self._last = name, now

    def finish(self) -> None:
        with self._lock:
            self._ready, self._current = True, "ready"

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self._error = f"{type(error).__name__}: {error}"

    def _seconds_per_work(self, kind: str) -> float | None:
        if self._work.get(kind):
            return self._seconds[kind] / self._work[kind]
        seen = [k for k in self._work if self._work[k]]
        if not seen:
            return None
        return sum(self._seconds[k] for k in seen) / sum(self._work[k] for k in seen)

    def snapshot(self) -> Snapshot:
        """The stage running now, the percent of the planned time done, and the time left."""
        with self._lock:
            elapsed = self._clock() - self._started
            if self._ready:
                return Snapshot("ready", 100.0, 0.0, elapsed, True, self._error)
            left, spent, unknown = 0.0, 0.0, False
            for stage in self._stages:
                rate = self._seconds_per_work(stage.kind)
                if rate is None:
                    unknown = True
                    continue
                done = self._done.get(stage.name, 0)
                spent += done * stage.work * rate
                left += (stage.steps - done) * stage.work * rate
            if unknown:
                total_work = sum(s.steps * s.work for s in self._stages) or 1.0
                done_work = sum(self._done.get(s.name, 0) * s.work for s in self._stages)
                return Snapshot(self._current, 100.0 * done_work / total_work, None, elapsed, False, self._error)
            percent = 100.0 * spent / (spent + left) if spent + left else 0.0
            return Snapshot(self._current, percent, left, elapsed, False, self._error)


def format_seconds(seconds: float | None) -> str:
    """``"3 min 05 s"``, ``"42 s"``, or ``"estimating..."`` before the first step is timed."""
    if seconds is None:
        return "estimating..."
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"

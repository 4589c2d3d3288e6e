"""Small fakes for unit tests of the serving engine's parts, without a model or a delta on disk.

* ``FakeResidency``: what ``Scheduler`` asks of a ``ResidencyManager`` (``acquire``/``release``) with a fixed
  number of device slots; a slot frees when its delta's last pin is released.
* ``FakeDeltaModel``: what ``ResidencyManager`` asks of a ``DeltaModel`` (``add_delta``/``delete_delta``,
  routing slots), recording every attach and detach.
* ``FakeLoader``: stands in for ``Delta.from_folder``; loads can be held back (``gate``) or made to fail.
* ``drive``: plays the engine's part after ``Scheduler.schedule()`` (advance, emit a token, finish).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace


class FakeResidency:
    """``acquire``/``release`` over ``slots`` device slots; names in ``cold`` are not loaded yet (acquire fails)."""

    def __init__(self, slots: int = 8, *, cold: set[str] | None = None):
        self.slots = slots
        self.cold = set(cold or ())
        self.pins: dict[str, int] = {}

    def acquire(self, name: str) -> bool:
        if name in self.cold:
            return False
        if self.pins.get(name, 0) == 0 and len(self.on_device()) >= self.slots:
            return False
        self.pins[name] = self.pins.get(name, 0) + 1
        return True

    def release(self, name: str) -> None:
        assert self.pins.get(name, 0) > 0, f"release of {name!r} without a pin"
        self.pins[name] -= 1

    def on_device(self) -> set[str]:
        return {name for name, pins in self.pins.items() if pins > 0}


def drive(scheduler, plan) -> list[str]:
    """Apply ``plan`` as the engine would: each request computes its tokens; one whose last token ran gets a new
    token (id 1); a request with ``max_tokens`` outputs is finished. Returns the ids finished in this step."""
    finished = []
    for request, n in plan:
        request.num_computed += n
        if request.num_computed == request.num_tokens:
            request.output_ids.append(1)
            if len(request.output_ids) >= request.params.max_tokens:
                scheduler.finish(request)
                finished.append(request.id)
    return finished


class FakeDelta:
    """A ``Delta`` as the residency manager sees it: a compression record with a base fingerprint."""

    def __init__(self, name: str):
        self.name = name
        self.record = SimpleNamespace(base_fingerprint={"base": "fake"})


class FakeDeltaModel:
    """A ``DeltaModel`` without layers: ``add_delta`` takes the lowest free routing slot, or raises for names in
    ``fail_attach`` leaving the model as it was (``DeltaModel.add_delta`` is all or nothing)."""

    def __init__(self, *, fail_attach: set[str] | None = None):
        self.deltas: dict[str, FakeDelta] = {}
        self._wrapped: dict[str, SimpleNamespace] = {"layer": SimpleNamespace(deltas={})}
        self.routing = SimpleNamespace(slots=[], active=None, capacity=0)
        self.fail_attach = set(fail_attach or ())
        self.log: list[tuple[str, str]] = []  # ("attach" | "detach", name)

    def add_delta(self, name: str, delta: FakeDelta, *, ignore_base_mismatch: bool = False,
                  source: str | None = None) -> None:
        if name in self.fail_attach:
            raise RuntimeError(f"cannot attach {name}")
        slots = self.routing.slots
        slot = slots.index(None) if None in slots else len(slots)
        if slot == len(slots):
            slots.append(None)
        slots[slot] = name
        self._wrapped["layer"].deltas[name] = delta
        self.deltas[name] = delta
        self.routing.active = self.routing.active or name
        self.log.append(("attach", name))

    def list_deltas(self) -> list[str]:
        return list(self.deltas)

    def delete_delta(self, name: str) -> None:
        if name not in self.deltas:
            raise KeyError(name)
        del self.deltas[name]
        self._wrapped["layer"].deltas.pop(name, None)
        self.routing.slots[self.routing.slots.index(name)] = None
        if self.routing.active == name:
            self.routing.active = next(iter(self.deltas), None)
        self.log.append(("detach", name))


class FakeLoader:
    """Replaces ``Delta.from_folder``: the folder's name is the delta's. Names in ``fail`` raise; while ``gate`` is
    cleared, loads wait for it (so a test can see them in flight)."""

    def __init__(self):
        self.fail: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[str] = []

    def from_folder(self, folder: str | Path) -> FakeDelta:
        name = Path(folder).name
        self.calls.append(name)
        assert self.gate.wait(10), "a test left the loader gate closed"
        if name in self.fail:
            raise OSError(f"{name}: safetensors header is corrupt")
        return FakeDelta(name)


def wait_for_loads(manager, timeout: float = 10.0) -> list[str]:
    """Poll ``manager`` until no load is in flight; returns the names that failed."""
    failed: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        failed += manager.poll()
        if not any(manager.tier(name) == "loading" for name in manager.names()):
            return failed
        assert time.monotonic() < deadline, manager.stats()["tiers"]
        time.sleep(0.005)

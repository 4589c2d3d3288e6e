"""``ResidencyManager`` on its own: disk → CPU → device tiers over a fake model and a fake loader.

What its docstrings promise: both memory tiers evict least-recently-used entries, a pinned delta is never
evicted, prefetch loads the most wanted deltas first within ``cpu_slots`` and never cancels a load, and a
delta that fails to load (or to attach) fails by itself and is retried after ``retry_failed_after``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from serving_fakes import FakeDeltaModel, FakeLoader, wait_for_loads

from hf_delta.errors import DeltaLoadError
from hf_delta.serving import residency as residency_module
from hf_delta.serving.engine.residency import ResidencyManager

NAMES = ("a", "b", "c", "d", "e")


@pytest.fixture
def loader(monkeypatch) -> FakeLoader:
    fake = FakeLoader()
    monkeypatch.setattr(residency_module.Delta, "from_folder", fake.from_folder)
    return fake


@pytest.fixture
def make(tmp_path, loader) -> Iterator:
    """``make(device_slots=, cpu_slots=, fail_attach=)`` → a manager serving deltas a..e (one folder each)."""
    managers = []

    def build(*, device_slots: int = 2, cpu_slots: int = 2, fail_attach=(), **kwargs) -> ResidencyManager:
        model = FakeDeltaModel(fail_attach=set(fail_attach))
        manager = ResidencyManager(model, device_slots=device_slots, cpu_slots=cpu_slots, **kwargs)
        for name in NAMES:
            (tmp_path / name).mkdir(exist_ok=True)
            manager.register(name, tmp_path / name)
        managers.append(manager)
        return manager

    yield build
    loader.gate.set()
    for manager in managers:
        manager.close()


def _load(manager: ResidencyManager, *names: str) -> None:
    manager.prefetch(names)
    assert wait_for_loads(manager) == []
    assert all(manager.tier(n) == "cpu" for n in names), manager.stats()["tiers"]


def _use(manager: ResidencyManager, name: str) -> None:
    """One request of ``name`` runs and finishes."""
    assert manager.acquire(name)
    manager.release(name)


def _tiers(manager: ResidencyManager) -> dict[str, str]:
    return {name: manager.tier(name) for name in manager.names()}


# ------------------------------------------------------------------------------------------------- device tier
def test_device_tier_evicts_the_least_recently_used_delta(make):
    manager = make(device_slots=2, cpu_slots=3)
    _load(manager, "a", "b", "c")
    _use(manager, "a")
    _use(manager, "b")
    _use(manager, "a")  # a is now more recent than b
    _use(manager, "c")  # both slots taken: the LRU one (b) leaves
    assert manager.model.log == [("attach", "a"), ("attach", "b"), ("detach", "b"), ("attach", "c")]
    assert _tiers(manager) == {"a": "device", "b": "cpu", "c": "device", "d": "disk", "e": "disk"}
    _use(manager, "b")  # now a is the LRU one (c was used after it)
    assert manager.model.log[-2:] == [("detach", "a"), ("attach", "b")]
    assert sorted(manager.model.deltas) == ["b", "c"]
    stats = manager.stats()
    assert (stats["attaches"], stats["device_evictions"], stats["device_hits"], stats["peak_device"]) == (4, 2, 1, 2)


def test_the_models_slot_buffers_are_sized_to_the_device_slots(make):
    assert make(device_slots=3).model.routing.capacity == 3


def test_a_pinned_delta_is_never_evicted(make):
    manager = make(device_slots=2, cpu_slots=3)
    _load(manager, "a", "b", "c")
    assert manager.acquire("a") and manager.acquire("a")  # two running requests of a
    _use(manager, "b")  # b is more recent than a, but unpinned
    assert manager.can_attach_now()
    assert manager.acquire("c")  # evicts b, not the pinned (and older) a
    assert sorted(manager.model.deltas) == ["a", "c"]
    assert not manager.can_attach_now()  # a and c are both pinned now
    assert not manager.acquire("b")  # no slot: b waits, nothing was evicted
    assert sorted(manager.model.deltas) == ["a", "c"] and manager.tier("b") == "cpu"
    manager.release("a")
    assert not manager.acquire("b")  # a still has one running request
    manager.release("a")
    assert manager.acquire("b")  # a's last request finished: a is evictable now
    assert sorted(manager.model.deltas) == ["b", "c"] and manager.tier("a") == "cpu"


def test_a_delta_not_in_cpu_memory_cannot_be_acquired(make, loader):
    manager = make()
    assert not manager.acquire("a")  # still on disk: acquire does not load
    assert loader.calls == [] and manager.tier("a") == "disk"


def test_a_device_eviction_keeps_the_host_copy_while_a_cpu_slot_is_free(make, loader):
    # Two CPU slots: b and c there, a on the device. Swapping a out for b leaves a and c in CPU memory (b moves
    # to the device), so a keeps its host copy and its next use needs no new load.
    manager = make(device_slots=1, cpu_slots=2)
    _load(manager, "a", "b")
    _use(manager, "a")
    _load(manager, "c")
    _use(manager, "b")
    assert _tiers(manager)["a"] == "cpu", _tiers(manager)
    _use(manager, "a")
    assert loader.calls == ["a", "b", "c"]  # loaded once each


def test_with_one_cpu_slot_a_swapped_out_delta_stays_until_prefetch_needs_the_slot(make, loader):
    manager = make(device_slots=1, cpu_slots=1)
    _load(manager, "a")
    _use(manager, "a")
    _load(manager, "b")
    _use(manager, "b")  # a leaves the device; b's CPU slot is a's now, so a's host copy stays
    assert _tiers(manager)["a"] == "cpu"
    _load(manager, "c")  # prefetch evicts a (the only CPU entry) to make room
    assert _tiers(manager) == {"a": "disk", "b": "device", "c": "cpu", "d": "disk", "e": "disk"}
    assert manager.stats()["cpu_evictions"] == 1


# ---------------------------------------------------------------------------------------------------- prefetch
def test_prefetch_loads_the_most_wanted_first_within_cpu_slots(make, loader):
    manager = make(device_slots=1, cpu_slots=2)
    loader.gate.clear()
    manager.prefetch(["c", "a", "c", "b", "nope"])  # unknown names are ignored, duplicates count once
    assert _tiers(manager) == {"a": "loading", "b": "disk", "c": "loading", "d": "disk", "e": "disk"}
    manager.prefetch(["d"])  # CPU slots full of loads in flight: none is cancelled, d waits
    assert manager.tier("d") == "disk"
    loader.gate.set()
    assert wait_for_loads(manager) == []
    assert loader.calls == ["c", "a"]  # one loader thread, in the order wanted
    assert _tiers(manager) == {"a": "cpu", "b": "disk", "c": "cpu", "d": "disk", "e": "disk"}
    stats = manager.stats()
    assert (stats["loads"], stats["peak_cpu"], stats["cpu_evictions"]) == (2, 2, 0)


def test_prefetch_evicts_the_least_recently_used_cpu_entry_not_a_wanted_one(make, loader):
    manager = make(device_slots=1, cpu_slots=2)
    _load(manager, "a", "b")
    _use(manager, "b")
    _use(manager, "a")  # b back in CPU memory (used at tick 1), a on the device
    _load(manager, "c")  # CPU: b, c
    _use(manager, "c")  # a to CPU (tick 2), c to the device; CPU: a, b
    assert _tiers(manager) == {"a": "cpu", "b": "cpu", "c": "device", "d": "disk", "e": "disk"}
    manager.prefetch(["d"])
    assert wait_for_loads(manager) == []
    assert _tiers(manager) == {"a": "cpu", "b": "disk", "c": "device", "d": "cpu", "e": "disk"}  # b was older
    manager.prefetch(["a", "e"])  # a is wanted: d goes, although a is the older one
    assert wait_for_loads(manager) == []
    assert _tiers(manager) == {"a": "cpu", "b": "disk", "c": "device", "d": "disk", "e": "cpu"}
    assert manager.stats()["cpu_evictions"] == 2


def test_prefetch_skips_deltas_already_on_the_device(make, loader):
    manager = make(device_slots=2, cpu_slots=2)
    _load(manager, "a")
    _use(manager, "a")
    manager.prefetch(["a", "b"])  # a is attached: only b loads
    assert wait_for_loads(manager) == []
    assert loader.calls == ["a", "b"]


# ---------------------------------------------------------------------------------------------------- failures
def test_a_delta_that_fails_to_load_fails_alone_and_is_retried_later(make, loader):
    manager = make(device_slots=2, cpu_slots=2, retry_failed_after=3600)
    loader.fail.add("b")
    manager.prefetch(["a", "b"])
    assert wait_for_loads(manager) == ["b"]
    error = manager.error("b")
    assert isinstance(error, DeltaLoadError) and "'b'" in str(error) and "corrupt" in str(error)
    assert _tiers(manager) == {"a": "cpu", "b": "failed", "c": "disk", "d": "disk", "e": "disk"}
    assert manager.error("a") is None and manager.stats()["failures"] == 1
    assert not manager.acquire("b")
    _use(manager, "a")  # the others are served as before
    manager.prefetch(["b", "c"])  # within the retry window b is not tried again; its slot went to c
    assert wait_for_loads(manager) == []
    assert loader.calls == ["a", "b", "c"] and manager.tier("c") == "cpu"

    loader.fail.clear()  # the repo is fixed, and the retry window passes
    manager.retry_failed_after = 0.0
    assert manager.error("b") is None
    manager.prefetch(["b"])
    assert wait_for_loads(manager) == []
    assert manager.acquire("b")  # the next request of b runs
    assert sorted(manager.model.deltas) == ["a", "b"] and loader.calls.count("b") == 2


def test_a_delta_that_fails_to_attach_leaves_no_trace_on_the_model(make):
    manager = make(device_slots=1, cpu_slots=2, fail_attach={"bad"}, retry_failed_after=3600)
    manager.register("bad", manager.folder("a").parent / "a")  # any folder: the attach is what fails
    _load(manager, "bad", "a")
    assert not manager.acquire("bad")
    assert isinstance(manager.error("bad"), DeltaLoadError) and "cannot attach bad" in str(manager.error("bad"))
    assert manager.tier("bad") == "failed"
    model = manager.model
    assert model.deltas == {} and model._wrapped["layer"].deltas == {} and model.routing.slots == []
    assert manager.can_attach_now()
    assert manager.acquire("a")  # the one device slot is free for the next delta
    assert model.routing.slots == ["a"] and manager.stats()["peak_device"] == 1

"""Where each served delta lives: on disk (a folder or the Hub cache), in CPU memory, or in a device slot.

A delta is in exactly one tier at a time:

* **disk**: only its folder (downloaded through ``huggingface_hub``'s cache on first use);
* **cpu**: a ``Delta`` object in host memory (or being read there by a background loader thread);
* **device**: attached to the ``DeltaModel`` (a routing slot; its requests can run).

``device_slots`` and ``cpu_slots`` bound the two memory tiers, so memory stays bounded however many deltas
are registered. Both tiers evict least-recently-used entries; a delta with running requests is *pinned* and
never evicted. Loads from disk run in background threads (prefetch for queued requests); attaching a loaded
delta to the model and detaching it happen on the engine thread, between steps.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import DeltaLoadError, DeltaNotFoundError, EngineConfigError
from ...model import BASE_NAME, DeltaModel
from ...storage import Delta
from ...utils.sizes import storage_bytes
from .config import EngineConfig

_DEFAULTS = EngineConfig()  # the one source of the engine's default sizes

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    name: str
    source: str
    revision: str | None = None
    folder: Path | None = None
    future: Future | None = None
    delta: Delta | None = None
    on_device: bool = False
    pins: int = 0
    verified: bool = False
    error: DeltaLoadError | None = None
    failed_at: float = 0.0
    last_used: int = 0
    load_seconds: list[float] = field(default_factory=list)


class ResidencyManager:
    """Disk → CPU → device tiers for the deltas an engine serves (see the module docstring).

    Args:
        model: the ``DeltaModel`` deltas are attached to.
        device_slots: most deltas attached to the model at once.
        cpu_slots: most deltas held in host memory outside the model (including loads in flight); at least
            one is always used, as the staging area of a load.
        loader_threads: background threads reading deltas from disk.
        token, cache_dir, local_files_only: for Hub downloads.
        ignore_base_mismatch: attach deltas whose base fingerprint differs (not recommended).
        retry_failed_after: seconds before a delta that failed to load is tried again.
    """

    def __init__(self, model: DeltaModel, *, device_slots: int = _DEFAULTS.device_slots,
                 cpu_slots: int = _DEFAULTS.cpu_slots, loader_threads: int = _DEFAULTS.loader_threads,
                 token: str | bool | None = None, cache_dir: str | Path | None = None,
                 local_files_only: bool = False, ignore_base_mismatch: bool = False,
                 retry_failed_after: float = _DEFAULTS.retry_failed_after):
        if device_slots < 1 or cpu_slots < 0 or loader_threads < 1:
            raise EngineConfigError(f"Need device_slots >= 1, cpu_slots >= 0 and loader_threads >= 1; got "
                                    f"{device_slots}, {cpu_slots}, {loader_threads}.")
        self.model = model
        self.device_slots = device_slots
        # Each layer's resident slot buffers allocate this many slots up front, so attaching and evicting
        # deltas while serving never reallocates them.
        model.routing.capacity = max(model.routing.capacity, device_slots)
        self.cpu_slots = max(1, cpu_slots)
        self._hub = {"token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
        self.ignore_base_mismatch = ignore_base_mismatch
        self.retry_failed_after = retry_failed_after
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="hf-delta-loader")
        self._tick = 0
        self._verified: set[str] = set()  # base fingerprints already checked against this model
        self.counters = {"device_hits": 0, "attaches": 0, "device_evictions": 0, "cpu_evictions": 0, "loads": 0,
                         "failures": 0, "peak_device": 0, "peak_cpu": 0}

    # ------------------------------------------------------------------------------------------ registry
    def register(self, name: str, source: str | Path, *, revision: str | None = None) -> None:
        """Serve the delta repo ``source`` (folder or Hub id) as ``name``; nothing is read until it is needed."""
        if name == BASE_NAME or not name:
            raise EngineConfigError(f"{name!r} cannot name a delta ({BASE_NAME!r} is the base).")
        with self._lock:
            old = self._entries.get(name)
            if old is not None and (old.on_device or old.pins):
                raise EngineConfigError(f"Delta {name!r} is in use; it cannot be re-registered now.")
            self._entries[name] = _Entry(name=name, source=str(source), revision=revision)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise DeltaNotFoundError(f"No delta named {name!r} is served; served: {self.names()}.")
        return self._entries[name]

    def folder(self, name: str) -> Path:
        """The local folder of ``name`` (downloading it from the Hub on first use); raises ``DeltaLoadError``."""
        from ...hub import resolve_delta_folder

        entry = self._entry(name)
        if entry.folder is None:
            try:
                entry.folder = resolve_delta_folder(entry.source, revision=entry.revision, **self._hub)
            except Exception as err:  # any failure becomes this delta's error, never the server's
                raise DeltaLoadError(f"Delta {name!r} ({entry.source}) could not be fetched: {err}") from err
        return entry.folder

    # ------------------------------------------------------------------------------------------- queries
    def tier(self, name: str) -> str:
        """``"device"``, ``"cpu"``, ``"loading"``, ``"failed"`` or ``"disk"``."""
        e = self._entry(name)
        if e.on_device:
            return "device"
        if e.delta is not None:
            return "cpu"
        if e.future is not None:
            return "loading"
        return "failed" if e.error is not None else "disk"

    def error(self, name: str) -> DeltaLoadError | None:
        """The load error of ``name`` while it stands (it is retried after ``retry_failed_after`` seconds)."""
        e = self._entry(name)
        if e.error is not None and time.monotonic() - e.failed_at > self.retry_failed_after:
            e.error = None
        return e.error

    def _cpu_count(self) -> int:
        return sum(1 for e in list(self._entries.values()) if not e.on_device and (e.delta is not None or e.future))

    def _device_count(self) -> int:
        return sum(1 for e in list(self._entries.values()) if e.on_device)

    # --------------------------------------------------------------------------------------------- loads
    def _load(self, entry: _Entry) -> Delta:
        start = time.perf_counter()
        delta = Delta.from_folder(self.folder(entry.name))
        entry.load_seconds.append(time.perf_counter() - start)
        return delta

    def poll(self) -> list[str]:
        """Collect finished background loads; returns the names that failed (their error is set)."""
        failed = []
        for e in self._entries.values():
            if e.future is None or not e.future.done():
                continue
            future, e.future = e.future, None
            try:
                e.delta = future.result()
                self.counters["loads"] += 1
                self.counters["peak_cpu"] = max(self.counters["peak_cpu"], self._cpu_count())
            except Exception as err:  # a broken repo fails its own requests only
                self._fail(e, err)
                failed.append(e.name)
        return failed

    def _fail(self, e: _Entry, err: BaseException) -> None:
        e.error = err if isinstance(err, DeltaLoadError) else DeltaLoadError(
            f"Delta {e.name!r} ({e.source}) could not be loaded: {err}")
        e.failed_at = time.monotonic()
        self.counters["failures"] += 1
        logger.error("%s", e.error)

    def prefetch(self, names: Sequence[str]) -> None:
        """Start background loads for ``names`` (most wanted first) that are on disk, while CPU slots allow.

        CPU entries not among the first ``cpu_slots`` wanted names are evicted (least recently used first)
        to make room; loads in flight are never cancelled.
        """
        wanted = list(dict.fromkeys(n for n in names if n in self._entries))[: self.cpu_slots]
        for name in wanted:
            e = self._entries[name]
            if e.on_device or e.delta is not None or e.future is not None or self.error(name) is not None:
                continue
            if self._cpu_count() >= self.cpu_slots and not self._evict_cpu(keep=set(wanted)):
                return
            e.future = self._pool.submit(self._load, e)

    def _evict_cpu(self, *, keep: set[str]) -> bool:
        victims = [e for e in self._entries.values()
                   if not e.on_device and e.delta is not None and e.name not in keep]
        if not victims:
            return False
        victim = min(victims, key=lambda e: e.last_used)
        victim.delta = None
        self.counters["cpu_evictions"] += 1
        return True

    # ------------------------------------------------------------------------------------------- device
    def acquire(self, name: str) -> bool:
        """Pin ``name`` on the device for one more running request, attaching it if a slot can be had.

        Returns False when it is not in CPU memory yet or every slot is pinned by running requests.
        """
        e = self._entry(name)
        self._tick += 1
        if e.on_device:
            e.pins += 1
            e.last_used = self._tick
            self.counters["device_hits"] += 1
            return True
        if e.delta is None:
            return False  # not loaded yet: the engine's prefetch of wanted deltas starts the load
        if self._device_count() >= self.device_slots and not self._evict_device():
            return False
        # Every delta of one base records the same fingerprint: check it against the model once, not per attach.
        fingerprint = json.dumps(e.delta.record.base_fingerprint, sort_keys=True)
        skip_check = e.verified or self.ignore_base_mismatch or fingerprint in self._verified
        try:
            self.model.add_delta(name, e.delta, ignore_base_mismatch=skip_check, source=e.source)
        except Exception as err:
            e.delta = None
            self._fail(e, err)
            return False
        e.verified = e.on_device = True
        self._verified.add(fingerprint)
        e.pins, e.last_used = 1, self._tick
        self.counters["attaches"] += 1
        self.counters["peak_device"] = max(self.counters["peak_device"], self._device_count())
        return True

    def release(self, name: str) -> None:
        """One running request of ``name`` finished (or was preempted)."""
        e = self._entries.get(name)
        if e is not None and e.pins > 0:
            e.pins -= 1

    def can_attach_now(self) -> bool:
        """Whether a delta already in CPU memory could be attached right away (a slot is free or evictable)."""
        return self._device_count() < self.device_slots or any(
            e.on_device and e.pins == 0 for e in self._entries.values())

    def _evict_device(self) -> bool:
        victims = [e for e in self._entries.values() if e.on_device and e.pins == 0]
        if not victims:
            return False
        victim = min(victims, key=lambda e: e.last_used)
        self._detach(victim.name)
        victim.on_device = False
        self.counters["device_evictions"] += 1
        # The host copy stays only while a CPU slot is free. The delta being attached (``acquire`` is the only
        # caller) still counts as in CPU memory, but it leaves its slot now: hence the - 1.
        if self._cpu_count() - 1 > self.cpu_slots:
            victim.delta = None
        return True

    def _detach(self, name: str) -> None:
        """Remove ``name`` from the model (``add_delta`` is all or nothing: it is attached or absent)."""
        if name in self.model.list_deltas():
            self.model.delete_delta(name)

    # ---------------------------------------------------------------------------------------- accounting
    def weight_bytes(self) -> dict[str, int]:
        """Bytes of weights held: the base, the deltas on the device and those in CPU memory (shared storage
        counted once, so a CPU-backed delta attached to a CPU model is not counted twice)."""
        seen: set[tuple[str, int]] = set()
        base = storage_bytes([*self.model.base_model.parameters(), *self.model.base_model.buffers()], seen=seen)
        device = storage_bytes(self.model.attached_tensors(), seen=seen)
        cpu = sum(storage_bytes(delta_tensors(e.delta), seen=seen) for e in self._entries.values()
                  if e.delta is not None)
        return {"base": base, "deltas_device": device, "deltas_cpu": cpu, "total": base + device + cpu}

    def stats(self) -> dict[str, Any]:
        tiers: dict[str, list[str]] = {}
        for name in self._entries:
            tiers.setdefault(self.tier(name), []).append(name)
        loads = [s for e in self._entries.values() for s in e.load_seconds]
        return {"tiers": tiers, "device_slots": self.device_slots, "cpu_slots": self.cpu_slots,
                "mean_load_seconds": sum(loads) / len(loads) if loads else None, **self.counters}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def delta_tensors(delta: Delta) -> list[torch.Tensor]:
    """The tensors a ``Delta`` holds, without copying them (``Delta.tensors`` makes contiguous copies)."""
    out: list[torch.Tensor] = []
    for w in delta.weights.values():
        out.extend(w.buffers())
    out.extend(delta.exact.values())
    out.extend(delta.new_rows.values())
    return out

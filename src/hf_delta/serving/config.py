"""``EngineConfig``: the sizes and limits of an engine; and the process RSS it reports beside its own counts."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import EngineConfigError


@dataclass
class EngineConfig:
    """Limits and sizes of an ``Engine``.

    Args:
        device_slots: deltas attached to the model at once (their requests can run together).
        cpu_slots: further deltas kept in host memory, ready to attach.
        kv_cache_tokens: KV-cache budget in tokens over all running requests (allocated once).
        block_size: tokens per KV block.
        max_batch_tokens: tokens per forward pass (one per decoding request plus prefill chunks).
        max_running: requests in the running batch at once.
        max_model_len: longest prompt + completion (default: the model's ``max_position_embeddings``).
        fairness_steps: steps a request may be overtaken by younger ones before it blocks them.
        loader_threads: background threads loading deltas from disk.
        retry_failed_after: seconds before a delta that failed to load is tried again.
    """

    device_slots: int = 8
    cpu_slots: int = 8
    kv_cache_tokens: int = 16384
    block_size: int = 16
    max_batch_tokens: int = 512
    max_running: int = 256
    max_model_len: int | None = None
    fairness_steps: int = 64
    loader_threads: int = 1
    retry_failed_after: float = 30.0

    def validate(self) -> None:
        if min(self.kv_cache_tokens, self.block_size, self.max_batch_tokens, self.max_running) < 1:
            raise EngineConfigError(f"Engine sizes must be positive: {self}.")
        if self.max_batch_tokens < self.max_running:
            raise EngineConfigError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_running "
                                    f"({self.max_running}) so that every running request decodes each step.")


def process_rss() -> int | None:
    """Resident set size of this process in bytes (None where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None

"""When compressed weights use the Triton kernels, and the per-forward state their batched launches share."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch


def kernels_forced() -> bool:
    """``HF_DELTA_KERNELS=triton``: run the Triton kernels on CPU tensors too (interpreted; for tests)."""
    return os.environ.get("HF_DELTA_KERNELS") == "triton"


def use_kernels(x: torch.Tensor, *trainable: torch.Tensor) -> bool:
    """Whether a delta product on ``x`` goes through a Triton kernel: CUDA tensors (or forced), and no
    gradient wanted through it (the kernels have no backward) for ``x`` or any of ``trainable``."""
    if not (x.is_cuda or kernels_forced()):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in trainable)))


class IdentityCache:
    """Remember what ``build(rows)`` gave for the last few lists of row-index tensors, keyed by identity.

    Every delta-aware linear layer of one forward pass routes the *same* row tensors (``DeltaRouting`` computes
    them once per pass), so what depends only on them (a gather plan, a slot vector and kernel tile plan) is
    built once per pass instead of once per layer. Identity is a safe key because an entry keeps its tensors
    alive; a few entries cover the decoder's rows and the output head's (only rows whose logits are wanted).
    """

    def __init__(self, size: int = 4):
        self._size = size
        self._lock = threading.Lock()  # engines in several threads of one process
        self._entries: list[tuple[list[torch.Tensor | None], tuple[Any, ...], Any]] = []

    def get(self, rows: Sequence[torch.Tensor | None], key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """The value cached for these very ``rows`` tensors and an equal ``key``, else ``build()`` (cached)."""
        with self._lock:
            for i, (seen, seen_key, value) in enumerate(self._entries):
                if seen_key == key and len(seen) == len(rows) and all(a is b for a, b in zip(seen, rows, strict=True)):
                    self._entries.insert(0, self._entries.pop(i))
                    return value
        value = build()
        with self._lock:
            self._entries.insert(0, (list(rows), key, value))
            del self._entries[self._size:]
        return value


_SLOTS = IdentityCache()


def stacked_slots(rows: Sequence[torch.Tensor | None], num_rows: int,
                  device: torch.device) -> tuple[torch.Tensor, Any]:
    """The slot vector (``slots[r] = d`` for the ``d``-th row set, ``None`` = every row; ``-1`` elsewhere) and
    its kernel tile plan for one launch over ``len(rows)`` stacked deltas; built once per forward pass (the
    plan's one host sync) instead of once per layer."""
    from hf_delta.kernels import plan_bitdelta_batch

    def build() -> tuple[torch.Tensor, Any]:
        slots = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
        for d, r in enumerate(rows):
            slots[slice(None) if r is None else r] = d
        return slots, plan_bitdelta_batch(slots, len(rows))

    return _SLOTS.get(rows, (num_rows, device), build)

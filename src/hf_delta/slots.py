"""Resident slot buffers: one layer's deltas of one packed format, as rows of ``[slots, ...]`` tensors.

A delta attached to a layer is written into a free row (slot) of the buffer of its format, and its weight's
tensors become views of that row, so the packed bits live on the device once. A mixed-batch kernel then takes
the whole buffer and a slot per row (``-1`` = none), instead of a ``torch.stack`` of every routed delta's
tensors in every layer and step. Detaching a delta hands its weight copies of its rows and zeroes them; the
slot is reused by the next attach. The buffer holds ``capacity`` slots from its first write (the serving
engine's device slots, ``DeltaRouting.capacity``) or, without one, grows by doubling.

Semantics of a buffer ``B`` with tensors ``B[name]`` of shape ``[capacity, *shape]``: for a resident
weight ``w`` in slot ``i``, ``w.<name> is B[name][i]`` (a view) while ``holds`` confirms it; free rows are zero.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from .methods.base import CompressedWeight

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _plain() -> Iterator[None]:
    """Plain tensors and no autograd: an engine attaches deltas inside ``torch.inference_mode()``, and a buffer
    made there would hold inference tensors, which a later forward pass with gradients (co-serving) cannot use."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def buffer_key(weight: CompressedWeight) -> tuple[Any, ...] | None:
    """Weights with equal keys share a buffer: same type and format, same tensor names, shapes, dtypes, device."""
    fmt = weight.slot_format()
    if fmt is None:
        return None
    layout = tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in weight.named_buffers())
    return (type(weight), fmt, layout)


class SlotBuffer:
    """The resident deltas of one format in one layer (see the module docstring).

    Args:
        template: a weight of the format; only its tensors' shapes, dtypes and device are read.
        capacity: slots to allocate (at least 1).
    """

    def __init__(self, template: CompressedWeight, capacity: int):
        self.kind = type(template)
        with _plain():
            self.tensors = {
                name: torch.zeros((max(1, capacity), *t.shape), dtype=t.dtype, device=t.device)
                for name, t in template.named_buffers()
            }
        self._slot: dict[str, int] = {}  # delta name -> buffer slot
        self._routing_slot: dict[str, int] = {}  # delta name -> its routing slot (row_slots values)
        self._weights: dict[int, CompressedWeight] = {}  # buffer slot -> the weight viewing it
        self._views: dict[int, dict[str, torch.Tensor]] = {}  # buffer slot -> the views that weight holds

    @property
    def capacity(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __len__(self) -> int:
        return len(self._weights)

    def slot_of(self, name: str) -> int | None:
        return self._slot.get(name)

    def write(self, name: str, routing_slot: int, weight: CompressedWeight, *, capacity: int = 0) -> int:
        """Copy ``weight``'s tensors into the lowest free slot and make them views of it; returns the slot.

        A full buffer grows to ``max(capacity, 2 x its size)`` slots (the resident weights are re-pointed).
        """
        free = next((i for i in range(self.capacity) if i not in self._weights), None)
        with _plain():
            if free is None:
                free = self.capacity
                self._grow(max(capacity, 2 * self.capacity))
            self._slot[name] = free
            self._routing_slot[name] = routing_slot
            self._weights[free] = weight
            self._fill(free, weight)
        return free

    def clear(self, name: str) -> None:
        """Detach ``name``: its weight gets copies of its rows (a caller may still hold it), the rows are zeroed."""
        slot = self._slot.pop(name)
        del self._routing_slot[name]
        weight = self._weights.pop(slot)
        views = self._views.pop(slot)
        with _plain():
            for key, t in self.tensors.items():
                if getattr(weight, key) is views[key]:
                    weight.register_buffer(key, views[key].clone())
                t[slot].zero_()

    def holds(self, name: str, weight: CompressedWeight) -> int | None:
        """The slot whose rows ``weight``'s tensors are, or ``None`` when it is not (or no longer) resident here.

        A weight whose tensors were replaced since (``w.scales = ...``) is written again, unless one of them
        needs a gradient (scale distillation) or no longer fits: that one keeps the per-delta path.
        """
        slot = self._slot.get(name)
        if slot is None or self._weights[slot] is not weight:
            return None
        views = self._views[slot]
        # Checked for every delta in every layer and step: the weight's own buffer dict (not a copy of it from
        # named_buffers()) and a plain loop (not all() over a generator): 1.1 us a call before, ~4 ms of a decode
        # step at 16 deltas x 224 matrices.
        own = weight._buffers
        for key, view in views.items():
            if own.get(key) is not view:
                break
        else:
            return slot
        if own.keys() != views.keys() or any(
            t.requires_grad or t.shape != views[k].shape or t.dtype != views[k].dtype or t.device != views[k].device
            for k, t in own.items()
        ):
            return None
        logger.debug(
            "Delta %r replaced its tensors since it was attached: writing them into slot %d again.", name, slot
        )
        with _plain():
            self._fill(slot, weight)
        return slot

    def lut(self, names: list[str], num_routing_slots: int) -> tuple[int, ...]:
        """The buffer slot of each routing slot: that of the delta in ``names`` there, else ``-1``."""
        table = [-1] * num_routing_slots
        for name in names:
            table[self._routing_slot[name]] = self._slot[name]
        return tuple(table)

    def resident(self) -> list[tuple[str, int]]:
        """``(name, routing slot)`` of every resident delta, in buffer-slot order."""
        return [(n, self._routing_slot[n]) for n, _ in sorted(self._slot.items(), key=lambda e: e[1])]

    def _fill(self, slot: int, weight: CompressedWeight) -> None:
        for key, t in self.tensors.items():
            t[slot].copy_(getattr(weight, key))
        self._view(slot, weight)

    def _view(self, slot: int, weight: CompressedWeight) -> None:
        self._views[slot] = {key: t[slot] for key, t in self.tensors.items()}
        for key, view in self._views[slot].items():
            weight.register_buffer(key, view)

    def _grow(self, capacity: int) -> None:
        old = self.tensors
        self.tensors = {k: t.new_zeros((capacity, *t.shape[1:])) for k, t in old.items()}
        for k, t in old.items():
            self.tensors[k][: t.shape[0]].copy_(t)
        for slot, weight in self._weights.items():
            old_views, self._views[slot] = self._views[slot], {key: t[slot] for key, t in self.tensors.items()}
            for key, view in self._views[slot].items():
                if getattr(weight, key) is old_views[key]:  # a tensor replaced since stays (``holds`` rewrites it)
                    weight.register_buffer(key, view)

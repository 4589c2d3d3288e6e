"""Count the operations that make the host wait for the GPU, on any device (the CPU included).

``torch.cuda.set_sync_debug_mode`` only works on CUDA; this counter sees the same operations as they are
dispatched, so a CPU test can assert how many host syncs a step makes (``tests/serving/test_host_syncs.py``) and
``bench serve --profile`` reports them per decode step:

* a tensor value read on the host: ``item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``tolist()``, ``numpy()``,
  a copy of a device tensor to the host;
* an output whose size depends on values: ``nonzero``, ``unique``, ``masked_select``, ``repeat_interleave`` with
  tensor repeats and no ``output_size``, indexing with a boolean mask.

>>> with HostSyncCounter() as syncs:
...     step()
>>> syncs.count, syncs.reasons
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = {
    "nonzero",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "masked_select",
    "_local_scalar_dense",
}
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _has_bool_index(args) -> bool:
    for a in args:
        if isinstance(a, (list, tuple)) and _has_bool_index(a):
            return True
        if isinstance(a, torch.Tensor) and a.dtype == torch.bool and a.dim() > 0:
            return True
    return False


def _caller() -> str:
    """``file:line`` of the innermost hf_delta frame that led here (where the sync is made)."""
    for frame in reversed(traceback.extract_stack()):
        if "hf_delta" in frame.filename and not frame.filename.endswith("host_syncs.py"):
            return f"{frame.filename.split('hf_delta/')[-1]}:{frame.lineno}"
    return "?"


class _Counts(Counter):
    """Counts by reason, and ``where``: by reason and place."""

    def __init__(self) -> None:
        super().__init__()
        self.where: Counter = Counter()

    def add(self, reason: str) -> None:
        self[reason] += 1
        self.where[(reason, _caller())] += 1


class _Mode(TorchDispatchMode):
    def __init__(self, seen: _Counts, device_type: str | None):
        super().__init__()
        self.seen = seen
        self.device_type = device_type
        self.depth = 0  # inside a counted method: what it dispatches is the same sync

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.depth or not _on(self.device_type, args):
            pass
        elif name in _DATA_DEPENDENT:
            self.seen.add(name)
        elif (
            name == "repeat_interleave"
            and isinstance(args[0], torch.Tensor)
            and len(args) > 1
            and isinstance(args[1], torch.Tensor)
            and (kwargs or {}).get("output_size") is None
        ):
            self.seen.add("repeat_interleave")
        elif name in _INDEXING and _has_bool_index(args[1:2]):
            self.seen.add(f"{name}[bool mask]")
        elif name in ("_to_copy", "copy_") and _to_host(func, args, kwargs):
            self.seen.add("device to host copy")
        return func(*args, **(kwargs or {}))


def _to_host(func, args, kwargs) -> bool:
    source = args[1] if func.overloadpacket.__name__ == "copy_" else args[0]
    target = (kwargs or {}).get("device") if func.overloadpacket.__name__ == "_to_copy" else args[0].device
    return (
        isinstance(source, torch.Tensor)
        and source.device.type != "cpu"
        and target is not None
        and torch.device(target).type == "cpu"
    )


def _on(device_type: str | None, args) -> bool:
    """Whether ``args`` hold a tensor on ``device_type`` (any tensor when ``None``)."""
    for a in args:
        if isinstance(a, (list, tuple)) and _on(device_type, a):
            return True
        if isinstance(a, torch.Tensor) and (device_type is None or a.device.type == device_type):
            return True
    return False


class HostSyncCounter:
    """While entered, count host syncs by reason (``reasons``; ``reasons.where``: by reason and hf_delta source
    line) and in all (``count``).

    Args:
        device_type: count only operations on tensors of this device type (``"cuda"`` on a GPU, where reading a
            CPU tensor waits for nothing); ``None`` counts every tensor's (the CPU standing in for a GPU).
    """

    # Values read below the dispatcher, or not dispatched under ``torch.inference_mode`` (scalar reads of CPU
    # tensors): counted at the method instead, and the dispatched ``_local_scalar_dense`` they make is not counted
    # twice.
    _PATCHED = ("tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, device_type: str | None = None) -> None:
        self.reasons = _Counts()
        self._mode = _Mode(self.reasons, device_type)
        self._saved: dict[str, object] = {}

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def __enter__(self) -> HostSyncCounter:
        # tolist()/numpy() of a CPU tensor read its memory directly, below the dispatcher: count the calls.
        for name in self._PATCHED:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *a, _name=name, _original=original, **k):
                if self._mode.depth == 0 and _on(self._mode.device_type, (t,)):
                    self.reasons.add(_name)
                self._mode.depth += 1
                try:
                    return _original(t, *a, **k)
                finally:
                    self._mode.depth -= 1

            setattr(torch.Tensor, name, counted)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

"""Every byte count of the library in one place: tensors, shared storage, models as bf16, folders on disk.

Size ratios are the fine-tune's weights as bf16 safetensors over a delta's weight files (ARCHITECTURE.md);
memory figures count each storage once, so tensors that share memory (tied weights, views, a delta attached
to a CPU model) are not counted twice.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

MB = 2**20


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' elements (views and shared tensors counted as often as they appear)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def storage_bytes(tensors: Iterable[torch.Tensor], *, seen: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors``: what they hold in memory.

    Pass one ``seen`` set to several calls to count a storage only in the first call that meets it.
    """
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes a model's parameters and buffers hold in memory (shared storage counted once)."""
    return storage_bytes([*model.parameters(), *model.buffers()])


def bf16_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's floating-point weights as bf16 (tied tensors counted once): the size-ratio
    denominator."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or not t.is_floating_point():
            continue
        seen.add(t.data_ptr())
        total += t.numel() * 2
    return total


def safetensors_bf16_bytes(folder: str | Path) -> int:
    """Bytes the floating-point weights in ``folder``'s safetensors files take as bf16 (headers only are read)."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__" or not str(info.get("dtype", "")).startswith(("F", "BF")):
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            total += 2 * numel
    return total


def folder_bytes(folder: str | Path) -> dict[str, int]:
    """Bytes on disk of a model or delta folder: ``{"weights": safetensors files, "other": the rest}``."""
    weights = other = 0
    for f in Path(folder).iterdir():
        if f.is_file():
            if f.suffix == ".safetensors":
                weights += f.stat().st_size
            else:
                other += f.stat().st_size
    return {"weights": weights, "other": other}

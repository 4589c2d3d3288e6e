"""Keep the process's memory at what it holds: freed memory back to the OS, large temporaries in blocks.

glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap, so a loop that reads,
converts and drops tensors of tens of MB each grows the process by every size it has seen. Trimming after each
step keeps the process at what it holds (streaming a 0.85B pair: 1.3 GB peak instead of 2.4 GB); within a step
(a forward and backward over every layer) only mapping large blocks directly helps (``mapped_large_blocks``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Iterator

logger = logging.getLogger(__name__)

CHUNK_VALUES = 1 << 22  # values of a large matrix converted or unpacked at once (16 MB as float32)
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_DYNAMIC_MMAP_THRESHOLD_MAX = 32 << 20  # where glibc's adaptive threshold ends up after large frees


def row_blocks(rows: int, width: int, *, values: int | None = None) -> list[slice]:
    """Slices of ``rows`` rows of ``width`` values each, about ``values`` (default ``CHUNK_VALUES``) per slice."""
    step = max(1, (CHUNK_VALUES if values is None else values) // max(1, width))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


@functools.cache
def _libc_function(function: str):
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return None


def release_freed_memory() -> None:
    """Return the heap's free memory to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def mapped_large_blocks(threshold: int = 1 << 20) -> Iterator[None]:
    """Within the block, glibc serves allocations of ``threshold`` bytes or more with their own mappings.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), after which tensors of
    a few MB to 32 MB come from the heap, where a forward and backward over many layers fragment it: distilling a
    0.85B model's scales grew by ~50 MB per layer that way (8 layers: 2.98 GB peak; 2.48 GB with this alone). glibc
    cannot go back to its adaptive threshold, so on exit the threshold is set to where the adaptive one ends up
    after large frees (32 MB). A no-op without glibc.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, threshold):
        yield
        return
    logger.debug("glibc mmap threshold %d bytes for this step", threshold)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MMAP_THRESHOLD_MAX)
        release_freed_memory()

"""Memory a compression needs, checked before any work starts (a machine that cannot hold it gets a clear
error saying what would fit, not an out-of-memory kill an hour in)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InsufficientMemoryError

logger = logging.getLogger(__name__)

GB = 1e9
# Streaming one matrix: both checkpoint tensors (<= 4 bytes each), the fp32 delta and the method's fp32 work
# (BitDelta: |delta|, signs, the residual) -> about 16 bytes per value of the largest matrix.
STREAM_BYTES_PER_VALUE = 16
# In memory: both models in float32 (8 bytes per parameter) and every target matrix's fp32 delta (4 more).
IN_MEMORY_BYTES_PER_PARAMETER = 12


def available_bytes() -> int | None:
    """Memory the OS can still give this process (``MemAvailable``), or ``None`` where it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def check_fits(needed: int, *, what: str, advice: str) -> None:
    """Raise ``InsufficientMemoryError`` when ``needed`` bytes exceed what is available now."""
    free = available_bytes()
    logger.info("%s needs about %.1f GB of memory (%s GB available)", what, needed / GB,
                "?" if free is None else f"{free / GB:.1f}")
    if free is not None and needed > free:
        raise InsufficientMemoryError(
            f"{what} needs about {needed / GB:.1f} GB of memory, but only {free / GB:.1f} GB are available. "
            f"{advice}"
        )

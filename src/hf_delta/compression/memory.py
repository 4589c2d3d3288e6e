"""Memory a compression needs, checked before any work starts (a machine that cannot hold it gets a clear
error saying what would fit, not an out-of-memory kill an hour in)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import InsufficientMemoryError

logger = logging.getLogger(__name__)

GB = 1e9
# Streaming one matrix: both checkpoint tensors (<= 4 bytes each), the fp32 delta and the method's fp32 work
# (BitDelta: |delta|, signs, the residual) -> about 16 bytes per value of the largest matrix.
STREAM_BYTES_PER_VALUE = 16
# In memory: both models in float32 (8 bytes per parameter) and every target matrix's fp32 delta (4 more).
IN_MEMORY_BYTES_PER_PARAMETER = 12
# Scale distillation from checkpoints: the base in its own dtype plus ~10 % (packed signs, scales and their Adam
# state), the teacher's cache, and ~0.7 GB for Python, torch and one step's working memory (measured at 0.85B:
# 2.91 GB against 2.97 GB from these figures).
DISTILL_BASE_FACTOR = 1.1
DISTILL_FIXED_BYTES = int(0.7 * GB)


def distillation_bytes(base_bytes: int, *, tokens: int, hidden: int, head_bytes: int) -> int:
    """Memory scale distillation from checkpoints needs: the base (``base_bytes`` as stored) and its delta, the
    teacher's final hidden states for ``tokens`` calibration tokens (float32) and its output head as stored."""
    return int(DISTILL_BASE_FACTOR * base_bytes) + 4 * tokens * hidden + head_bytes + DISTILL_FIXED_BYTES


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


def check_fits(needed: int, *, what: str, advice: str, device: torch.device | None = None) -> None:
    """Raise ``InsufficientMemoryError`` when ``needed`` bytes exceed what is available now (in RAM, or on
    ``device`` when it is a GPU)."""
    on_gpu = device is not None and device.type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] if on_gpu else available_bytes()
    where = f"{device} memory" if on_gpu else "memory"
    logger.info("%s needs about %.1f GB of %s (%s GB available)", what, needed / GB, where,
                "?" if free is None else f"{free / GB:.1f}")
    if free is not None and needed > free:
        raise InsufficientMemoryError(
            f"{what} needs about {needed / GB:.1f} GB of {where}, but only {free / GB:.1f} GB are available. "
            f"{advice}"
        )

"""A paged key/value cache with a fixed token budget, shared by every request the engine runs.

The pool is allocated once (``[layers, blocks * block_size, kv_heads, head_dim]`` for keys and for values)
and never grows: a request owns a list of blocks (its *block table*), token ``p`` of the request lives at
physical row ``table[p // block_size] * block_size + p % block_size``. The scheduler admits a request only
when the blocks its prompt needs are free, and preempts a running request when decoding runs out of them,
so the cache's memory is exactly its configured budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ...errors import EngineConfigError
from ...utils.sizes import tensor_bytes

logger = logging.getLogger(__name__)


class PagedKVCache:
    """Fixed pool of KV blocks; per-request block tables.

    Args:
        num_layers, num_kv_heads, head_dim: shape of one token's keys (or values) across the model.
        max_tokens: the budget, in tokens, over all requests (rounded up to whole blocks).
        block_size: tokens per block; the unit of allocation.
        dtype, device: of the pool tensors (the model's).
    """

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_tokens < block_size or block_size < 1:
            raise EngineConfigError(f"kv_cache_tokens={max_tokens} must be at least one block ({block_size}).")
        self.block_size = block_size
        self.num_blocks = math.ceil(max_tokens / block_size)
        self.capacity = self.num_blocks * block_size
        shape = (num_layers, self.capacity, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))  # a stack: low ids are reused first
        self._tables: dict[str, list[int]] = {}
        self.peak_used_blocks = 0

    # ------------------------------------------------------------------------------------------ accounting
    @property
    def nbytes(self) -> int:
        """Bytes of the pool (keys and values): the cache's whole footprint, fixed at construction."""
        return tensor_bytes([self.keys, self.values])

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_tokens(self) -> int:
        """Tokens' worth of blocks handed out (a partly filled last block counts whole)."""
        return (self.num_blocks - len(self._free)) * self.block_size

    @property
    def peak_used_tokens(self) -> int:
        """The most tokens' worth of blocks ever handed out at once (never above ``capacity``)."""
        return self.peak_used_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def extra_blocks(self, handle: str, num_tokens: int) -> int:
        """Blocks ``handle`` still needs to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(handle, ())))

    # ---------------------------------------------------------------------------------------- allocation
    def reserve(self, handle: str, num_tokens: int) -> bool:
        """Grow ``handle``'s table to hold ``num_tokens`` tokens; False (and no change) if blocks run out."""
        need = self.extra_blocks(handle, num_tokens)
        if need > len(self._free):
            return False
        table = self._tables.setdefault(handle, [])
        for _ in range(need):
            table.append(self._free.pop())
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_blocks - len(self._free))
        return True

    def release(self, handle: str) -> None:
        """Give ``handle``'s blocks back to the pool (no-op for an unknown handle)."""
        self._free.extend(reversed(self._tables.pop(handle, [])))

    def holds(self, handle: str) -> bool:
        return handle in self._tables

    def spare_row(self) -> int | None:
        """A row of a free block (``None`` when every block is handed out), for writes whose values nobody reads:
        its next owner writes each position before reading it."""
        return self._free[0] * self.block_size if self._free else None

    def rows(self, handle: str, start: int, end: int) -> list[int]:
        """Physical pool rows of tokens ``start .. end-1`` of ``handle``."""
        table, bs = self._tables[handle], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def rows_tensor(self, handles: Sequence[str], lengths: Sequence[int], *, device: torch.device) -> torch.Tensor:
        """``[len(handles), max(lengths)]`` physical rows of tokens ``0 .. length-1`` per handle.

        Positions past a handle's length point at valid rows of block 0 (callers mask them out).
        """
        width, bs = max(lengths), self.block_size
        blocks = -(-width // bs)
        tables = torch.tensor([(t := self._tables[h][:blocks]) + [0] * (blocks - len(t)) for h in handles],
                              dtype=torch.long)
        pos = torch.arange(width)
        return (tables[:, pos // bs] * bs + pos % bs).to(device)

    # ----------------------------------------------------------------------------------------- per layer
    def write(self, layer: int, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` (``[n, kv_heads, head_dim]``) at physical ``rows`` of ``layer``."""
        self.keys[layer].index_copy_(0, rows, keys.to(self.keys.dtype))
        self.values[layer].index_copy_(0, rows, values.to(self.values.dtype))

    def gather(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``rows`` (any shape ``S``) of ``layer``: ``[*S, kv_heads, head_dim]`` each."""
        return self.keys[layer][rows], self.values[layer][rows]

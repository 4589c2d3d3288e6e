"""Large temporaries in blocks, and glibc's treatment of large allocations while compressing."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest
import torch

from hf_delta.utils import memory
from hf_delta.utils.memory import mapped_large_blocks, row_blocks


@pytest.mark.parametrize(("rows", "width", "values", "expected"), [
    (10, 4, 12, [(0, 3), (3, 6), (6, 9), (9, 10)]),
    (3, 100, 10, [(0, 1), (1, 2), (2, 3)]),  # a row wider than the budget: one row a block
    (0, 8, 64, []),
])
def test_row_blocks_cover_every_row_once_in_order(rows, width, values, expected):
    assert [(s.start, s.stop) for s in row_blocks(rows, width, values=values)] == expected


def test_row_blocks_default_to_the_module_budget_at_call_time(monkeypatch):
    monkeypatch.setattr(memory, "CHUNK_VALUES", 20)
    assert len(row_blocks(10, 5)) == 3


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mapped_bytes() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


@pytest.mark.skipif(not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"),
                    reason="glibc >= 2.33 reports its mapped blocks (mallinfo2); elsewhere the setting is a no-op")
def test_inside_the_block_a_few_mb_tensor_gets_its_own_mapping_and_outside_comes_from_the_heap():
    # Freeing a 24 MB block raises glibc's adaptive threshold past 4 MB: from then on such tensors come from the
    # heap, where a forward and backward over many layers fragment it.
    big = torch.ones(24 << 20, dtype=torch.uint8)
    del big
    before = _mapped_bytes()
    outside = torch.ones(4 << 20, dtype=torch.uint8)
    assert _mapped_bytes() - before < 4 << 20
    with mapped_large_blocks():
        inside = torch.ones(4 << 20, dtype=torch.uint8)
        assert _mapped_bytes() - before >= 4 << 20
    del inside
    after = torch.ones(4 << 20, dtype=torch.uint8)  # back to the heap once the block ends
    assert _mapped_bytes() - before < 4 << 20
    assert int(outside.sum()) == int(after.sum()) == 4 << 20

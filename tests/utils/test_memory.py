"""Large temporaries in blocks, and glibc's treatment of large allocations while compressing."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from hf_delta.utils import memory
from hf_delta.utils.memory import row_blocks


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


_HEAP_CHECK = """
import ctypes, ctypes.util, torch
from hf_delta.utils.memory import mapped_large_blocks

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
mapped = lambda: libc.mallinfo2().hblkhd
big = torch.ones(24 << 20, dtype=torch.uint8)  # freeing it raises glibc's adaptive threshold past 4 MB
del big
before = mapped()
outside = torch.ones(4 << 20, dtype=torch.uint8)
grew_outside = mapped() - before
with mapped_large_blocks():
    inside = torch.ones(4 << 20, dtype=torch.uint8)
    grew_inside = mapped() - before - grew_outside
del inside
after = torch.ones(4 << 20, dtype=torch.uint8)
print(grew_outside, grew_inside, mapped() - before - grew_outside, int(outside.sum() + after.sum()))
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"),
                    reason="glibc >= 2.33 reports its mapped blocks (mallinfo2); elsewhere the setting is a no-op")
def test_inside_the_block_a_few_mb_tensor_gets_its_own_mapping_and_outside_comes_from_the_heap():
    # glibc maps a block only when the heap has no free chunk to serve it: a fresh process, not this test run's
    # heap, shows the threshold's effect.
    result = subprocess.run([sys.executable, "-c", _HEAP_CHECK], capture_output=True, text=True, check=True)
    grew_outside, grew_inside, grew_after, total = map(int, result.stdout.split())
    assert grew_outside < 4 << 20  # from the heap
    assert grew_inside >= 4 << 20  # its own mapping inside the block
    assert grew_after < 4 << 20  # back to the heap once the block ends
    assert total == 8 << 20

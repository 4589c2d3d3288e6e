"""Property tests of every storage layout in hf_delta.packing: packing then unpacking is the identity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_delta.errors import DeltaConfigError
from hf_delta.packing import (
    pack_1bit_u8,
    pack_2of4_u8,
    pack_lowbit_u8,
    packed_width,
    unpack_1bit_u8,
    unpack_2of4_u8,
    unpack_lowbit_u8,
    unpack_signs,
)

shapes = st.tuples(st.integers(0, 5), st.integers(1, 70))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_1bit_round_trip_and_bit_order(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    positive = torch.rand(shape, generator=gen) > 0.5
    packed = pack_1bit_u8(positive)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], packed_width(shape[1], 1))
    assert torch.equal(unpack_1bit_u8(packed, shape[1]), positive)
    signs = unpack_signs(packed, shape[1])
    assert torch.equal(signs, positive.float() * 2 - 1)
    # Documented layout: element k is bit k % 8 of byte k // 8 (LSB first).
    for r in range(min(shape[0], 2)):
        for k in range(shape[1]):
            assert bool((int(packed[r, k // 8]) >> (k % 8)) & 1) == bool(positive[r, k])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 2**31 - 1))
def test_lowbit_round_trip(shape, bits, seed):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed))
    packed = pack_lowbit_u8(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] * 8 >= shape[1] * bits  # no more than the bits it needs, rounded to bytes
    assert packed.shape[-1] * 8 < shape[1] * bits + 8
    assert torch.equal(unpack_lowbit_u8(packed, bits, shape[1]), q.to(torch.int32))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 4), groups=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_2of4_metadata_round_trip(rows, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(rows, groups, 4, generator=gen).argsort(-1)
    keep = (order < 2).reshape(rows, groups * 4)
    packed = pack_2of4_u8(keep)
    assert packed.shape[-1] == (groups + 1) // 2  # 2 positions x 2 bits per group of 4 = half a byte
    assert torch.equal(unpack_2of4_u8(packed, groups * 4), keep)


def test_out_of_range_and_bad_masks_are_clear_errors():
    with pytest.raises(DeltaConfigError, match="out of range for 4-bit"):
        pack_lowbit_u8(torch.tensor([[8]]), 4)
    with pytest.raises(DeltaConfigError, match="supports"):
        pack_lowbit_u8(torch.tensor([[1]]), 5)
    with pytest.raises(DeltaConfigError, match="exactly 2 kept"):
        pack_2of4_u8(torch.tensor([[True, True, True, False]]))

"""Property tests of every storage layout in hf_delta.packing: packing then unpacking is the identity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_delta.errors import DeltaConfigError, DeltaFormatError
from hf_delta.packing import (
    compact_2of4_u8,
    compact_2of4_width,
    expand_2of4_u8,
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


def _random_2of4(rows: int, groups: int, seed: int) -> torch.Tensor:
    order = torch.rand(rows, groups, 4, generator=torch.Generator().manual_seed(seed)).argsort(-1)
    return (order < 2).reshape(rows, groups * 4)


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(0, 4), groups=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_compact_2of4_round_trip(rows, groups, seed):
    """Any mask, any multiple of 4 columns (most of them not a multiple of 12): compact then expand is the identity."""
    keep = _random_2of4(rows, groups, seed)
    meta = pack_2of4_u8(keep)
    compact = compact_2of4_u8(meta, 4 * groups)
    assert compact.dtype == torch.uint8 and compact.shape == (rows, compact_2of4_width(4 * groups))
    assert compact.shape[-1] == -(-groups // 3)  # three groups of 4 per byte
    assert compact.numel() == 0 or int(compact.max()) < 216
    expanded = expand_2of4_u8(compact, 4 * groups)
    assert expanded.dtype == torch.uint8 and torch.equal(expanded, meta)
    assert torch.equal(unpack_2of4_u8(expanded, 4 * groups), keep)


def test_compact_2of4_layout():
    # Pair codes in lexicographic order, three groups a byte: c0 + 6·c1 + 36·c2; a short last byte pads with 0.
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    codes = [5, 0, 3, 2, 4]
    keep = torch.zeros(1, 4 * len(codes), dtype=torch.bool)
    for g, c in enumerate(codes):
        keep[0, [4 * g + pairs[c][0], 4 * g + pairs[c][1]]] = True
    compact = compact_2of4_u8(pack_2of4_u8(keep), keep.shape[1])
    assert compact.tolist() == [[5 + 6 * 0 + 36 * 3, 2 + 6 * 4]]


def test_bad_compact_2of4_input_is_a_clear_error():
    meta = pack_2of4_u8(_random_2of4(2, 6, 0))
    compact = compact_2of4_u8(meta, 24)
    with pytest.raises(DeltaFormatError, match="byte 216"):
        expand_2of4_u8(torch.full_like(compact, 216), 24)
    with pytest.raises(DeltaFormatError, match="2 bytes a row"):
        expand_2of4_u8(compact[:, :1], 24)
    with pytest.raises(DeltaFormatError, match="must be uint8"):
        expand_2of4_u8(compact.to(torch.int16), 24)
    with pytest.raises(DeltaConfigError, match="multiple of 4 columns"):
        expand_2of4_u8(compact, 22)
    with pytest.raises(DeltaConfigError, match="distinct and ascending"):
        compact_2of4_u8(torch.zeros_like(meta), 24)  # nibble 0: both positions 0
    with pytest.raises(DeltaConfigError, match="3 bytes a row"):
        compact_2of4_u8(meta[:, :2], 24)


def test_out_of_range_and_bad_masks_are_clear_errors():
    with pytest.raises(DeltaConfigError, match="out of range for 4-bit"):
        pack_lowbit_u8(torch.tensor([[8]]), 4)
    with pytest.raises(DeltaConfigError, match="supports"):
        pack_lowbit_u8(torch.tensor([[1]]), 5)
    with pytest.raises(DeltaConfigError, match="exactly 2 kept"):
        pack_2of4_u8(torch.tensor([[True, True, True, False]]))



def _reference_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented layout, byte by byte in Python: element k at bits (k % per) * bits of byte k // per,
    offset-binary for signed widths (1 bit: a set bit is True)."""
    per, k = 8 // bits, values.shape[-1]
    offset = 0 if bits == 1 else 1 << (bits - 1)
    rows = values.reshape(-1, k).tolist()
    out = [[sum((int(row[j]) + offset) << ((j % per) * bits) for j in range(b * per, min(k, (b + 1) * per)))
            for b in range(packed_width(k, bits))] for row in rows]
    return torch.tensor(out, dtype=torch.uint8).reshape(*values.shape[:-1], packed_width(k, bits))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(1, 40), bits=st.sampled_from([1, 2, 4, 8]),
       chunk=st.integers(1, 100), seed=st.integers(0, 2**31 - 1))
def test_packing_in_row_chunks_matches_the_layout(rows, k, bits, chunk, seed):
    """Large matrices are packed a few rows at a time (bounded int32 work); the bytes must not depend on it."""
    from hf_delta import packing

    gen = torch.Generator().manual_seed(seed)
    if bits == 1:
        values = torch.rand(2, rows, k, generator=gen) > 0.5
        pack = pack_1bit_u8
    else:
        values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (2, rows, k), generator=gen)
        pack = lambda v: pack_lowbit_u8(v, bits)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "_PACK_CHUNK_VALUES", chunk)
        assert torch.equal(pack(values), _reference_pack(values, bits))

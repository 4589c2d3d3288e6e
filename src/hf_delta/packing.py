"""Every storage layout in one place: sign bits and low-bit integers packed into uint8.

Layouts (all row-major, packed along the last axis = ``in_features``, little-endian inside a byte):

* 1 bit: element ``k`` of a row is bit ``k % 8`` of byte ``k // 8``; a set bit means ``+1``, a clear bit
  ``-1``. Rows are padded with clear bits to a whole byte, so any ``in_features`` works.
* 2 / 4 / 8 bits: element ``k`` occupies bits ``(k % per) * bits ...`` of byte ``k // per`` with
  ``per = 8 // bits``; values are stored offset-binary (``q + 2**(bits-1)``) so signed ints fit unsigned.
"""

from __future__ import annotations

import math

import torch

from .errors import DeltaConfigError, DeltaFormatError


def packed_width(in_features: int, bits: int) -> int:
    """Bytes per packed row of ``in_features`` values at ``bits`` bits each."""
    per = 8 // bits
    return (in_features + per - 1) // per


def _check_bits(bits: int) -> None:
    if bits not in (1, 2, 4, 8):
        raise DeltaConfigError(f"Packing supports 1, 2, 4 or 8 bits per value, got {bits}.")


_PACK_CHUNK_VALUES = 1 << 22  # values packed at once: the int32 work of a whole 32000-row matrix is ~1 GB


def _pack(values: torch.Tensor, bits: int, *, offset: int = 0) -> torch.Tensor:
    """Pack ints with ``0 <= values + offset < 2**bits`` along the last axis.

    Rows are packed in chunks, so the int32 intermediates stay a few MB whatever the matrix size.
    """
    per = 8 // bits
    k = values.shape[-1]
    width = packed_width(k, bits)
    rows = values.reshape(math.prod(values.shape[:-1]), k)
    out = torch.empty(rows.shape[0], width, dtype=torch.uint8, device=values.device)
    shifts = torch.arange(per, dtype=torch.int32, device=values.device) * bits
    step = max(1, _PACK_CHUNK_VALUES // max(k, 1))
    for r in range(0, rows.shape[0], step):
        # Explicit sizes (not -1): a tensor with zero rows must pack too.
        chunk = torch.nn.functional.pad(rows[r : r + step].to(torch.int32) + offset, (0, width * per - k))
        v = chunk.reshape(chunk.shape[0], width, per) << shifts
        out[r : r + step] = v.sum(-1, dtype=torch.int32).to(torch.uint8)
    return out.reshape(*values.shape[:-1], width)


def _unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    v = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :in_features]


def pack_1bit_u8(positive: torch.Tensor) -> torch.Tensor:
    """Pack a boolean "is positive" tensor ``[..., K]`` into uint8 ``[..., ceil(K / 8)]``."""
    return _pack(positive, 1)


def unpack_1bit_u8(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_1bit_u8``: a boolean tensor ``[..., in_features]``."""
    return _unpack(packed, 1, in_features).bool()


_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed sign bits to a ``±1`` tensor of ``dtype``.

    One lookup in a 256 × 8 table of ±1 per byte: the CPU serving path calls this for every resident delta at every
    layer and step, and the table is ~4x faster than shifting and masking.
    """
    key = (dtype, packed.device)
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (bits.to(dtype) * 2 - 1).to(packed.device)
    signs = torch.nn.functional.embedding(packed.long(), _SIGN_TABLES[key])
    return signs.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :in_features]


def pack_int_u8(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ints in ``[-2**(bits-1), 2**(bits-1) - 1]`` along the last axis into uint8."""
    _check_bits(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise DeltaConfigError(f"Values out of range for {bits}-bit packing: [{int(q.min())}, {int(q.max())}].")
    return _pack(q, bits, offset=-lo)


def unpack_int_u8(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_int_u8``: int32 values ``[..., in_features]``."""
    _check_bits(bits)
    return _unpack(packed, bits, in_features) + (-(1 << (bits - 1)))


# ---------------------------------------------------------------------------------------------------
# 3-bit values and 2:4 sparsity metadata (DeltaZip)
#
# * 3 bits: a row is one little-endian bit stream; element ``k`` occupies stream bits ``3k .. 3k + 2``
#   (stream bit ``b`` is bit ``b % 8`` of byte ``b // 8``), offset-binary like the other widths. Rows are
#   padded with zero bits to a whole byte: ``ceil(3 * K / 8)`` bytes per row.
# * 2:4 metadata: each group of 4 columns keeps exactly 2; the two in-group positions (ascending, 0..3)
#   are 2-bit values in the 2-bit layout above, so a row of ``K`` columns takes ``K / 8`` bytes. The kept
#   values themselves are stored densely elsewhere, ``K / 2`` per row, in column order.
# ---------------------------------------------------------------------------------------------------

# The widths DeltaZip quantises to (the one table: its config, the kernels and the packers read it here).
LOWBIT_WIDTHS = (2, 3, 4, 8)


def lowbit_packed_width(values: int, bits: int) -> int:
    """Bytes per packed row of ``values`` ints at ``bits`` bits (a 3-bit row is one bit stream)."""
    return (values * bits + 7) // 8


def pack_int3_u8(q: torch.Tensor) -> torch.Tensor:
    """Pack signed ints in ``[-4, 3]`` along the last axis, 3 bits each, into uint8 ``[..., ceil(3K / 8)]``."""
    if q.numel() and (int(q.min()) < -4 or int(q.max()) > 3):
        raise DeltaConfigError(f"Values out of range for 3-bit packing: [{int(q.min())}, {int(q.max())}].")
    k = q.shape[-1]
    shifts = torch.arange(3, dtype=torch.int32, device=q.device)
    stream = ((q.to(torch.int32) + 4).unsqueeze(-1) >> shifts) & 1  # [..., K, 3], low bit first
    stream = stream.reshape(*q.shape[:-1], 3 * k)
    return _pack(stream, 1)


def unpack_int3_u8(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_int3_u8``: int32 values ``[..., in_features]``."""
    bits = _unpack(packed, 1, 3 * in_features).reshape(*packed.shape[:-1], in_features, 3)
    weights = torch.tensor([1, 2, 4], dtype=torch.int32, device=packed.device)
    return (bits * weights).sum(-1) - 4


def pack_lowbit_u8(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit ints (2, 3, 4 or 8) along the last axis with the layout of that width."""
    if bits not in LOWBIT_WIDTHS:
        raise DeltaConfigError(f"Low-bit packing supports {LOWBIT_WIDTHS} bits per value, got {bits}.")
    return pack_int3_u8(q) if bits == 3 else pack_int_u8(q, bits)


def unpack_lowbit_u8(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_lowbit_u8``: int32 values ``[..., in_features]``."""
    if bits not in LOWBIT_WIDTHS:
        raise DeltaConfigError(f"Low-bit packing supports {LOWBIT_WIDTHS} bits per value, got {bits}.")
    return unpack_int3_u8(packed, in_features) if bits == 3 else unpack_int_u8(packed, bits, in_features)


def pack_2of4_u8(keep: torch.Tensor) -> torch.Tensor:
    """2:4 metadata of a boolean mask ``[..., K]`` (``K % 4 == 0``, exactly 2 kept per group of 4)."""
    k = keep.shape[-1]
    groups = keep.reshape(*keep.shape[:-1], k // 4, 4) if k % 4 == 0 else None
    if groups is None or bool((groups.sum(-1) != 2).any()):
        raise DeltaConfigError("A 2:4 mask needs a multiple of 4 columns and exactly 2 kept values per group of 4.")
    # Ascending positions of the two kept columns: sort puts True (1) last, stable keeps column order.
    pos = torch.sort(groups.to(torch.int8), dim=-1, stable=True).indices[..., 2:]
    return _pack(pos.reshape(*keep.shape[:-1], k // 2), 2)


def unpack_2of4_u8(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_2of4_u8``: the boolean keep mask ``[..., in_features]``."""
    pos = _unpack(packed, 2, in_features // 2).long()
    cols = pos + 4 * (torch.arange(in_features // 2, device=packed.device) // 2)
    keep = torch.zeros((*packed.shape[:-1], in_features), dtype=torch.bool, device=packed.device)
    return keep.scatter_(-1, cols, True)


# ---------------------------------------------------------------------------------------------------
# Compact 2:4 metadata (the on-disk form; ``pack_2of4_u8`` stays the in-memory form the kernels read)
#
# A group of 4 keeps one of only C(4, 2) = 6 pairs, so 2 x 2 bits of positions waste 4 - log2(6) = 1.4 bits.
# Each group's pair gets a code 0..5 in lexicographic order ((0,1), (0,2), (0,3), (1,2), (1,3), (2,3)), and
# three consecutive groups of a row share one byte: ``c0 + 6·c1 + 36·c2`` (at most 215). A row of ``K``
# columns takes ``ceil(K / 12)`` bytes (2/3 bit per weight instead of 1); a last byte with fewer than three
# groups pads with code 0.
# ---------------------------------------------------------------------------------------------------

_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_INVALID = 255  # code of a nibble that is no pair of distinct ascending positions


def _byte_codes() -> torch.Tensor:
    """``[256, 2]`` uint8: the pair codes of the two groups (low nibble, high nibble) of a ``pack_2of4_u8`` byte.

    In that layout a group is one nibble: its first kept position in bits 0-1, its second in bits 2-3.
    """
    nibble_code = torch.full((16,), _INVALID, dtype=torch.uint8)
    for code, (a, b) in enumerate(_PAIRS):
        nibble_code[a | (b << 2)] = code
    byte = torch.arange(256)
    return torch.stack((nibble_code[byte & 15], nibble_code[byte >> 4]), dim=-1)


_BYTE_CODES = _byte_codes()
_EXPAND_TABLES: dict[torch.device, torch.Tensor] = {}


def _expand_table(device: torch.device) -> torch.Tensor:
    """``[216 * 216, 3]`` uint8: two compact bytes (six groups) → the three ``pack_2of4_u8`` bytes of those groups.

    One gather per pair of compact bytes is ~10x faster than decoding codes arithmetically (it runs at every load).
    """
    if device not in _EXPAND_TABLES:
        nibble = torch.tensor([a | (b << 2) for a, b in _PAIRS], dtype=torch.uint8)
        byte = torch.arange(216)
        codes = torch.stack((byte % 6, byte // 6 % 6, byte // 36), dim=-1)  # [216, 3]
        pairs = nibble[torch.cat((codes.repeat_interleave(216, 0), codes.repeat(216, 1)), dim=-1)]  # [216², 6]
        _EXPAND_TABLES[device] = (pairs[:, 0::2] | (pairs[:, 1::2] << 4)).to(device)
    return _EXPAND_TABLES[device]


def compact_2of4_width(in_features: int) -> int:
    """Bytes per row of compact 2:4 metadata for ``in_features`` columns (three groups of 4 per byte)."""
    return (in_features // 4 + 2) // 3


def _check_2of4_columns(in_features: int) -> int:
    if in_features % 4:
        raise DeltaConfigError(f"2:4 metadata needs a multiple of 4 columns, got in_features={in_features}.")
    return in_features // 4


def compact_2of4_u8(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """``pack_2of4_u8`` metadata ``[..., ceil(K / 8)]`` to the compact form ``[..., ceil(K / 12)]``."""
    groups = _check_2of4_columns(in_features)
    lead = meta.shape[:-1]
    if meta.dtype != torch.uint8 or meta.shape[-1] != (groups + 1) // 2:
        raise DeltaConfigError(f"2:4 metadata of {in_features} columns is uint8 with {(groups + 1) // 2} bytes a "
                               f"row, got {meta.dtype} {tuple(meta.shape)}.")
    codes = _BYTE_CODES.to(meta.device)[meta.long()].reshape(*lead, 2 * meta.shape[-1])[..., :groups]
    if codes.numel() and int(codes.max()) == _INVALID:
        raise DeltaConfigError("Not 2:4 metadata: a group's two positions must be distinct and ascending.")
    width = compact_2of4_width(in_features)
    codes = torch.nn.functional.pad(codes, (0, 3 * width - groups)).reshape(*lead, width, 3)
    return codes[..., 0] + 6 * codes[..., 1] + 36 * codes[..., 2]  # at most 215: exact in uint8


def expand_2of4_u8(compact: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``compact_2of4_u8``: the ``pack_2of4_u8`` metadata ``[..., ceil(K / 8)]``.

    Raises:
        DeltaFormatError: the bytes are not compact 2:4 metadata of ``in_features`` columns (a corrupt file).
    """
    groups = _check_2of4_columns(in_features)
    width = compact_2of4_width(in_features)
    if compact.dtype != torch.uint8 or compact.shape[-1] != width:
        raise DeltaFormatError(
            f"Compact 2:4 metadata of {in_features} columns must be uint8 with {width} bytes a row, got "
            f"{compact.dtype} {tuple(compact.shape)}; the delta file is corrupt, re-save it.")
    if compact.numel() and int(compact.max()) >= 6**3:
        raise DeltaFormatError(f"Compact 2:4 metadata holds byte {int(compact.max())} (at most 215 is valid); the "
                               "delta file is corrupt, re-save it.")
    lead = compact.shape[:-1]
    c = torch.nn.functional.pad(compact, (0, width % 2)).to(torch.int32)  # whole pairs of bytes
    index = (c[..., 0::2] * 216 + c[..., 1::2]).reshape(-1)
    out = _expand_table(compact.device).index_select(0, index)
    out = out.reshape(*lead, 3 * c.shape[-1] // 2)[..., : (groups + 1) // 2]  # explicit sizes: zero rows work too
    if groups % 2:  # the last byte holds one group: its high nibble is 0 in pack_2of4_u8's layout
        out = out.clone()
        out[..., -1] &= 15
    return out.contiguous()

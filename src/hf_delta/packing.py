"""Every storage layout in one place: sign bits and low-bit integers packed into uint8.

Layouts (all row-major, packed along the last axis = ``in_features``, little-endian inside a byte):

* 1 bit: element ``k`` of a row is bit ``k % 8`` of byte ``k // 8``; a set bit means ``+1``, a clear bit
  ``-1``. Rows are padded with clear bits to a whole byte, so any ``in_features`` works.
* 2 / 4 / 8 bits: element ``k`` occupies bits ``(k % per) * bits ...`` of byte ``k // per`` with
  ``per = 8 // bits``; values are stored offset-binary (``q + 2**(bits-1)``) so signed ints fit unsigned.
"""

from __future__ import annotations

import torch

from .errors import DeltaConfigError


def packed_width(in_features: int, bits: int) -> int:
    """Bytes per packed row of ``in_features`` values at ``bits`` bits each."""
    per = 8 // bits
    return (in_features + per - 1) // per


def _check_bits(bits: int) -> None:
    if bits not in (1, 2, 4, 8):
        raise DeltaConfigError(f"Packing supports 1, 2, 4 or 8 bits per value, got {bits}.")


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative ints < 2**bits along the last axis."""
    per = 8 // bits
    k = values.shape[-1]
    pad = packed_width(k, bits) * per - k
    v = torch.nn.functional.pad(values.to(torch.int32), (0, pad)).reshape(*values.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=values.device) * bits
    return (v << shifts).sum(-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    v = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(*packed.shape[:-1], -1)[..., :in_features]


def pack_1bit_u8(positive: torch.Tensor) -> torch.Tensor:
    """Pack a boolean "is positive" tensor ``[..., K]`` into uint8 ``[..., ceil(K / 8)]``."""
    return _pack(positive.to(torch.int32), 1)


def unpack_1bit_u8(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_1bit_u8``: a boolean tensor ``[..., in_features]``."""
    return _unpack(packed, 1, in_features).bool()


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed sign bits to a ``±1`` tensor of ``dtype``."""
    return unpack_1bit_u8(packed, in_features).to(dtype) * 2 - 1


def pack_int_u8(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ints in ``[-2**(bits-1), 2**(bits-1) - 1]`` along the last axis into uint8."""
    _check_bits(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise DeltaConfigError(f"Values out of range for {bits}-bit packing: [{int(q.min())}, {int(q.max())}].")
    return _pack(q.to(torch.int32) - lo, bits)


def unpack_int_u8(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_int_u8``: int32 values ``[..., in_features]``."""
    _check_bits(bits)
    return _unpack(packed, bits, in_features) + (-(1 << (bits - 1)))

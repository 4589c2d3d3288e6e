"""``DeltaZipWeight``: a pruned and quantised delta matrix, its packed layouts and its batched apply."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ...errors import DeltaFormatError
from ...packing import (
    compact_2of4_u8,
    expand_2of4_u8,
    pack_1bit_u8,
    pack_2of4_u8,
    pack_lowbit_u8,
    unpack_1bit_u8,
    unpack_2of4_u8,
    unpack_lowbit_u8,
)
from .._dispatch import kernels_forced, stacked_slots, use_kernels
from ..base import CompressedWeight

if TYPE_CHECKING:
    pass


LAYOUTS = ("dense", "2:4", "bitmap")
_MIN_SCALE = 2.0**-24  # smallest positive fp16: a zero scale would divide by zero
_COMPACT_2OF4 = "2of4-compact"  # the disk encoding of 2:4 masks (format 2)


class DeltaZipWeight(CompressedWeight):
    """Symmetric low-bit ints times fp16 scales, stored in one of three layouts.

    * ``dense``: ``qweight`` = every value, ``[rows, packed(in)]``.
    * ``2:4``: ``qweight`` = the 2 kept values of each group of 4 columns, ``[rows, packed(in / 2)]``, and
      ``mask`` = their 2-bit in-group positions, ``[rows, in / 8]`` (``packing.pack_2of4_u8``).
    * ``bitmap`` (unstructured sparsity): ``mask`` = 1 bit per value (kept or not), ``[rows, ceil(in / 8)]``,
      and ``qweight`` = the kept values of all rows in row-major order, packed as one flat row.

    ``scales`` is ``[rows, in / group_size]`` (or ``[rows, 1]`` per output channel); ``Δ̂ = q · scale``.
    ``rows = out`` unless ``row_index`` (int32) is present: then only those rows are stored and every other row
    is zero. Embedding deltas need it: a token that never occurs in the fine-tuning data gets no gradient,
    so most of their rows are exactly zero.

    On disk (``saved_tensors``) a 2:4 ``mask`` is compact (``packing.compact_2of4_u8``: 2/3 bit per weight instead
    of 1; ``"mask_encoding": "2of4-compact"`` in its meta) and is expanded back when the delta is loaded.
    """

    method = "deltazip"

    def __init__(self, shape: tuple[int, int], *, bits: int, group_size: int | None, layout: str,
                 qweight: torch.Tensor, scales: torch.Tensor, mask: torch.Tensor | None = None,
                 row_index: torch.Tensor | None = None):
        super().__init__(shape)
        self.bits = int(bits)
        self.group_size = group_size
        self.layout = layout
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        if layout != "dense":
            self.register_buffer("mask", mask)
        if row_index is not None:
            self.register_buffer("row_index", row_index)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, keep: torch.Tensor | None, *, bits: int,
                       group_size: int | None, layout: str) -> DeltaZipWeight:
        """Pack ints ``q`` ``[out, in]`` (zero where ``keep`` is False) with fp16 ``scales``."""
        shape = tuple(q.shape)
        nonzero = (q != 0).any(dim=1)
        nonzero[0] = True  # store at least one row: the packers need a non-empty tensor
        row_index = None
        # Bytes of a stored row (values, fp16 scales, 2:4 or bitmap metadata) vs 4 bytes per index entry.
        values = shape[1] // 2 if layout == "2:4" else shape[1]
        row_bytes = math.ceil(values * bits / 8) + 2 * scales.shape[1] + (math.ceil(shape[1] / 8) if keep is not None
                                                                          else 0)
        if 4 * int(nonzero.sum()) < row_bytes * int((~nonzero).sum()):
            row_index = nonzero.nonzero().squeeze(1).to(torch.int32)
            q, scales = q[nonzero], scales[nonzero]
            keep = keep[nonzero] if keep is not None else None
        extra = {"bits": bits, "group_size": group_size, "layout": layout, "scales": scales, "row_index": row_index}
        if layout == "dense":
            return cls(shape, qweight=pack_lowbit_u8(q, bits), **extra)
        if layout == "2:4":
            kept = q[keep].reshape(q.shape[0], shape[1] // 2)
            return cls(shape, qweight=pack_lowbit_u8(kept, bits), mask=pack_2of4_u8(keep), **extra)
        return cls(shape, qweight=pack_lowbit_u8(q[keep], bits), mask=pack_1bit_u8(keep), **extra)

    @property
    def _row_index(self) -> torch.Tensor | None:
        return getattr(self, "row_index", None)

    def _ints(self, qweight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Dense int values ``[rows, in]`` of (a selection of) the stored rows."""
        k = self.shape[1]
        if self.layout == "dense":
            return unpack_lowbit_u8(qweight, self.bits, k)
        keep = unpack_2of4_u8(mask, k) if self.layout == "2:4" else unpack_1bit_u8(mask, k)
        width = k // 2 if self.layout == "2:4" else int(keep.sum())
        values = unpack_lowbit_u8(qweight, self.bits, width)
        out = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
        out[keep] = values.reshape(-1)
        return out

    def _expand(self, scales: torch.Tensor) -> torch.Tensor:
        if scales.shape[1] == 1:
            return scales.float()
        return scales.float().repeat_interleave(self.group_size, dim=1)

    def _stored(self) -> torch.Tensor:
        """The stored rows, dequantised (fp32)."""
        return self._ints(self.qweight, getattr(self, "mask", None)).float() * self._expand(self.scales)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        stored = self._stored()
        if self._row_index is None:
            return stored.to(dtype)
        out = torch.zeros(self.shape, dtype=dtype, device=stored.device)
        out[self._row_index.long()] = stored.to(dtype)
        return out

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.layout == "bitmap":  # rows start at data-dependent offsets: decode the whole matrix
            return self.to_dense(dtype)[index]
        flat = index.reshape(-1)
        out = torch.zeros(len(flat), self.shape[1], dtype=torch.float32, device=self.qweight.device)
        if self._row_index is None:
            pos, found = flat, slice(None)
        else:  # stored position of each requested row, -1 for the all-zero rows that are not stored
            where = torch.full((self.shape[0],), -1, dtype=torch.long, device=flat.device)
            where[self._row_index.long()] = torch.arange(len(self._row_index), device=flat.device)
            pos = where[flat]
            found = pos >= 0
            pos = pos[found]
        if len(pos):  # the unpackers cannot take zero rows (all requested rows may be unstored zeros)
            mask = self.mask[pos] if self.layout == "2:4" else None
            out[found] = self._ints(self.qweight[pos], mask).float() * self._expand(self.scales[pos])
        return out.reshape(*index.shape, self.shape[1]).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales.shape[1] == 1:  # per-channel: scale after the matmul, on [.., rows] instead of [rows, in]
            ints = self._ints(self.qweight, getattr(self, "mask", None)).to(x.dtype)
            y = (x @ ints.T) * self.scales[:, 0].to(x.dtype)
        else:
            y = x @ self._stored().to(x.dtype).T
        if self._row_index is None:
            return y
        out = torch.zeros((*x.shape[:-1], self.shape[0]), dtype=y.dtype, device=y.device)
        return out.index_copy_(-1, self._row_index.long(), y)

    def _fusable(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether the kernel computes this delta's product on ``x`` (formats it cannot tile: 3-bit, bitmap, only
        some rows stored; other dtypes and autograd take the generic dense path)."""
        if not use_kernels(x):
            return False
        from hf_delta.kernels import deltazip_kernel_supports

        return (deltazip_kernel_supports(self.bits, self.layout) and self._row_index is None
                and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and out.dtype == x.dtype)

    def _positions(self) -> torch.Tensor | None:
        return self.mask if self.layout == "2:4" else None

    def add_to_rows(self, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None) -> None:
        # Fused on CUDA (or on CPU when HF_DELTA_KERNELS=triton forces the interpreted kernel, for tests): the
        # kernel reads the packed ints once, picks this delta's rows by slot (0 = this delta, -1 = skip) and adds
        # x @ (q * scale)ᵀ straight into the base output; no gather, no dense delta.
        if not self._fusable(x, out):
            super().add_to_rows(x, out, rows)
            return
        from hf_delta.kernels import deltazip_matmul

        slots, plan = stacked_slots([rows], x.shape[0], x.device)
        positions = self._positions()
        deltazip_matmul(x.contiguous(), out, slots, self.qweight.unsqueeze(0), self.scales.unsqueeze(0),
                        bits=self.bits, layout=self.layout, group_size=self.group_size, plan=plan,
                        positions=None if positions is None else positions.unsqueeze(0),
                        backend="triton" if kernels_forced() else "auto")

    def slot_format(self) -> tuple[Any, ...] | None:
        # The formats the kernel tiles have a resident buffer; the others (3-bit, bitmap, only some rows stored)
        # keep the per-delta path.
        from hf_delta.kernels import deltazip_kernel_supports

        if self._row_index is not None or not deltazip_kernel_supports(self.bits, self.layout):
            return None
        return (self.shape, self.bits, self.layout, self.group_size)

    @classmethod
    def add_to_rows_resident(cls, resident: dict[str, torch.Tensor], index: list[int],
                             weights: list[CompressedWeight], x: torch.Tensor, out: torch.Tensor,
                             rows: list[torch.Tensor], slot_plan: Callable[[], tuple[torch.Tensor, Any]]) -> bool:
        first = weights[0]
        if not first._fusable(x, out):
            return False
        from hf_delta.kernels import deltazip_matmul

        # One launch for every delta of the layer in this format: the kernel reads the buffer's rows by slot.
        slots, plan = slot_plan()
        deltazip_matmul(x.contiguous(), out, slots, resident["qweight"], resident["scales"], bits=first.bits,
                        layout=first.layout, group_size=first.group_size, plan=plan, positions=resident.get("mask"),
                        backend="triton" if kernels_forced() else "auto")
        return True

    def meta(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "bits": self.bits, "group_size": self.group_size, "layout": self.layout,
                "row_index": self._row_index is not None}

    def saved_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = dict(self.named_buffers()), self.meta()
        if self.layout == "2:4":
            tensors["mask"] = compact_2of4_u8(self.mask, self.shape[1])
            meta["mask_encoding"] = _COMPACT_2OF4
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> DeltaZipWeight:
        layout = meta.get("layout", "dense")
        mask = tensors["mask"] if layout != "dense" else None
        encoding = meta.get("mask_encoding")  # absent: the in-memory layout (every format-1 repo)
        if encoding is not None:
            if encoding != _COMPACT_2OF4 or layout != "2:4":
                raise DeltaFormatError(
                    f"Unknown mask_encoding {encoding!r} for layout {layout!r} (this hf_delta reads "
                    f"{_COMPACT_2OF4!r} for '2:4'); upgrade hf_delta or re-save the delta.")
            mask = expand_2of4_u8(mask, meta["shape"][1])
        return cls(tuple(meta["shape"]), bits=meta["bits"], group_size=meta.get("group_size"), layout=layout,
                   qweight=tensors["qweight"], scales=tensors["scales"], mask=mask,
                   row_index=tensors["row_index"] if meta.get("row_index") else None)

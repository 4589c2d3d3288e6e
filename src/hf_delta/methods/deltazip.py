"""DeltaZip: each delta matrix pruned (2:4 or unstructured) and quantised (2/3/4/8 bit) jointly, GPTQ-style.

For a linear layer with calibration inputs ``X`` the objective is ``min ||X (Δ − Δ̂)ᵀ||²``, whose Hessian is
``H = 2 XᵀX / n`` (plus ``damp · mean(diag H)`` on the diagonal). Columns are visited left to right; each
column is pruned (OBS saliency ``w² / [U]_jj²``, ``U`` the upper Cholesky factor of ``H⁻¹``) and quantised,
and its error ``e = (w − q) / U_jj`` is spread over the columns not yet visited: ``W[:, j:] -= e · U[j, j:]``
(applied lazily per block of columns). Layers are compressed in forward order, and each layer is calibrated
on the activations of the model whose earlier layers already carry their compressed deltas.

The embedding has no input activations, so vocabulary matrices are quantised round-to-nearest per row
(``embedding_method="rtn"``); ``"gptq"`` calibrates the output head's matrix on the head's inputs instead, be it
untied or tied to the embedding (then the one matrix serves both).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import DeltaConfig
from ..errors import CalibrationError, DeltaConfigError, DeltaFormatError
from ..extract import vocab_module_names
from ..packing import (
    LOWBIT_WIDTHS,
    compact_2of4_u8,
    expand_2of4_u8,
    pack_1bit_u8,
    pack_2of4_u8,
    pack_lowbit_u8,
    unpack_1bit_u8,
    unpack_2of4_u8,
    unpack_lowbit_u8,
)
from ._dispatch import kernels_forced, stacked_slots, use_kernels
from .base import CompressedWeight, CompressionContext, DeltaMethod
from .registry import register_delta_method

if TYPE_CHECKING:
    from ..calibration import Batch

logger = logging.getLogger(__name__)

LAYOUTS = ("dense", "2:4", "bitmap")
_MIN_SCALE = 2.0**-24  # smallest positive fp16: a zero scale would divide by zero
_COMPACT_2OF4 = "2of4-compact"  # the disk encoding of 2:4 masks (format 2)


# ===================================================================================================
# Storage
# ===================================================================================================


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

    @classmethod
    def add_to_rows_many(cls, weights: list[CompressedWeight], x: torch.Tensor, out: torch.Tensor,
                         rows: list[torch.Tensor | None]) -> None:
        # Deltas of one layer in the same format (bits, layout, scale groups) go through one kernel launch.
        first = weights[0]
        same = len(weights) > 1 and all(r is not None for r in rows) and all(
            isinstance(w, DeltaZipWeight) and w._fusable(x, out) and (w.bits, w.layout, w.group_size)
            == (first.bits, first.layout, first.group_size) and w.scales.shape == first.scales.shape
            and w.scales.dtype == first.scales.dtype for w in weights)
        if not same:
            super().add_to_rows_many(weights, x, out, rows)
            return
        from hf_delta.kernels import deltazip_matmul

        slots, plan = stacked_slots(rows, x.shape[0], x.device)
        positions = first._positions()
        deltazip_matmul(x.contiguous(), out, slots, torch.stack([w.qweight for w in weights]),
                        torch.stack([w.scales for w in weights]), bits=first.bits, layout=first.layout,
                        group_size=first.group_size, plan=plan,
                        positions=None if positions is None else torch.stack([w._positions() for w in weights]),
                        backend="triton" if kernels_forced() else "auto")

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


# ===================================================================================================
# Config
# ===================================================================================================


@dataclass
class DeltaZipConfig(DeltaConfig):
    """DeltaZip: joint OBS pruning + GPTQ quantisation of each delta matrix, layer by layer.

    Args:
        bits: bits per stored value: 2, 3, 4 or 8 (symmetric ints, scale per channel or group).
        sparsity: ``"2:4"`` (keep 2 of every 4 input columns, halves the stored values), a fraction in
            ``[0, 1)`` of values to prune unstructured (stored with a 1-bit mask when that is smaller), or
            ``None`` for no pruning.
        group_size: input columns sharing one scale; ``None`` = one scale per output channel.
        damp: added to the Hessian diagonal as a fraction of its mean (stabilises the inverse); > 0.
        block_size: columns per lazy-update block of the GPTQ sweep (a multiple of 4 for 2:4).
        calibration_samples / calibration_seq_len / calibration_batch_size: calibration set size and shape
            (used when ``compress`` gets no texts and samples them from the fine-tune).
        embedding_method: vocabulary matrices (embedding, output head) when ``compress_embeddings``:
            ``"rtn"`` = round-to-nearest per row at ``embedding_bits``, never pruned (the embedding has no input
            activations to calibrate on); ``"gptq"`` = as ``"rtn"`` for an untied embedding, but the output head's
            matrix is pruned and quantised like any linear layer (OBS/GPTQ on the head's input Hessian,
            ``sparsity``), also when it is tied to the embedding (calibrated as the head, its only use with input
            activations; during the decoder layers' calibration the embedding keeps its fine-tuned value).
        embedding_bits: bits for the vocabulary matrices (``None`` = ``bits``). 8 by default: the output head is
            as large as a few decoder layers and its errors reach the logits directly (small zoo, 2:4 + 4-bit:
            KL 0.019 at 8 bits vs 0.033 at 4 bits, for a 4.6x vs 5.7x size ratio). Embedding rows of tokens the
            fine-tune never saw are exactly zero and are not stored at all.
        head_bits: bits for the output head's matrix (tied to the embedding or not); ``None`` = as
            ``embedding_bits``. A head calibrated with ``"gptq"`` stands fewer bits than round-to-nearest embedding
            rows (small zoo, 2:4 + 4-bit, llama-cipher: retention 0.99 with a 2-bit head and 4-bit embedding rows,
            0.90 when the embedding rows are 2-bit too).
        use_hessian: ``False`` turns off the error feedback (plain round-to-nearest with magnitude pruning):
            the baseline that shows what the Hessian buys.
        prune: ``"obs"`` chooses the pruning mask during the sweep by OBS saliency and compensates its error;
            ``"magnitude"`` fixes the mask by ``|Δ|`` beforehand and does not compensate pruning (baseline).
    """

    bits: int = 4
    sparsity: str | float | None = "2:4"
    group_size: int | None = None
    damp: float = 0.01
    block_size: int = 128
    calibration_samples: int = 128
    calibration_seq_len: int = 128
    calibration_batch_size: int = 8
    embedding_method: str = "rtn"
    embedding_bits: int | None = 8
    head_bits: int | None = None
    use_hessian: bool = True
    prune: str = "obs"

    def validate(self) -> None:
        super().validate()
        if self.bits not in LOWBIT_WIDTHS:
            raise DeltaConfigError(f"DeltaZipConfig.bits must be one of {LOWBIT_WIDTHS}, got {self.bits!r}.")
        for name in ("embedding_bits", "head_bits"):
            if getattr(self, name) is not None and getattr(self, name) not in LOWBIT_WIDTHS:
                raise DeltaConfigError(f"{name} must be one of {LOWBIT_WIDTHS} or None, got {getattr(self, name)!r}.")
        s = self.sparsity
        if not (s is None or s == "2:4" or (isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1)):
            raise DeltaConfigError(
                f"sparsity must be '2:4', a float in [0, 1) such as 0.5, or None; got {s!r}.")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise DeltaConfigError(f"group_size must be a positive int or None (per channel), got {self.group_size!r}.")
        if not self.damp > 0:
            raise DeltaConfigError(f"damp must be > 0 (e.g. 0.01), got {self.damp!r}.")
        if self.block_size <= 0 or (s == "2:4" and self.block_size % 4):
            raise DeltaConfigError(f"block_size must be positive (and a multiple of 4 for 2:4), got {self.block_size}.")
        for name in ("calibration_samples", "calibration_seq_len", "calibration_batch_size"):
            if getattr(self, name) <= 0:
                raise DeltaConfigError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.embedding_method not in ("rtn", "gptq"):
            raise DeltaConfigError(f"embedding_method must be 'rtn' or 'gptq', got {self.embedding_method!r}.")
        if self.prune not in ("obs", "magnitude"):
            raise DeltaConfigError(f"prune must be 'obs' or 'magnitude', got {self.prune!r}.")

    @property
    def pruning(self) -> str | float | None:
        """``"2:4"``, a positive fraction, or ``None`` when nothing is pruned."""
        return None if self.sparsity in (None, 0, 0.0) else self.sparsity


# ===================================================================================================
# The solver: one matrix
# ===================================================================================================


@dataclass
class QuantizedMatrix:
    """Result of ``prune_quantize``: ints (0 where pruned), fp16 scales and the keep mask (None = dense)."""

    q: torch.Tensor
    scales: torch.Tensor
    keep: torch.Tensor | None

    def dequantize(self) -> torch.Tensor:
        s = self.scales.float()
        if s.shape[1] > 1:
            s = s.repeat_interleave(self.q.shape[1] // s.shape[1], dim=1)
        return self.q.float() * s


def _scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row scale for ``w`` ``[out, k]``, rounded to fp16 so ints and stored scale agree."""
    s = w.abs().amax(dim=1) / ((1 << (bits - 1)) - 0.5)
    return s.to(torch.float16).float().clamp_min(_MIN_SCALE)


def _magnitude_mask(w: torch.Tensor, sparsity: str | float) -> torch.Tensor:
    if sparsity == "2:4":
        groups = w.abs().reshape(w.shape[0], -1, 4)
        drop = groups.topk(2, dim=-1, largest=False).indices
        return torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(w.shape)
    n_drop = int(w.numel() * sparsity)
    keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    keep[w.abs().reshape(-1).argsort()[:n_drop]] = False
    return keep.reshape(w.shape)


def inverse_hessian_factor(hessian: torch.Tensor, w: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp·mean(diag H)·I)⁻¹``; zeroes ``w``'s dead input columns in place.

    Row ``j`` of ``U`` divided by ``U_jj`` is row ``j`` of the inverse Hessian restricted to columns ``j..``,
    which is what the OBS update of column ``j`` needs once columns ``< j`` are fixed.
    """
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1  # an input that is always 0: any weight there is free, set it to 0
    w[:, dead] = 0
    h.diagonal().add_(damp * torch.diag(h).mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def prune_quantize(w: torch.Tensor, hessian: torch.Tensor | None, *, bits: int, group_size: int | None = None,
                   sparsity: str | float | None = None, prune: str = "obs", damp: float = 0.01,
                   block_size: int = 128) -> QuantizedMatrix:
    """Prune and quantise ``w`` ``[out, in]`` column by column, compensating each error through ``hessian``.

    With ``hessian=None`` there is no compensation and OBS saliency reduces to magnitude (round-to-nearest).
    """
    w = w.float().clone()
    out, k = w.shape
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    u = inverse_hessian_factor(hessian, w, damp) if hessian is not None else None
    keep = _magnitude_mask(w, sparsity) if sparsity is not None and prune == "magnitude" else \
        torch.ones_like(w, dtype=torch.bool)
    group = group_size or k
    scales = torch.empty(out, math.ceil(k / group), device=w.device)
    if group_size is None:
        scales[:, 0] = _scale(w, bits)
    q = torch.zeros(out, k, dtype=torch.int8, device=w.device)
    obs_mask = sparsity is not None and prune == "obs"
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2]  # a view: the eager in-block updates below land in w
        err = torch.zeros(out, i2 - i1, device=w.device)
        d = torch.diag(u)[i1:i2] if u is not None else torch.ones(i2 - i1, device=w.device)
        if obs_mask and sparsity != "2:4":
            sal = (w1**2 / d**2).reshape(-1)
            n_drop = int(sal.numel() * sparsity)
            block_keep = torch.ones_like(sal, dtype=torch.bool)
            block_keep[sal.argsort()[:n_drop]] = False
            keep[:, i1:i2] = block_keep.reshape(out, -1)
        for j in range(i2 - i1):
            col = i1 + j
            if group_size is not None and col % group_size == 0:
                scales[:, col // group_size] = _scale(w[:, col : col + group_size], bits)
            if obs_mask and sparsity == "2:4" and col % 4 == 0:
                sal = w1[:, j : j + 4] ** 2 / d[j : j + 4] ** 2
                drop = sal.topk(2, dim=1, largest=False).indices
                keep[:, col : col + 4] = torch.ones(out, 4, dtype=torch.bool, device=w.device).scatter_(1, drop, False)
            s = scales[:, col // group]
            qc = (w1[:, j] / s).round().clamp(lo, hi) * keep[:, col]
            q[:, col] = qc.to(torch.int8)
            if u is None:
                continue
            e = (w1[:, j] - qc * s) / d[j]
            if prune == "magnitude":
                e = e * keep[:, col]  # the baseline does not compensate what magnitude pruning removed
            w1[:, j:] -= e.unsqueeze(1) * u[col, col:i2].unsqueeze(0)
            err[:, j] = e
        if u is not None:
            w[:, i2:] -= err @ u[i1:i2, i2:]
    return QuantizedMatrix(q=q, scales=scales.to(torch.float16), keep=keep if sparsity is not None else None)


def _layout(qm: QuantizedMatrix, sparsity: str | float | None, bits: int) -> str:
    if sparsity is None:
        return "dense"
    if sparsity == "2:4":
        return "2:4"
    out, k = qm.q.shape
    bitmap = out * math.ceil(k / 8) + math.ceil(int(qm.keep.sum()) * bits / 8)
    return "bitmap" if bitmap < out * math.ceil(k * bits / 8) else "dense"


# ===================================================================================================
# Calibration: Hessians of each target's input, in forward order, on the partly compressed model
# ===================================================================================================


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the inputs it needed have been seen."""


class _Hessian:
    """Running ``2 XᵀX / n`` over the real (unpadded) rows of a layer's inputs."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.h is None:
            self.h = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        self.h *= self.n / (self.n + len(x))
        self.n += len(x)
        x = x * math.sqrt(2 / self.n)
        self.h += x.T @ x


def _real_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()] if x.shape[:-1] == mask.shape else x


def _decoder_layers(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """The ``nn.ModuleList`` holding most of the targets (the decoder blocks), as (name, layer) pairs."""
    best: list[tuple[str, nn.Module]] = []
    best_count = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            layers = [(f"{name}.{i}", child) for i, child in enumerate(m)]
            count = sum(any(t.startswith(n + ".") for n, _ in layers) for t in targets)
            if count > best_count:
                best, best_count = layers, count
    return best


def _call_layer(layer: nn.Module, hidden: torch.Tensor, rest: tuple | None, kwargs: dict) -> torch.Tensor:
    """Replay a decoder layer on ``hidden`` with its recorded other arguments (``rest`` None: hidden by keyword)."""
    out = layer(hidden, *rest, **kwargs) if rest is not None else layer(hidden_states=hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _Calibrator:
    """Walks the target modules of ``model`` in forward order, one group of modules sharing an input at a time.

    ``each_group(names, hessians)`` must write the compressed weights of ``names`` into ``model``; the next
    groups are then calibrated on activations that flow through them. Decoder layers are replayed one at a time
    from cached inputs; targets outside them (an output head) get full forward passes.
    """

    def __init__(self, model: nn.Module, batches: list[Batch], targets: list[str]):
        self.model, self.batches = model, batches
        self.modules = {n: model.get_submodule(n) for n in targets}
        self.layers = _decoder_layers(model, targets)
        self.device = next(model.parameters()).device  # calibration batches are tokenized on the CPU

    def _forward(self, batch: Batch) -> None:
        ids, mask = batch
        self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)

    def groups(self) -> list[list[str]]:
        """Targets in call order, consecutive ones fed the very same input tensor grouped (q/k/v, gate/up)."""
        calls: list[tuple[str, torch.Tensor]] = []
        hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: calls.append((n, a[0])))
                 for n, m in self.modules.items()]
        try:
            self._forward(self.batches[0])
        finally:
            for h in hooks:
                h.remove()
        groups: list[list[str]] = []
        seen: set[str] = set()
        prev = None
        for name, x in calls:
            if name in seen:
                continue
            seen.add(name)
            if prev is not None and x is prev:
                groups[-1].append(name)
            else:
                groups.append([name])
            prev = x
        unused = sorted(set(self.modules) - seen)
        if unused:
            logger.warning("Modules %s are never called in a forward pass; compressing them without calibration",
                           unused)
            groups.append(unused)
        return groups

    def _hessians(self, names: list[str], run: Callable[[int], None]) -> dict[str, torch.Tensor | None]:
        """Run ``run(batch_index)`` over all batches with hooks collecting the inputs of ``names``."""
        acc = {n: _Hessian() for n in names}
        seen: set[str] = set()
        state = {"mask": None}

        def hook(module, args, name):
            acc[name].add(_real_rows(args[0], state["mask"]))
            seen.add(name)
            if seen == set(names):
                raise _Stop

        hooks = [self.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n))
                 for n in names]
        try:
            for b, (_, mask) in enumerate(self.batches):
                state["mask"] = mask.to(self.device)
                seen.clear()
                try:
                    run(b)
                except _Stop:
                    pass
        finally:
            for h in hooks:
                h.remove()
        return {n: a.h for n, a in acc.items()}

    def _capture_layer_inputs(self) -> tuple[list[torch.Tensor], list[list[tuple[tuple | None, dict]]]]:
        """Inputs of the first decoder layer, and every layer's other call arguments, for every batch.

        Masks and position embeddings depend on the token ids only, so one pass records them for all layers;
        hidden states are kept for the first layer only (later ones are recomputed from compressed layers).
        """
        hidden: list[torch.Tensor] = []
        calls: list[list[tuple[tuple | None, dict]]] = [[] for _ in self.layers]

        def hook(index, args, kwargs):
            if index == 0:
                hidden.append(args[0] if args else kwargs["hidden_states"])
            calls[index].append((args[1:] if args else None,
                                 {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: hook(i, a, kw), with_kwargs=True)
                 for i, (_, layer) in enumerate(self.layers)]
        try:
            for batch in self.batches:
                self._forward(batch)
        finally:
            for h in hooks:
                h.remove()
        return hidden, calls

    @torch.no_grad()
    def run(self, each_group: Callable[[list[str], dict[str, torch.Tensor | None]], None], *,
            progress: bool = True) -> None:
        groups = self.groups()
        bar = tqdm(total=len(groups), desc="deltazip: layers", disable=not progress, leave=False)
        owner = {n: i for i, (lname, _) in enumerate(self.layers) for n in self.modules if n.startswith(lname + ".")}
        in_layers = [g for g in groups if all(n in owner for n in g)]
        first_layer_group = groups.index(in_layers[0]) if in_layers else len(groups)
        outside = [g for g in groups if g not in in_layers]

        def full_pass(group: list[str]) -> None:
            each_group(group, self._hessians(group, lambda b: self._forward(self.batches[b])))
            bar.update()

        for group in [g for g in outside if groups.index(g) < first_layer_group]:
            full_pass(group)
        if in_layers:
            hidden, calls = self._capture_layer_inputs()
            for i, (_, layer) in enumerate(self.layers):
                for group in [g for g in in_layers if owner[g[0]] == i]:
                    each_group(group, self._hessians(
                        group, lambda b, i=i, layer=layer, xs=hidden: _call_layer(layer, xs[b], *calls[i][b])))
                    bar.update()
                hidden = [_call_layer(layer, hidden[b], *calls[i][b]) for b in range(len(hidden))]
        for group in [g for g in outside if groups.index(g) >= first_layer_group]:
            full_pass(group)
        bar.close()


# ===================================================================================================
# The method
# ===================================================================================================


def _check_targets(cfg: DeltaZipConfig, deltas: dict[str, torch.Tensor], pruned: set[str]) -> None:
    """Shape constraints of the chosen layout on the actual target matrices, before any work."""
    for name, delta in deltas.items():
        k = delta.shape[1]
        if cfg.group_size is not None and k % cfg.group_size:
            raise DeltaConfigError(
                f"group_size={cfg.group_size} does not divide in_features={k} of {name!r}; choose a divisor of "
                f"{k} (e.g. {math.gcd(k, cfg.group_size)}) or group_size=None (per channel).")
        if cfg.pruning == "2:4" and name in pruned and k % 4:
            raise DeltaConfigError(
                f"sparsity='2:4' needs in_features divisible by 4, but {name!r} has {k}; use an unstructured "
                "sparsity such as 0.5, or exclude it from target_modules.")


def compress_deltazip(ctx: CompressionContext) -> dict[str, CompressedWeight]:
    """Compress every extracted delta: linear layers by OBS/GPTQ in forward order, vocabulary matrices by RTN
    (or, with ``embedding_method="gptq"``, the output head's matrix like a linear layer, tied or not)."""
    cfg: DeltaZipConfig = ctx.config
    deltas = ctx.extracted.compress
    embed, head = vocab_module_names(ctx.base)
    vocab = {n for n in deltas if n in (embed, head)}
    # Delta → the module whose inputs calibrate it. A tied matrix has input activations only as the output
    # head, so it is calibrated there (its errors then reach the input embedding uncompensated).
    as_linear = {n: n for n in deltas if n not in vocab}
    head_matrix = ctx.extracted.tied.get(head, head)
    if cfg.embedding_method == "gptq" and head_matrix in deltas:
        as_linear[head_matrix] = head
    _check_targets(cfg, deltas, set(as_linear))
    calibrated = {m: n for n, m in as_linear.items()} if cfg.use_hessian else {}  # module → its delta
    batches: list[Batch] = []
    if calibrated:
        batches = ctx.calibration(n=cfg.calibration_samples, seq_len=cfg.calibration_seq_len,
                                  batch_size=cfg.calibration_batch_size)
        if not batches:
            raise CalibrationError("The calibration set is empty; pass texts like the fine-tune's training data, "
                                   "or calibration=None to sample text from the fine-tune.")
    work = copy.deepcopy(ctx.finetuned).eval() if calibrated else None
    base_weights = {n: ctx.base.get_submodule(n).weight for n in deltas}
    if work is not None:
        for name, w in base_weights.items():  # start from the base; each layer gets its compressed delta in turn
            # A tied matrix calibrated as the head is compressed last, but the embedding is used first: until
            # then the decoder layers see the fine-tune's own embedding.
            if as_linear.get(name, name) == name:
                work.get_submodule(name).weight.data[: w.shape[0]] = w.to(work.dtype)
    weights: dict[str, CompressedWeight] = {}

    def finish(name: str, hessian: torch.Tensor | None) -> None:
        bits = cfg.bits
        if name in vocab:
            bits = (cfg.head_bits if name == head_matrix else None) or cfg.embedding_bits or cfg.bits
        # A vocabulary matrix calibrated as the output head is an ordinary linear layer to GPTQ/OBS: pruned too.
        sparsity = cfg.pruning if name in as_linear else None
        qm = prune_quantize(deltas[name], hessian, bits=bits, group_size=cfg.group_size, sparsity=sparsity,
                            prune=cfg.prune, damp=cfg.damp, block_size=cfg.block_size)
        weights[name] = DeltaZipWeight.from_quantized(qm.q, qm.scales, qm.keep, bits=bits,
                                                      group_size=cfg.group_size, layout=_layout(qm, sparsity, bits))
        if work is not None:
            base = base_weights[name]
            work.get_submodule(name).weight.data[: base.shape[0]] = (base.float() + qm.dequantize()).to(work.dtype)

    def finish_group(modules: list[str], hessians: dict[str, torch.Tensor | None]) -> None:
        for module in modules:
            finish(calibrated[module], hessians[module])

    for name in [n for n in deltas if n not in calibrated.values()]:
        finish(name, None)
    if calibrated:
        _Calibrator(work, batches, list(calibrated)).run(finish_group, progress=ctx.progress)
    return {n: weights[n] for n in deltas}


register_delta_method(DeltaMethod(
    name="deltazip", config_class=DeltaZipConfig, weight_classes=(DeltaZipWeight,), compress=compress_deltazip,
))

"""Joint OBS pruning and GPTQ quantisation of one matrix from its Hessian (SparseGPT/GPTQ's column sweep)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    pass

from .weight import _MIN_SCALE


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


def layout_of(qm: QuantizedMatrix, sparsity: str | float | None, bits: int) -> str:
    if sparsity is None:
        return "dense"
    if sparsity == "2:4":
        return "2:4"
    out, k = qm.q.shape
    bitmap = out * math.ceil(k / 8) + math.ceil(int(qm.keep.sum()) * bits / 8)
    return "bitmap" if bitmap < out * math.ceil(k * bits / 8) else "dense"

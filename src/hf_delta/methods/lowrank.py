"""Low-rank deltas: a truncated SVD of each delta matrix, ``Δ ≈ B A``, exportable as a PEFT LoRA adapter.

``Δ = U S Vᵀ`` is cut to the top ``r`` singular values and split evenly, ``B = U_r √S_r`` and
``A = √S_r V_rᵀ``, so both factors have the same dynamic range in 16-bit storage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import DeltaConfig
from ..errors import DeltaConfigError
from .base import CompressedWeight, CompressionContext, DeltaMethod
from .registry import register_delta_method

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class LowRankWeight(CompressedWeight):
    """Factors ``A`` ``[r, in]`` and ``B`` ``[out, r]`` with ``Δ ≈ scaling · B A``; ``apply(x) = (x Aᵀ) Bᵀ · scaling``.

    ``scaling`` is 1 for SVD deltas and LoRA's ``alpha / r`` for trained adapters. The maths is plain autograd-
    friendly PyTorch, so ``A``/``B`` may be trainable tensors (co-serving trains a LoRA as one of these).
    """

    method = "lowrank"

    def __init__(self, shape: tuple[int, int], A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0):
        super().__init__(shape)
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.scaling = float(scaling)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @classmethod
    def from_delta(cls, delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> LowRankWeight:
        """Truncated SVD of ``delta``: ``rank`` singular values, or the fewest that keep ``energy`` of ``Σ s²``
        (capped at ``rank`` when both are given)."""
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
        r = rank if rank is not None else len(s)
        if energy is not None:
            total = (s**2).sum()
            # Smallest r with cumulative energy >= target; an all-zero delta keeps rank 1 (PEFT needs r > 0).
            reached = int(((s**2).cumsum(0) < energy * total).sum()) + 1 if total > 0 else 1
            r = min(r, reached, len(s))
        root = s[:r].sqrt()
        return cls(tuple(delta.shape), (root.unsqueeze(1) * vh[:r]).to(dtype), (u[:, :r] * root).to(dtype))

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.B.float() @ self.A.float() * self.scaling).to(dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.B[index].float() @ self.A.float() * self.scaling).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = (x @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T
        return out if self.scaling == 1.0 else out * self.scaling

    def meta(self) -> dict[str, Any]:
        meta = {"shape": list(self.shape), "rank": self.rank}
        if self.scaling != 1.0:
            meta["scaling"] = self.scaling
        return meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LowRankWeight:
        return cls(tuple(meta["shape"]), tensors["A"], tensors["B"], meta.get("scaling", 1.0))


@dataclass
class LowRankConfig(DeltaConfig):
    """Truncated SVD of every delta matrix (a baseline, and the bridge to LoRA tooling).

    Args:
        rank: singular values kept per matrix; with ``energy`` also set, the largest rank allowed.
        energy: keep the smallest rank whose singular values hold this fraction of ``Σ s²`` (in ``(0, 1]``).
            Ranks then differ per matrix (exported with PEFT's ``rank_pattern``).
        factor_dtype: storage dtype of ``A`` and ``B``: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
    """

    rank: int | None = 16
    energy: float | None = None
    factor_dtype: str = "bfloat16"

    def validate(self) -> None:
        super().validate()
        if self.rank is None and self.energy is None:
            raise DeltaConfigError("LowRankConfig needs rank=... (e.g. 16) or energy=... (e.g. 0.9), or both.")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank <= 0):
            raise DeltaConfigError(f"rank must be a positive int, got {self.rank!r}.")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise DeltaConfigError(f"energy must be in (0, 1], e.g. 0.9; got {self.energy!r}.")
        if self.factor_dtype not in _DTYPES:
            raise DeltaConfigError(f"factor_dtype must be one of {sorted(_DTYPES)}, got {self.factor_dtype!r}.")


def compress_lowrank(ctx: CompressionContext) -> dict[str, CompressedWeight]:
    """Truncated SVD of every extracted delta matrix."""
    cfg: LowRankConfig = ctx.config
    deltas = ctx.extracted.compress
    if cfg.rank is not None and cfg.energy is None:
        for name, d in deltas.items():
            if cfg.rank > min(d.shape):
                raise DeltaConfigError(
                    f"rank={cfg.rank} exceeds min(out, in)={min(d.shape)} of {name!r} {tuple(d.shape)}; use "
                    f"rank <= {min(min(t.shape) for t in deltas.values())}, or energy=... to pick ranks per matrix.")
    return {
        name: compress_lowrank_matrix(d, ctx.extracted.kinds.get(name, "linear"), cfg)
        for name, d in tqdm(deltas.items(), desc="lowrank: SVD", disable=not ctx.progress, leave=False)
    }


def compress_lowrank_matrix(delta: torch.Tensor, kind: str, cfg: LowRankConfig) -> LowRankWeight:
    """Truncated SVD of one delta matrix."""
    if cfg.rank is not None and cfg.energy is None and cfg.rank > min(delta.shape):
        raise DeltaConfigError(f"rank={cfg.rank} exceeds min(out, in)={min(delta.shape)} of a {tuple(delta.shape)} "
                               "delta; use a smaller rank, or energy=... to pick ranks per matrix.")
    return LowRankWeight.from_delta(delta, rank=cfg.rank, energy=cfg.energy, dtype=_DTYPES[cfg.factor_dtype])


register_delta_method(DeltaMethod(
    name="lowrank", config_class=LowRankConfig, weight_classes=(LowRankWeight,), compress=compress_lowrank,
    compress_matrix=compress_lowrank_matrix, data_free=lambda cfg: True,
))

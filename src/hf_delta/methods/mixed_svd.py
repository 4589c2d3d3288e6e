"""Mixed-precision SVD deltas (Delta-CoMe style): singular vectors quantised with more bits where the singular
value is larger, and dropped below a threshold, for a bit budget per matrix.

``Δ = U S Vᵀ``. Singular triple ``i`` is stored at ``b_i`` bits (one of ``bit_widths``, or 0 = dropped): the row
``s_i v_iᵀ`` of the *down* factor and the column ``u_i`` of the *up* factor, each a symmetric ``b_i``-bit int
vector times one fp16 scale. The widths come from a Lagrangian allocation over *measured* quantisation errors::

    err_i(b) = ‖s_i u_i v_iᵀ − Q_b(u_i) Q_b(s_i v_i)ᵀ‖²      (err_i(0) = s_i²: the triple is dropped)
    cost_i(b) = b · (in + out) + 32                           (bits: ints + two fp16 scales)
    b_i = argmin_b err_i(b) + λ · cost_i(b),   λ bisected so Σ cost_i ≤ bits_per_weight · out · in

so larger singular values get more bits and the smallest are dropped (the threshold is where ``λ`` makes
dropping cheaper). After the down factor is quantised the up factor is refitted by least squares,
``U* = Δ Dᵀ (D Dᵀ)⁻¹`` (``D`` = the dequantised down factor), and then quantised: the up factor absorbs part
of the down factor's rounding error. Triples of one width form a *band*; ``x ↦ Σ_bands (x D_bᵀ) U_bᵀ``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import DeltaConfig
from ..errors import DeltaConfigError, DeltaFormatError
from ..packing import LOWBIT_WIDTHS, lowbit_packed_width, pack_lowbit_u8, unpack_lowbit_u8
from ._dispatch import kernels_forced, stacked_slots, use_kernels
from .base import CompressedWeight, CompressionContext, DeltaMethod
from .registry import register_delta_method

logger = logging.getLogger(__name__)

_SCALE_BITS = 32  # two fp16 scales per stored triple
_CLIP_RATIOS = torch.linspace(0.5, 1.0, 11)  # candidate clipping of each vector's range (MSE-optimal scale)
_KERNEL_BITS = (2, 4, 8)  # widths the Triton DeltaZip kernel decodes (3-bit rows are a bit stream)


def quantize_rows(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ``bits``-bit ints ``[r, n]`` and fp16 scales ``[r]`` for each row of ``w``, the scale chosen among
    clipped ranges to minimise the row's squared error (singular vectors are bell-shaped: clipping pays)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    w = w.float()
    peak = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    best_q = torch.zeros_like(w, dtype=torch.int8)
    best_s = torch.ones(w.shape[0], dtype=torch.float16)
    best_err = torch.full((w.shape[0],), math.inf)
    for ratio in _CLIP_RATIOS.tolist():
        # fp16-rounded scale: the ints are chosen for the scale that is actually stored
        s = (peak * ratio / max(hi, 1)).to(torch.float16).float().clamp_min(2.0**-24)
        q = (w / s).round().clamp(lo, hi)
        err = ((q * s - w) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q[better] = q[better].to(torch.int8)
        best_s[better] = s[better, 0].to(torch.float16)
    return best_q, best_s


def _dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.float().unsqueeze(1)


@dataclass(frozen=True)
class _Band:
    rank: int
    bits: int


class MixedSVDWeight(CompressedWeight):
    """Bands of singular triples, band ``k`` holding ``r_k`` triples at ``bits_k`` bits (``Δ̂ = Σ_k U_k D_k``).

    Two buffers, whatever the number of bands (each saved tensor costs a header in the repo): ``packed`` (uint8,
    1-D) holds, band after band, the rows of ``D_k`` ``[r_k, packed(in)]`` then the rows of ``U_kᵀ``
    ``[r_k, packed(out)]``; ``scales`` (fp16 ``[2, rank]``) the row scales of the down (row 0) and up (row 1)
    factors. ``meta()["bands"]`` = ``[[r_k, bits_k], ...]`` locates each band.

    On CUDA (or when ``HF_DELTA_KERNELS=triton`` forces it) the down product ``x D_kᵀ`` runs on the DeltaZip
    kernel (``D_k`` is a dense per-channel-scaled low-bit matrix, that kernel's format); the up product has only
    ``r_k`` inputs per output and is dequantised and multiplied in PyTorch.
    """

    method = "mixed_svd"

    def __init__(
        self, shape: tuple[int, int], bands: list[tuple[int, int]], packed: torch.Tensor, scales: torch.Tensor
    ):
        super().__init__(shape)
        self.bands = [_Band(int(r), int(b)) for r, b in bands]
        expected = sum(
            b.rank * (lowbit_packed_width(shape[1], b.bits) + lowbit_packed_width(shape[0], b.bits)) for b in self.bands
        )
        if packed.numel() != expected or tuple(scales.shape) != (2, self.rank):
            raise DeltaFormatError(
                f"mixed_svd tensors do not match their bands {bands}: packed has {packed.numel()} bytes (expected "
                f"{expected}), scales {tuple(scales.shape)} (expected (2, {self.rank})); re-save the delta."
            )
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)

    @property
    def rank(self) -> int:
        return sum(b.rank for b in self.bands)

    @classmethod
    def from_factors(
        cls, shape: tuple[int, int], parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> MixedSVDWeight:
        """From ``(bits, down ints [r, in], down scales [r], up ints [r, out], up scales [r])`` per band."""
        bands = [(dq.shape[0], bits) for bits, dq, *_ in parts]
        chunks = [t for bits, dq, _, uq, _ in parts for t in (pack_lowbit_u8(dq, bits), pack_lowbit_u8(uq, bits))]
        packed = torch.cat([c.reshape(-1) for c in chunks]) if chunks else torch.zeros(0, dtype=torch.uint8)
        scales = torch.stack(
            [
                torch.cat([p[2].reshape(-1) for p in parts] or [torch.zeros(0)]),
                torch.cat([p[4].reshape(-1) for p in parts] or [torch.zeros(0)]),
            ]
        ).to(torch.float16)
        return cls(shape, bands, packed, scales)

    def _band(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Band ``k``: packed down rows, down scales ``[r_k, 1]``, packed up rows, up scales ``[r_k, 1]`` (views)."""
        offset, first = 0, 0
        for j, band in enumerate(self.bands):
            down_w = lowbit_packed_width(self.shape[1], band.bits)
            up_w = lowbit_packed_width(self.shape[0], band.bits)
            if j == k:
                r = band.rank
                down = self.packed[offset : offset + r * down_w].reshape(r, down_w)
                up = self.packed[offset + r * down_w : offset + r * (down_w + up_w)].reshape(r, up_w)
                rows = slice(first, first + r)
                return down, self.scales[0, rows].unsqueeze(1), up, self.scales[1, rows].unsqueeze(1)
            offset += band.rank * (down_w + up_w)
            first += band.rank
        raise IndexError(k)

    def _down(self, k: int) -> torch.Tensor:
        """``D_k`` ``[r_k, in]`` (fp32)."""
        packed, scales, _, _ = self._band(k)
        return unpack_lowbit_u8(packed, self.bands[k].bits, self.shape[1]).float() * scales.float()

    def _up(self, k: int) -> torch.Tensor:
        """``U_kᵀ`` ``[r_k, out]`` (fp32)."""
        _, _, packed, scales = self._band(k)
        return unpack_lowbit_u8(packed, self.bands[k].bits, self.shape[0]).float() * scales.float()

    def _device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=torch.float32, device=self._device())
        for k in range(len(self.bands)):
            out += self._up(k).T @ self._down(k)
        return out.to(dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat = index.reshape(-1)
        out = torch.zeros(len(flat), self.shape[1], dtype=torch.float32, device=self._device())
        for k in range(len(self.bands)):
            out += self._up(k)[:, flat].T @ self._down(k)
        return out.reshape(*index.shape, self.shape[1]).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for k in range(len(self.bands)):
            y = (x @ self._down(k).to(x.dtype).T) @ self._up(k).to(x.dtype)
            out = y if out is None else out + y
        if out is None:  # every triple dropped (an all-zero delta)
            return x.new_zeros((*x.shape[:-1], self.shape[0]))
        return out

    def add_to_rows(self, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None) -> None:
        if not (use_kernels(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and out.dtype == x.dtype):
            super().add_to_rows(x, out, rows)
            return
        from hf_delta.kernels import deltazip_matmul

        xc = x.contiguous()
        slots, plan = stacked_slots([rows], x.shape[0], x.device)
        for k, band in enumerate(self.bands):
            # Down product on the DeltaZip kernel (rows outside ``rows`` stay zero), up product in PyTorch.
            hidden = torch.zeros(x.shape[0], band.rank, dtype=x.dtype, device=x.device)
            forced = kernels_forced() and band.bits in _KERNEL_BITS
            packed, scales, _, _ = self._band(k)
            deltazip_matmul(
                xc,
                hidden,
                slots,
                packed.unsqueeze(0),
                scales.unsqueeze(0),
                bits=band.bits,
                layout="dense",
                plan=plan,
                backend="triton" if forced else "auto",
            )
            up = self._up(k).to(x.dtype)
            if rows is None:
                out += hidden @ up
            else:
                out[rows] += hidden[rows] @ up

    def meta(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "bands": [[b.rank, b.bits] for b in self.bands]}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> MixedSVDWeight:
        bands = meta["bands"]
        if not isinstance(bands, list) or not all(
            isinstance(b, list) and len(b) == 2 and b[1] in LOWBIT_WIDTHS for b in bands
        ):
            raise DeltaFormatError(
                f"mixed_svd 'bands' must be [[rank, bits], ...] with bits in {LOWBIT_WIDTHS}, "
                f"got {bands!r}; the repo is corrupt, re-save or re-download it."
            )
        return cls(tuple(meta["shape"]), bands, tensors["packed"], tensors["scales"])


@dataclass
class MixedSVDConfig(DeltaConfig):
    """Mixed-precision SVD of every delta matrix (Delta-CoMe): more bits for larger singular values.

    Args:
        bits_per_weight: the budget of each matrix, in bits per entry of the ``[out, in]`` delta (ints and
            scales counted): ``1.0`` is the size of a 1-bit BitDelta delta.
        budget_bytes: instead of ``bits_per_weight``, the total bytes of the compressed matrices' tensors; one
            ``bits_per_weight`` for all matrices is then searched so the delta fills it (matrices of low rank
            cannot spend their share, the others take it). ``"bitdelta"``: the bytes a 1-bit BitDelta delta of
            the same matrices takes (signs and per-row scales), to compare the two at equal size.
        bit_widths: the widths a singular triple may get (each of 2, 3, 4, 8); 0 (dropped) is always allowed.
        refit: refit the up factor to the quantised down factor by least squares before quantising it.
    """

    bits_per_weight: float = 1.0
    budget_bytes: int | str | None = None
    bit_widths: tuple[int, ...] | list[int] = (8, 4, 3, 2)
    refit: bool = True

    def validate(self) -> None:
        super().validate()
        if (
            isinstance(self.bits_per_weight, bool)
            or not isinstance(self.bits_per_weight, (int, float))
            or not self.bits_per_weight > 0
        ):
            raise DeltaConfigError(
                f"bits_per_weight must be a number > 0 (1.0 = BitDelta's size), got {self.bits_per_weight!r}."
            )
        if (
            self.budget_bytes is not None
            and self.budget_bytes != "bitdelta"
            and (
                isinstance(self.budget_bytes, bool) or not isinstance(self.budget_bytes, int) or self.budget_bytes <= 0
            )
        ):
            raise DeltaConfigError(
                f"budget_bytes must be a positive int or 'bitdelta' (BitDelta's size), got {self.budget_bytes!r}."
            )
        widths = list(self.bit_widths)
        if not widths or any(b not in LOWBIT_WIDTHS for b in widths):
            raise DeltaConfigError(f"bit_widths must be a non-empty list of {LOWBIT_WIDTHS}, got {self.bit_widths!r}.")


def _relative_errors(vectors: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise each row; return ints, scales and each row's squared error over its squared norm."""
    q, s = quantize_rows(vectors, bits)
    err = ((_dequantize(q, s) - vectors) ** 2).sum(1) / (vectors**2).sum(1).clamp_min(1e-30)
    return q, s, err


def allocate_bits(
    singular: torch.Tensor, errors: dict[int, torch.Tensor], cost_per_bit: int, budget_bits: float
) -> torch.Tensor:
    """Width of each singular triple (0 = dropped) minimising ``Σ err_i(b_i)`` for ``Σ cost_i(b_i) ≤ budget_bits``
    (Lagrangian relaxation; ``errors[b][i]``: the triple's relative error at ``b`` bits)."""
    widths = torch.tensor([0, *sorted(errors)], dtype=torch.float64)
    energy = singular.double() ** 2
    err = torch.stack([energy] + [energy * errors[b].double() for b in sorted(errors)], dim=1)  # [r, widths]
    cost = torch.where(widths > 0, widths * cost_per_bit + _SCALE_BITS, torch.zeros_like(widths))

    def choose(lam: float) -> torch.Tensor:
        return (err + lam * cost).argmin(dim=1)

    def spent(choice: torch.Tensor) -> float:
        return float(cost[choice].sum())

    lo, hi = 0.0, float(energy.max()) / max(float(cost[cost > 0].min()), 1.0) * 4 + 1e-30
    if spent(choose(lo + 1e-300)) <= budget_bits:
        return widths[choose(lo + 1e-300)].long()
    for _ in range(100):  # geometric bisection on λ: a larger λ spends fewer bits
        mid = math.sqrt(max(lo, hi * 1e-12) * hi)
        if spent(choose(mid)) <= budget_bits:
            hi = mid
        else:
            lo = mid
        if hi <= lo * (1 + 1e-6):
            break
    return widths[choose(hi)].long()


def _factor(d: torch.Tensor, widths: list[int], most: int | None):
    """The SVD of ``d`` cut to its ``most`` largest triples, each factor row quantised at every width, and each
    triple's relative error per width."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    most = len(s) if most is None else max(1, min(len(s), most))
    u, s, vh = u[:, :most], s[:most], vh[:most]
    down = s.unsqueeze(1) * vh  # rows s_i v_iᵀ
    quantized = {b: (_relative_errors(down, b), _relative_errors(u.T.contiguous(), b)) for b in widths}
    # A triple's error: both factors' relative errors, to first order (each is small where it is kept).
    errors = {b: quantized[b][0][2] + quantized[b][1][2] for b in widths}
    return u, s, quantized, errors


def _widths_for(s: torch.Tensor, errors: dict[int, torch.Tensor], shape: tuple[int, int], bpw: float) -> torch.Tensor:
    """Each triple's width at ``bpw`` bits per weight (at least one triple kept: a weight needs tensors)."""
    out_f, in_f = shape
    chosen = allocate_bits(s, errors, in_f + out_f, bpw * out_f * in_f)
    if not bool(chosen.any()):  # an all-zero delta stays ~zero
        chosen[0] = min(errors)
    return chosen


def _allocation_bytes(chosen: torch.Tensor, shape: tuple[int, int]) -> int:
    """Bytes of a :class:`MixedSVDWeight` whose triples have widths ``chosen`` (packed rows + two fp16 scales)."""
    out_f, in_f = shape
    return sum(
        int((chosen == b).sum()) * (lowbit_packed_width(in_f, b) + lowbit_packed_width(out_f, b) + 4)
        for b in set(chosen.tolist()) - {0}
    )


def mixed_svd_weights(
    delta: torch.Tensor, bits_per_weight: list[float], bit_widths: list[int] | tuple[int, ...], *, refit: bool = True
) -> list[MixedSVDWeight]:
    """One weight per budget in ``bits_per_weight``, all from one SVD and one set of quantised vectors."""
    d = delta.float()
    out_f, in_f = d.shape
    widths = sorted(set(bit_widths))
    # No more triples than the largest budget holds at the smallest width: only those are worth quantising.
    most = int(max(bits_per_weight) * out_f * in_f // (widths[0] * (in_f + out_f) + _SCALE_BITS))
    u, s, quantized, errors = _factor(d, widths, most)
    weights = []
    for bpw in bits_per_weight:
        chosen = _widths_for(s, errors, (out_f, in_f), bpw)
        picked = [(b, (chosen == b).nonzero().squeeze(1)) for b in sorted(widths, reverse=True)]
        picked = [(b, idx) for b, idx in picked if len(idx)]
        d_hat = torch.cat([_dequantize(*quantized[b][0][:2])[idx] for b, idx in picked])
        up = u[:, torch.cat([idx for _, idx in picked])]
        if refit:
            gram = d_hat @ d_hat.T
            gram.diagonal().add_(1e-8 * float(gram.diagonal().mean().clamp_min(1e-30)))
            up = torch.linalg.solve(gram, d_hat @ d.T).T  # argmin ‖Δ − U D̂‖ over U, [out, r]
        parts, start = [], 0
        for b, idx in picked:
            r = len(idx)
            uq, us = quantize_rows(up[:, start : start + r].T.contiguous(), b)
            parts.append((b, quantized[b][0][0][idx], quantized[b][0][1][idx], uq, us))
            start += r
        weights.append(MixedSVDWeight.from_factors((out_f, in_f), parts))
    return weights


def compress_mixed_svd_matrix(delta: torch.Tensor, kind: str, cfg: MixedSVDConfig) -> MixedSVDWeight:
    """Factor one delta matrix and quantise its singular triples within ``cfg.bits_per_weight``."""
    return mixed_svd_weights(delta, [cfg.bits_per_weight], cfg.bit_widths, refit=cfg.refit)[0]


def fill_budget(deltas: dict[str, torch.Tensor], cfg: MixedSVDConfig, *, progress: bool = False) -> float:
    """The largest bits per weight, one for every matrix of ``deltas``, whose mixed SVD weights take at most
    ``cfg.budget_bytes`` in all (``"bitdelta"``: what ``BitDeltaConfig()``'s weights of the same matrices take).

    Sizes are exact (they follow from the widths), so this needs one SVD per matrix and no weights; when every
    triple of every matrix at the widest width still fits, that rate is returned (nothing more to spend).
    """
    from .bitdelta import BitDeltaConfig, compress_bitdelta_matrix

    widths = sorted(set(cfg.bit_widths))
    budget = cfg.budget_bytes
    if budget == "bitdelta":  # BitDeltaConfig()'s weights: what the benchmarks call BitDelta's size
        budget = sum(compress_bitdelta_matrix(d.float(), "", BitDeltaConfig()).nbytes() for d in deltas.values())
    spectra = []
    for d in tqdm(deltas.values(), desc="mixed_svd: budget", disable=not progress, leave=False):
        _, s, _, errors = _factor(d.float(), widths, None)
        spectra.append((tuple(d.shape), s, errors))

    def total(bpw: float) -> int:
        return sum(_allocation_bytes(_widths_for(s, e, shape, bpw), shape) for shape, s, e in spectra)

    # Every triple at the widest width: no rate spends more than that.
    full = max((widths[-1] * sum(shape) + _SCALE_BITS) * len(s) / (shape[0] * shape[1]) for shape, s, _ in spectra)
    lo, hi = 0.0, full
    if total(hi) <= budget:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def compress_mixed_svd(ctx: CompressionContext) -> dict[str, CompressedWeight]:
    """Mixed-precision SVD of every extracted delta matrix (data-free unless sized by ``budget_bytes``)."""
    cfg: MixedSVDConfig = ctx.config
    if cfg.budget_bytes is not None:
        cfg = dataclasses.replace(cfg, bits_per_weight=fill_budget(ctx.extracted.compress, cfg, progress=ctx.progress))
        logger.info("mixed_svd: %.4g bits per weight fill budget_bytes=%s", cfg.bits_per_weight, cfg.budget_bytes)
    return {
        name: compress_mixed_svd_matrix(d, ctx.extracted.kinds.get(name, "linear"), cfg)
        for name, d in tqdm(ctx.extracted.compress.items(), desc="mixed_svd", disable=not ctx.progress, leave=False)
    }


register_delta_method(
    DeltaMethod(
        name="mixed_svd",
        config_class=MixedSVDConfig,
        weight_classes=(MixedSVDWeight,),
        compress=compress_mixed_svd,
        compress_matrix=compress_mixed_svd_matrix,
        data_free=lambda cfg: cfg.budget_bytes is None,  # a total budget is spread over all matrices
    )
)

"""The split-K decode kernel shared by every delta format: few rows per delta, every SM streaming bits.

At decode a layer sees one to a few rows per delta, so the tile kernels (``tl.dot`` on ``block_m`` >= 16
rows) waste most of their tensor-core work on padding rows, and their grid (one program per row tile ×
``BLOCK_N`` outputs) is too small to keep every SM streaming: one 1-bit delta on a 4096 x 4096 layer is
2 MB of signs, read by a few dozen programs in tiny steps. This kernel instead:

* splits ``K`` into ``SPLITS`` ranges (grid axis 2), so a batch with one delta still runs
  ``~4 x SMs`` programs. Each program writes its fp32 partial sums to a workspace ``[SPLITS, M, N]``,
  then bumps a per-(row tile, N block) counter; the program that arrives last adds the partials, in split
  order (deterministic), into ``out`` with one rounding, and resets the counter to 0 for the next launch;
* reads the packed values as uint32 words where the rows allow it (bytes otherwise) and unpacks them in
  registers: 1-bit signs by moving each bit into the sign of -1.0 (shift + one logic op), b-bit codes by
  OR-ing them into the mantissa of 2**23 and subtracting 2**23 + offset (shift + logic op + one add), with
  no int -> float conversion;
* multiplies on the CUDA cores in fp32, ``BLOCK_R`` rows of a tile at a time (each value unpacked once
  serves them all), one FMA per value and row into a per-thread accumulator that is reduced over ``K``
  once, after the loop.

Spare tiles of the plan's fixed-size grid (and so rows routed to the base only, which get no tile) exit
before loading anything. The formats reach the kernel as a generic packed layout: values
``w [D, P, N, units]`` of ``BITS`` bits each (``P`` = BitDelta's sign passes, else 1), 2:4 positions
``[D, N, units]``, and scales indexed ``[D, P, N, group]`` by strides (``bitdelta.py`` and ``deltazip.py``
map their tensors onto it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import _common
from ._common import BitDeltaPlan, tl, triton

# Per-program counters of the split-K fixup, one zeroed buffer per (device, stream), grown on demand; every
# launch leaves them at zero. Concurrent launches on one stream are ordered, so they can share it.
_COUNTERS: dict[tuple[str, int | None, int], torch.Tensor] = {}


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles of the split-K decode kernel (pass as ``config=`` to ``bitdelta_matmul`` / ``deltazip_matmul``).

    ``block_r`` rows of one tile are computed together (a tile's rows loop in groups of ``block_r``),
    ``block_n`` outputs and ``block_k`` inputs per step, ``split_k`` ranges of ``K`` per output tile
    (``None``: from the shape and the SM count). Sizes are powers of two; ``block_k`` >= 32 so a step
    covers whole uint32 words.
    """

    block_r: int = 1
    block_n: int = 32
    block_k: int = 256
    split_k: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name, low in (("block_r", 1), ("block_n", 16), ("block_k", 32)):
            v = getattr(self, name)
            if v < low or v & (v - 1):
                raise ValueError(f"DecodeConfig.{name} must be a power of two >= {low}, got {v}.")
        if self.split_k is not None and self.split_k < 1:
            raise ValueError(f"DecodeConfig.split_k must be >= 1 or None (automatic), got {self.split_k}.")


class PackedDeltas(NamedTuple):
    """A format's stacked deltas in the kernel's generic layout (see the module docstring)."""

    values: torch.Tensor  # [D, P, N, units] uint8 or int32 (a word view of the bytes)
    positions: torch.Tensor | None  # [D, N, units], 2:4 only, same unit type as values
    scales: torch.Tensor  # [D, P, N, G] view (any strides)
    bits: int  # bits per stored value: 1 (signs), 2, 4, 8
    sparse24: bool
    group_size: int | None  # inputs per scale column; None: one scale per (pass, output)


def word_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` (uint8, last dim contiguous) viewed as int32 words along its last dim, or ``None`` if misaligned."""
    aligned = all(st % 4 == 0 for st in t.stride()[:-1]) and t.storage_offset() % 4 == 0
    if t.shape[-1] % 4 or not aligned or t.data_ptr() % 4:
        return None
    return t.view(torch.int32)


def split_count(k: int, block_k: int, programs: int, device: torch.device, interpret: bool) -> int:
    """K ranges per output tile so that ``programs`` output tiles become ~4 programs per SM.

    Fixed at 2 in the interpreter (no SMs; two splits exercise the fixup). Never more splits than K steps,
    and the steps are spread evenly so no split is empty.
    """
    steps = -(-k // block_k)
    if interpret:
        want = 2
    else:
        want = -(-4 * _common.sm_count(_common.device_index(device)) // max(programs, 1))
    per_split = -(-steps // max(1, min(want, steps)))
    return -(-steps // per_split)


def candidates(rows_per_delta: int, interpret: bool) -> list[DecodeConfig]:
    """Decode configs worth timing for ``rows_per_delta`` rows per tile (the first is the untuned pick).

    ``block_r`` covers the expected rows (at most 4: more rows per delta favour the ``tl.dot`` tiles);
    ``block_k`` shrinks until ``block_r x block_n x block_k`` is <= 64 fp32 values per thread (no spills).
    """
    block_r = min(1 << max(rows_per_delta - 1, 0).bit_length(), 4)
    if interpret:  # the interpreter's cost grows with tile area
        return [DecodeConfig(block_r=block_r, block_n=16, block_k=64, num_warps=1, num_stages=1)]
    picked = []
    # (block_n, block_k, num_warps): 64 then 32 fp32 values per thread at block_r 1 (fewer registers, more
    # programs resident per SM); six, so tuning a new shape compiles little.
    for bn, bk, warps in ((32, 256, 4), (64, 128, 4), (16, 512, 4), (32, 128, 4), (16, 256, 4), (32, 256, 8)):
        while block_r * bn * bk > 64 * 32 * warps and bk > 32:
            bk //= 2
        config = DecodeConfig(block_r=block_r, block_n=bn, block_k=bk, num_warps=warps, num_stages=2)
        if config not in picked:
            picked.append(config)
    return picked


def _counters(device: torch.device, n: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def launch(
    x: torch.Tensor,
    out: torch.Tensor,
    plan: BitDeltaPlan,
    deltas: PackedDeltas,
    config: DecodeConfig,
    *,
    interpret: bool,
) -> None:
    """Run the decode kernel over ``plan`` (its used deltas x N blocks decide the split)."""
    m, k = x.shape
    n = out.shape[1]
    values, positions, scales = deltas.values, deltas.positions, deltas.scales
    n_blocks = triton.cdiv(n, config.block_n)
    split = config.split_k or split_count(k, config.block_k, max(plan.num_used, 1) * n_blocks, x.device, interpret)
    steps = -(-k // config.block_k)
    k_per_split = -(-steps // min(split, steps)) * config.block_k
    split = -(-k // k_per_split)
    tiles = plan.tile_slot.numel()
    ws = torch.empty(split if split > 1 else 0, m, n, dtype=torch.float32, device=x.device)
    counters = _counters(x.device, tiles * n_blocks) if split > 1 else ws
    pos = positions if positions is not None else values
    unit_bits = 32 if values.dtype == torch.int32 else 8
    # Scales: per (pass, output) after the K loop; per group once per step when steps tile the groups;
    # else per element.
    group = deltas.group_size
    scale_mode = 0 if group is None else 1 if group % config.block_k == 0 else 2
    _jitted(interpret)[(tiles, n_blocks, split)](
        x,
        out,
        plan.rows,
        plan.tile_slot,
        plan.tile_start,
        plan.tile_end,
        values,
        pos,
        scales,
        ws,
        counters,
        m,
        n,
        k,
        values.shape[3],
        pos.shape[-1] if positions is not None else 0,
        values.shape[1],
        group or 1,
        k_per_split,
        split,
        x.stride(0),
        out.stride(0),
        *values.stride()[:3],
        *((positions.stride(0), positions.stride(1)) if positions is not None else (0, 0)),
        *scales.stride(),
        BLOCK_R=config.block_r,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        USE_SPLITS=split > 1,
        UNIT_BITS=unit_bits,
        BITS=deltas.bits,
        SPARSE24=deltas.sparse24,
        SCALE_MODE=scale_mode,
        EVEN_N=n % config.block_n == 0,
        EVEN_K=k % config.block_k == 0,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


# ===================================================================================================
# Triton kernel
# ===================================================================================================


def _decode_kernel(
    x_ptr,
    out_ptr,
    rows_ptr,
    tile_slot_ptr,
    tile_start_ptr,
    tile_end_ptr,
    w_ptr,
    pos_ptr,
    scales_ptr,
    ws_ptr,
    lock_ptr,
    M,
    N,
    K,
    WU,
    PU,
    P,
    GROUP_SIZE,
    K_PER_SPLIT,
    SPLITS,
    stride_xm,
    stride_om,
    stride_wd,
    stride_wp,
    stride_wn,
    stride_pd,
    stride_pn,
    stride_sd,
    stride_sp,
    stride_sn,
    stride_sg,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_SPLITS: tl.constexpr,  # SPLITS > 1: partials go through the workspace (a runtime count: fewer compiles)
    UNIT_BITS: tl.constexpr,
    BITS: tl.constexpr,
    SPARSE24: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(tile_slot_ptr + pid_t)
    if slot < 0:  # a spare tile of the fixed-size grid
        return
    start = tl.load(tile_start_ptr + pid_t)
    end = tl.load(tile_end_ptr + pid_t)

    VPU: tl.constexpr = UNIT_BITS // BITS  # values per unit
    VALUES: tl.constexpr = BLOCK_K // 2 if SPARSE24 else BLOCK_K  # stored values per row per step
    BLOCK_U: tl.constexpr = VALUES // VPU
    PPU: tl.constexpr = UNIT_BITS // 2  # 2:4 positions per unit
    BLOCK_PU: tl.constexpr = VALUES // PPU
    OFFSET: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_u = tl.arange(0, BLOCK_U)
    offs_r = tl.arange(0, BLOCK_R)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)

    # Tile bases in int64 (a stack of many deltas passes 2**31 bytes); offsets inside a tile stay int32.
    slot64 = slot.to(tl.int64)
    w_tile = w_ptr + slot64 * stride_wd + offs_n[:, None] * stride_wn + offs_u[None, :]
    s_row = scales_ptr + slot64 * stride_sd + offs_n * stride_sn
    if BITS == 1:  # bit q of a unit -> the sign bit of -1.0: set bits read +1.0
        shift = (31 - tl.arange(0, VPU)).to(tl.uint32)[None, None, :]
    else:
        shift = (tl.arange(0, VPU) * BITS).to(tl.uint32)[None, None, :]
    if SPARSE24:
        p_tile = pos_ptr + slot64 * stride_pd + offs_n[:, None] * stride_pn + tl.arange(0, BLOCK_PU)[None, :]
        pos_shift = (tl.arange(0, PPU) * 2).to(tl.uint32)[None, None, :]
        column = tl.arange(0, 4)[None, None, :]
    ws_split = tl.cast(M, tl.int64) * N  # one split's [M, N] partials; splits x M x N may pass 2**31
    ws_n = ws_ptr + pid_k * ws_split + offs_n[None, :]

    for r0 in range(start, end, BLOCK_R):
        r_pos = r0 + offs_r
        r_mask = r_pos < end
        rows = tl.load(rows_ptr + tl.minimum(r_pos, end - 1)).to(tl.int64)
        x_rows = x_ptr + rows[:, None] * stride_xm
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for p in range(P):
            # Products accumulate per element and are reduced over K once, after the loop: no cross-thread
            # reduction per step. Group scales applied per step (mode 1) need the per-step sum instead.
            acc_p = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            acc_3 = tl.zeros((BLOCK_R, BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                u0 = (k0 // BLOCK_K) * BLOCK_U
                if EVEN_N and EVEN_K:
                    units = tl.load(w_tile + p * stride_wp + u0)
                else:
                    u_mask = n_mask[:, None] & ((u0 + offs_u) < WU)[None, :]
                    units = tl.load(w_tile + p * stride_wp + u0, mask=u_mask, other=0)
                units = units.to(tl.uint32, bitcast=True) if UNIT_BITS == 32 else units.to(tl.uint32)
                if BITS == 1:
                    w = ((units[:, :, None] << shift) & 0x80000000) ^ 0xBF800000
                    w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(tl.float32, bitcast=True)
                else:
                    codes = tl.reshape((units[:, :, None] >> shift) & MASK, (BLOCK_N, VALUES))
                    if SPARSE24:
                        pu0 = (k0 // BLOCK_K) * BLOCK_PU
                        if EVEN_N and EVEN_K:
                            punits = tl.load(p_tile + pu0)
                        else:
                            pu_mask = n_mask[:, None] & ((pu0 + tl.arange(0, BLOCK_PU)) < PU)[None, :]
                            punits = tl.load(p_tile + pu0, mask=pu_mask, other=0)
                        if UNIT_BITS == 32:
                            punits = punits.to(tl.uint32, bitcast=True)
                        else:
                            punits = punits.to(tl.uint32)
                        pos = tl.reshape((punits[:, :, None] >> pos_shift) & 3, (BLOCK_N, VALUES))
                        v0, v1 = tl.split(tl.reshape(codes, (BLOCK_N, BLOCK_K // 4, 2)))
                        p0, p1 = tl.split(tl.reshape(pos, (BLOCK_N, BLOCK_K // 4, 2)))
                        dense = tl.where(column == p0[:, :, None].to(tl.int32), v0[:, :, None], OFFSET)
                        dense = tl.where(column == p1[:, :, None].to(tl.int32), v1[:, :, None], dense)
                        codes = tl.reshape(dense, (BLOCK_N, BLOCK_K))
                    # 2**23 + code, exactly (ulp 1), minus 2**23 + offset: the signed int, no conversion.
                    w = (codes | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)
                k = k0 + offs_k
                if SCALE_MODE == 2:
                    g = tl.minimum(k, K - 1) // GROUP_SIZE
                    s = tl.load(s_row[:, None] + g[None, :] * stride_sg, mask=n_mask[:, None], other=0.0)
                    w = w * s.to(tl.float32)
                # The K tail loads zeros: padding bits decode to nonzero values.
                if EVEN_K:
                    xk = tl.load(x_rows + k[None, :]).to(tl.float32)
                else:
                    xk = tl.load(x_rows + k[None, :], mask=(k < k_hi)[None, :], other=0.0).to(tl.float32)
                if SCALE_MODE == 1:
                    s = tl.load(s_row + (k0 // GROUP_SIZE) * stride_sg, mask=n_mask, other=0.0)
                    acc_p += tl.sum(xk[:, None, :] * w[None, :, :], axis=2) * s.to(tl.float32)[None, :]
                else:
                    acc_3 += xk[:, None, :] * w[None, :, :]
            if SCALE_MODE != 1:
                acc_p = tl.sum(acc_3, axis=2)
            if SCALE_MODE == 0:
                s = tl.load(s_row + p * stride_sp, mask=n_mask, other=0.0)
                acc += acc_p * s.to(tl.float32)[None, :]
            else:
                acc += acc_p
        o_mask = r_mask[:, None] & n_mask[None, :]
        if not USE_SPLITS:
            o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
            prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
            tl.store(o_ptrs, (prev.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            tl.store(ws_n + r_pos[:, None] * N, acc, mask=o_mask)

    if USE_SPLITS:
        # Every thread's partials are written before one thread releases them with the counter.
        tl.debug_barrier()
        lock = lock_ptr + pid_t * tl.cdiv(N, BLOCK_N) + pid_n
        arrived = tl.atomic_add(lock, 1, sem="acq_rel")
        if arrived == SPLITS - 1:  # the last split of this output tile: add all partials into out
            ws_0 = ws_ptr + offs_n[None, :]
            for r0 in range(start, end, BLOCK_R):
                r_pos = r0 + offs_r
                r_mask = r_pos < end
                rows = tl.load(rows_ptr + tl.minimum(r_pos, end - 1)).to(tl.int64)
                o_mask = r_mask[:, None] & n_mask[None, :]
                total = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
                for s in range(SPLITS):  # in split order: the sum does not depend on arrival order
                    ws_s = ws_0 + s * ws_split + r_pos[:, None] * N
                    total += tl.load(ws_s, mask=o_mask, other=0.0, cache_modifier=".cg")
                o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
                prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
                tl.store(o_ptrs, (prev.to(tl.float32) + total).to(out_ptr.dtype.element_ty), mask=o_mask)
            tl.atomic_xchg(lock, 0)


_jitted = _common.jit_on_first_use(_decode_kernel)

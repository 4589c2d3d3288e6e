"""The DeltaZip Triton kernel itself and its compile-time arguments (``deltazip.py`` holds the format,
the reference, the checks and the launcher; see its docstring for the semantics)."""

from __future__ import annotations

import torch

from . import _common
from ._common import KernelConfig, tl

# Decoding an offset-binary int c (0 <= c < 2**bits) without an int -> float conversion: OR-ing c into the
# mantissa of a float whose unit in the last place is 1 gives exactly MAGIC + c; subtracting MAGIC + offset
# leaves the signed int. (activation dtype) -> (bit pattern, its value), valid while c < 2**mantissa_bits.
_MAGIC = {
    torch.float16: (0x6400, 1024.0, 10),  # 1024.0: ulp 1 up to 2048
    torch.bfloat16: (0x4300, 128.0, 7),  # 128.0: ulp 1 up to 256
    torch.float32: (0x4B000000, 8388608.0, 23),  # 2**23
}


# ===================================================================================================
# Triton kernel
# ===================================================================================================
#
# Per K step a program loads BLOCK_N x (bytes of BLOCK_K values) packed bytes, splits every byte into its
# 8 / BITS fields with one shift + mask (broadcast over a small trailing axis, then reshaped into column
# order), and for 2:4 scatters the two kept values of each group of 4 columns into place with two
# compares against their positions (pruned columns get the code of int 0). The dot is computed transposed,
# (Δ @ xᵀ), so the decoded weights are the register-sourced A operand (wgmma on Hopper) and the small
# activation tile the shared-memory one, as in the 1-bit kernel.


def _deltazip_kernel(
    x_ptr,
    out_ptr,
    rows_ptr,
    tile_slot_ptr,
    tile_start_ptr,
    tile_end_ptr,
    q_ptr,
    pos_ptr,
    scales_ptr,
    N,
    K,
    QB,
    PB,
    GROUP_SIZE,
    stride_xm,
    stride_om,
    stride_qd,
    stride_qn,
    stride_pd,
    stride_pn,
    stride_sd,
    stride_sn,
    stride_sg,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BITS: tl.constexpr,
    SPARSE24: tl.constexpr,
    SCALE_MODE: tl.constexpr,  # 0: per channel, 1: group, one scale per step, 2: group, per element
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    DECODE: tl.constexpr,  # 1: magic 16-bit, 2: magic fp32, 0: int -> float conversion
    MAGIC_BITS: tl.constexpr,
    MAGIC_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(tile_slot_ptr + pid_t)
    if slot < 0:  # a spare tile of the fixed-size grid
        return
    start = tl.load(tile_start_ptr + pid_t)
    end = tl.load(tile_end_ptr + pid_t)

    PER_BYTE: tl.constexpr = 8 // BITS
    OFFSET: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    VALUES: tl.constexpr = BLOCK_K // 2 if SPARSE24 else BLOCK_K  # stored values per row per step
    QBYTES: tl.constexpr = VALUES // PER_BYTE
    PBYTES: tl.constexpr = BLOCK_K // 8  # 2:4 positions: 2 bits for each of BLOCK_K / 2 kept values
    GROUPS4: tl.constexpr = BLOCK_K // 4
    ACT = x_ptr.dtype.element_ty
    # Operand type of the dot: the activation dtype, except where fp32 keeps the maths exact (per-element
    # scales make the weights non-integers) or works around the interpreter (its bf16 dot is wrong).
    if DOT_FP32 or SCALE_MODE == 2:
        CD = tl.float32
    else:
        CD = ACT

    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    # Rows past the tile's end repeat its last row: activation loads stay unmasked, stores are masked.
    rows = tl.load(rows_ptr + tl.minimum(offs_m, end - 1)).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_qb = tl.arange(0, QBYTES)
    offs_pb = tl.arange(0, PBYTES)

    # Tile bases in int64 (a stack of many deltas passes 2**31 bytes); offsets inside a tile stay int32.
    slot64 = slot.to(tl.int64)
    q_tile = q_ptr + slot64 * stride_qd + offs_n[:, None] * stride_qn + offs_qb[None, :]
    p_tile = pos_ptr + slot64 * stride_pd + offs_n[:, None] * stride_pn + offs_pb[None, :]
    s_row = scales_ptr + slot64 * stride_sd + offs_n * stride_sn
    x_tile = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    pos_shift = (tl.arange(0, 4) * 2).to(tl.uint32)[None, None, :]
    column = tl.arange(0, 4)[None, None, :]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        step = k0 // BLOCK_K
        # --- packed bytes -> offset-binary codes [BLOCK_N, BLOCK_K] in column order ---
        if EVEN_N and EVEN_K:
            qbytes = tl.load(q_tile + step * QBYTES)
        else:
            qb_mask = n_mask[:, None] & ((step * QBYTES + offs_qb) < QB)[None, :]
            qbytes = tl.load(q_tile + step * QBYTES, mask=qb_mask, other=0)
        qbytes = qbytes.to(tl.uint32)
        if PER_BYTE == 1:
            codes = qbytes
        else:
            field_shift = (tl.arange(0, PER_BYTE) * BITS).to(tl.uint32)[None, None, :]
            codes = tl.reshape((qbytes[:, :, None] >> field_shift) & MASK, (BLOCK_N, VALUES))
        if SPARSE24:
            if EVEN_N and EVEN_K:
                pbytes = tl.load(p_tile + step * PBYTES)
            else:
                pb_mask = n_mask[:, None] & ((step * PBYTES + offs_pb) < PB)[None, :]
                pbytes = tl.load(p_tile + step * PBYTES, mask=pb_mask, other=0)
            pos = tl.reshape((pbytes.to(tl.uint32)[:, :, None] >> pos_shift) & 3, (BLOCK_N, VALUES))
            v0, v1 = tl.split(tl.reshape(codes, (BLOCK_N, GROUPS4, 2)))
            p0, p1 = tl.split(tl.reshape(pos, (BLOCK_N, GROUPS4, 2)))
            dense = tl.where(column == p0[:, :, None].to(tl.int32), v0[:, :, None], OFFSET)
            dense = tl.where(column == p1[:, :, None].to(tl.int32), v1[:, :, None], dense)
            codes = tl.reshape(dense, (BLOCK_N, BLOCK_K))
        # --- codes -> exact signed ints in a float type ---
        if DECODE == 1:
            w = (codes | MAGIC_BITS).to(tl.int16).to(ACT, bitcast=True)
            w = w - tl.full((1, 1), MAGIC_BIAS, ACT)
        elif DECODE == 2:
            w = (codes | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC_BIAS
        else:
            w = (codes.to(tl.int32) - OFFSET).to(tl.float32)
        k = k0 + offs_k
        if SCALE_MODE == 2:
            s_mask = n_mask[:, None] & (k < K)[None, :]
            s = tl.load(s_row[:, None] + (k // GROUP_SIZE)[None, :] * stride_sg, mask=s_mask, other=0.0)
            w = w.to(tl.float32) * s.to(tl.float32)
        w = w.to(CD)
        # --- activations: the K tail must load as zeros (padding codes decode to nonzero ints) ---
        if EVEN_K:
            xt = tl.load(x_tile + k0)
        else:
            xt = tl.load(x_tile + k0, mask=(k < K)[None, :], other=0.0)
        xt = tl.trans(xt.to(CD))
        if SCALE_MODE == 1:
            s = tl.load(s_row + (k0 // GROUP_SIZE) * stride_sg, mask=n_mask, other=0.0)
            acc += tl.dot(w, xt, input_precision=DOT_PRECISION) * s.to(tl.float32)[:, None]
        else:
            acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
    if SCALE_MODE == 0:
        s = tl.load(s_row, mask=n_mask, other=0.0)
        acc = acc * s.to(tl.float32)[:, None]

    o_ptrs = out_ptr + rows[None, :] * stride_om + offs_n[:, None]
    o_mask = m_mask[None, :] & n_mask[:, None]
    prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (prev.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


def _kernel_constexprs(
    dtype: torch.dtype,
    bits: int,
    layout: str,
    scale_mode: int,
    config: KernelConfig,
    even_n: bool,
    even_k: bool,
    interpret: bool,
) -> dict[str, object]:
    """The kernel's compile-time arguments (shared with the ahead-of-time compile test)."""
    # The interpreter computes bf16 arithmetic on raw bit patterns (wrong), so it decodes bf16 via fp32.
    magic_dtype = torch.float32 if interpret and dtype == torch.bfloat16 else dtype
    magic_bits, magic_value, mantissa = _MAGIC[magic_dtype]
    magic_ok = bits <= mantissa
    decode = (2 if magic_dtype == torch.float32 else 1) if magic_ok else 0
    return {
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": config.block_k,
        "BITS": bits,
        "SPARSE24": layout == "2:4",
        "SCALE_MODE": scale_mode,
        "EVEN_N": even_n,
        "EVEN_K": even_k,
        "DECODE": decode,
        "MAGIC_BITS": magic_bits,
        "MAGIC_BIAS": magic_value + (1 << (bits - 1)),
        **_common.dot_constexprs(dtype, interpret, exact=scale_mode == 2),
    }

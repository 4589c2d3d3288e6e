"""Mixed-batch 1-bit delta matmul: many BitDelta fine-tunes applied to one batch in one launch.

Semantics (``D`` deltas stacked, ``P`` residual sign passes each)::

    # x: [M, K]  out: [M, N]  slots: [M] in [-1, D)
    # signs: uint8 [D, P, N, ceil(K / 8)]  scales: fp32 [D, P, N]
    for r in range(M):
        d = slots[r]
        if d < 0:
            continue                                   # base-model row: out[r] untouched
        acc = zeros(N, fp32)
        for p in range(P):
            s = unpack_signs(signs[d, p], K)           # [N, K] of ±1
            acc += scales[d, p, :] * (x[r] @ s.T)      # fp32 accumulation
        out[r, :] = (out[r, :].float() + acc).to(out.dtype)   # one rounding per element

The Triton kernel groups rows by delta (a "plan": rows sorted by slot, cut into tiles of at most
``block_m`` rows of one delta), and each program owns one row tile × one ``BLOCK_N`` slice of the output:
it streams that slice's packed sign bytes over ``K`` once per pass, unpacks them in registers to ±1 in
the activation dtype, and ``tl.dot``\\ s them with the rows' activations. Signs are exact in any float
dtype, so the only roundings are the activation × ±1 accumulation (fp32) and the final add into ``out``.

The plan is built with device-side torch ops and no host synchronisation except the one that validates
slot indices, so a serving engine builds it once per forward pass (``plan_bitdelta_batch``) and passes
it to every layer.

Dispatch (``bitdelta_matmul(..., backend="auto")``): CUDA tensors run the Triton kernel, CPU tensors the
PyTorch reference ``bitdelta_matmul_reference``. ``backend="triton"`` forces the kernel, which on CPU
tensors needs ``TRITON_INTERPRET=1`` (how the tests run it without a GPU); ``backend="torch"`` forces
the reference. triton is imported only if installed, so CPU-only installs import this module freely.

What every kernel shares (checks of ``x`` / ``out`` / ``slots``, the plan, backend choice, launch helpers)
lives in ``_common.py``; this module keeps what is specific to the 1-bit format.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import _common, _decode, _tuning
from ._common import Backend, BitDeltaPlan, KernelConfig, plan_bitdelta_batch, tl, triton  # noqa: F401  (triton: None without it; tests read it here)
from ._common import default_block_m as _default_block_m  # noqa: F401  (the kernel tests read it here)
from ._common import interpret_enabled as _interpret_enabled  # noqa: F401  (the kernel tests read it here)
from ._common import sm_count as _sm_count

__all__ = [
    "BitDeltaKernelConfig",
    "BitDeltaPlan",
    "bitdelta_matmul",
    "bitdelta_matmul_reference",
    "plan_bitdelta_batch",
]

_OP = "bitdelta_matmul"

# ===================================================================================================
# Pure-PyTorch reference (CPU path and test oracle)
# ===================================================================================================


def bitdelta_matmul_reference(
    x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """``out[r] += Σ_p scales[slots[r], p] * (x[r] @ sign(signs[slots[r], p])ᵀ)`` in plain PyTorch.

    Same contract as :func:`bitdelta_matmul` (see the module docstring for the exact semantics); it is the
    CPU implementation and the oracle the Triton kernel is tested against.

    Args:
        x: Activations ``[M, K]`` (fp16, bf16 or fp32).
        out: ``[M, N]``, same dtype as ``x``; updated in place.
        slots: int32/int64 ``[M]``: the delta of each row, ``-1`` for none.
        signs: uint8 ``[D, P, N, ceil(K / 8)]``, packed as in :mod:`hf_delta.packing`.
        scales: fp32 ``[D, P, N]`` (any strides, e.g. a per-matrix scale ``.expand``-ed) or ``[D, P, 1]``.

    Returns:
        ``out``.

    Raises:
        TypeError, ValueError: see :func:`bitdelta_matmul`.
    """
    _check_inputs(x, out, slots, signs, scales)
    _common.check_slot_range(slots, signs.shape[0], op=_OP)
    return _reference(x, out, slots, signs, scales)


def _reference(
    x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    # Imported here so kernels/ also loads as a bare package, without hf_delta (ahead-of-time
    # compile checks in a bare subprocess); after the first call it is a dictionary lookup.
    from hf_delta.packing import unpack_signs

    k = x.shape[1]
    for d, idx in _common.rows_by_delta(slots):
        xs = x.index_select(0, idx).float()
        acc = torch.zeros(idx.numel(), out.shape[1], dtype=torch.float32, device=out.device)
        for p in range(signs.shape[1]):
            acc += (xs @ unpack_signs(signs[d, p], k, torch.float32).T) * scales[d, p].float()
        _common.add_into_rows(out, idx, acc)
    return out


# ===================================================================================================
# Validation (the batch itself: _common.check_batch_*)
# ===================================================================================================


def _check_inputs(
    x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor
) -> None:
    """Shapes, dtypes, devices and layout; no device synchronisation."""
    weights = [("signs", signs), ("scales", scales)]
    _common.check_batch_dtypes(_OP, x, out, slots, weights)
    if signs.dtype != torch.uint8:
        raise TypeError(f"{_OP}: signs must be uint8 packed sign bits, got {signs.dtype}.")
    if scales.dtype != torch.float32:
        raise TypeError(f"{_OP}: scales must be float32, got {scales.dtype}; use scales.float().")
    m, k, n = _common.check_batch_shapes(_OP, x, out, slots, weights)
    kb = (k + 7) // 8
    if signs.dim() != 4 or signs.shape[2] != n or signs.shape[3] != kb:
        raise ValueError(
            f"{_OP}: signs must be [D, P, N={n}, ceil(K/8)={kb}] for x [{m}, {k}] and out "
            f"[{m}, {n}], got shape {tuple(signs.shape)}."
        )
    d, p = signs.shape[:2]
    if scales.dim() != 3 or tuple(scales.shape[:2]) != (d, p) or scales.shape[2] not in (n, 1):
        raise ValueError(
            f"{_OP}: scales must be [D={d}, P={p}, N={n}] (per row, any strides) or "
            f"[{d}, {p}, 1] (per matrix), got shape {tuple(scales.shape)}."
        )
    _common.check_batch_strides(_OP, x, out, [("signs", signs)])


# ===================================================================================================
# Launch configuration
# ===================================================================================================


@dataclass(frozen=True)
class BitDeltaKernelConfig(KernelConfig):
    """Tile sizes of the Triton kernel (all powers of two; ``tl.dot`` needs each >= 16 on GPUs).

    ``block_m`` rows of one delta × ``block_n`` outputs per program, ``block_k`` inputs per loop step.
    With float16/bfloat16 activations ``block_k`` must be at least 32 (``MIN_BLOCK_K_16BIT``): compiled for an
    H200 (Triton 3.6), 16 inputs per step of the paired sign unpack gave wrong sums, though the interpreter's
    were right; 32 and up matched the fp64 oracle in every test.
    """

    block_n: int = 128


def _default_config(
    block_m: int, n: int, num_tiles: int, dtype: torch.dtype, device: torch.device, interpret: bool
) -> BitDeltaKernelConfig:
    """Tiles by regime (the plan's ``block_m`` tells decode from prefill).

    Starting points chosen from sm_90 SASS instruction counts, not yet tuned on hardware;
    ``benchmarks/kernel_bench.py --sweep`` measures alternatives.
    """
    if interpret:  # the interpreter's cost grows with tile area; minimal tiles keep CPU tests fast
        return BitDeltaKernelConfig(block_m=16, block_n=16, block_k=32, num_warps=1, num_stages=1)
    if dtype == torch.float32:  # exact fp32 dot runs on FMA units; small tiles avoid register spills
        return BitDeltaKernelConfig(block_m=block_m, block_n=64 if block_m == 16 else 32, block_k=32)
    if block_m > 16:  # prefill: tensor-core bound, one unpack serves block_m rows
        return BitDeltaKernelConfig(block_m=block_m, block_n=256, block_k=64, num_warps=8, num_stages=3)
    # Decode: bound by streaming and unpacking bits; N tiles as wide as still fill the SMs.
    block_n = _common.fill_block_n(n, num_tiles, _sm_count(_common.device_index(device)), widest=256)
    return BitDeltaKernelConfig(
        block_m=16, block_n=block_n, block_k=128, num_warps=8 if block_n >= 256 else 4, num_stages=3
    )


MIN_BLOCK_K_16BIT = 32

# Bit pattern of -1.0 in each activation dtype (the kernel sets the sign bit of +1 where a sign bit is clear).
_NEG_ONE_BITS = {torch.float16: 0xBC00, torch.bfloat16: 0xBF80, torch.float32: 0xBF800000}


# ===================================================================================================
# Triton kernel
# ===================================================================================================
#
# Unpacking is the kernel's cost per streamed byte at decode, so it is built to be one integer op per
# element. Signs are read in "units" (uint32 words when the rows allow it, else bytes) of UB bits. For
# 16-bit activations, one 32-bit register holds two ±1 halves: bit q of a unit goes to the sign bit of
# the low half (bit 15) and bit q + UB/2 to that of the high half (bit 31), on top of -1.0's pattern:
#     words:  ((w << (15 - q)) & 0x80008000) ^ NEG_ONE_PAIR            (shift, lop3)
#     bytes:  ((b * (2**(15-q) + 2**(27-q))) & 0x80008000) ^ NEG_ONE_PAIR   (the two shifted copies of an
#             8-bit value cannot overlap, so one multiply makes both)
# No int -> float conversion (a slow-rate instruction) appears. This pairs input q with q + UB/2, so the
# activations are loaded in the same permuted order; a dot product does not care about order.
# fp32 activations get one ±1.0f per bit in natural order (exact, unhurried: fp32 is the odd case).
# The dot is computed transposed, (signs @ xᵀ), so the unpacked signs are the register-sourced A operand
# (wgmma on Hopper) and the small activation tile the shared-memory one.


def _bitdelta_kernel(
    x_ptr,
    out_ptr,
    rows_ptr,
    tile_slot_ptr,
    tile_start_ptr,
    tile_end_ptr,
    signs_ptr,
    scales_ptr,
    N,
    K,
    KU,
    P,
    stride_xm,
    stride_om,
    stride_sd,
    stride_sp,
    stride_sn,
    stride_cd,
    stride_cp,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
    UNIT_BITS: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    PAIRED: tl.constexpr,
    NEG_ONE: tl.constexpr,
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

    BLOCK_K: tl.constexpr = BLOCK_U * UNIT_BITS
    HALF: tl.constexpr = UNIT_BITS // 2
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    # Rows past the tile's end repeat its last row: activation loads stay unmasked, stores are masked.
    rows = tl.load(rows_ptr + tl.minimum(offs_m, end - 1)).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_u = tl.arange(0, BLOCK_U)

    # Tile bases in int64 (a stack of many deltas passes 2**31 bytes); offsets inside a tile stay int32.
    slot64 = slot.to(tl.int64)
    w_tile = (signs_ptr + slot64 * stride_sd + n0.to(tl.int64) * stride_sn) + (
        tl.arange(0, BLOCK_N)[:, None] * stride_sn + offs_u[None, :]
    )
    scale_row = scales_ptr + slot64 * stride_cd + offs_n * stride_cn
    if PAIRED:
        # Activation order matching the pairs: [unit, e, q] holds input unit * UB + e * HALF + q.
        kx = (
            offs_u[:, None, None] * UNIT_BITS
            + tl.arange(0, 2)[None, :, None] * HALF
            + tl.arange(0, HALF)[None, None, :]
        )
        x_tile = x_ptr + rows[:, None, None, None] * stride_xm + kx[None, :, :, :]
        q = tl.arange(0, HALF).to(tl.uint32)[None, None, :]
        if UNIT_BITS == 32:
            shift = 15 - q
        else:
            mult = (32768 >> q) + (134217728 >> q)  # 2**(15-q) + 2**(27-q)
    else:
        kx = offs_u[:, None] * UNIT_BITS + tl.arange(0, UNIT_BITS)[None, :]
        x_tile = x_ptr + rows[:, None, None] * stride_xm + kx[None, :, :]
        shift = (31 - tl.arange(0, UNIT_BITS)).to(tl.uint32)[None, None, :]

    total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for p in range(P):
        w_ptrs = w_tile + p * stride_sp  # int32 is enough within one delta's P x N x KB bytes
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for u0 in range(0, KU, BLOCK_U):
            if EVEN_N and EVEN_K:
                units = tl.load(w_ptrs + u0)
            else:
                u_mask = (u0 + offs_u) < KU
                units = tl.load(w_ptrs + u0, mask=n_mask[:, None] & u_mask[None, :], other=0)
            if UNIT_BITS == 32:
                units = units.to(tl.uint32, bitcast=True)
            else:
                units = units.to(tl.uint32)
            units = units[:, :, None]
            if PAIRED:
                if UNIT_BITS == 32:
                    pairs = units << shift
                else:
                    pairs = units * mult
                pairs = (pairs & 0x80008000) ^ (NEG_ONE | (NEG_ONE << 16))
                halves = tl.join(pairs.to(tl.int16), (pairs >> 16).to(tl.int16))
                w = tl.reshape(halves, (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty, bitcast=True)
            else:
                w = ((units << shift) & 0x80000000) ^ NEG_ONE
                w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(tl.float32, bitcast=True)
            k = u0 * UNIT_BITS + kx
            if EVEN_K:
                xt = tl.load(x_tile + u0 * UNIT_BITS)
            else:
                # Padding bits decode to -1, so the activation tail must be zero, not just skipped.
                xt = tl.load(x_tile + u0 * UNIT_BITS, mask=(k < K)[None], other=0.0)
            if PAIRED:
                xt = tl.permute(xt, (0, 1, 3, 2))
            xt = tl.reshape(xt, (BLOCK_M, BLOCK_K))
            if DOT_FP32:
                # Interpreter + bf16 only (its bf16 dot is wrong): bf16 -> fp32 is exact, so products and
                # fp32 accumulation match the GPU's bf16 tensor-core dot.
                w = w.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(w, tl.trans(xt), acc, input_precision=DOT_PRECISION)
        scale = tl.load(scale_row + p * stride_cp, mask=n_mask, other=0.0)
        total += acc * scale[:, None]

    o_ptrs = out_ptr + rows[None, :] * stride_om + offs_n[:, None]
    o_mask = m_mask[None, :] & n_mask[:, None]
    prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (prev.to(tl.float32) + total).to(out_ptr.dtype.element_ty), mask=o_mask)


_jitted = _common.jit_on_first_use(_bitdelta_kernel)


def _sign_units(signs: torch.Tensor, block_k: int) -> tuple[torch.Tensor, int]:
    """``signs`` viewed as uint32 words where rows and strides allow (4x fewer loads), else as bytes."""
    words = _decode.word_view(signs) if block_k >= 32 else None
    return (words, 32) if words is not None else (signs, 8)


def _launch(
    x: torch.Tensor,
    out: torch.Tensor,
    config: BitDeltaKernelConfig | _decode.DecodeConfig,
    *,
    signs: torch.Tensor,
    scales: torch.Tensor,
    plan: BitDeltaPlan,
    interpret: bool,
) -> None:
    """The kernel ``config`` names: the split-K decode kernel or the tile kernel."""
    if isinstance(config, _decode.DecodeConfig):
        words = _decode.word_view(signs)
        deltas = _decode.PackedDeltas(
            signs if words is None else words, None, scales.unsqueeze(-1), bits=1, sparse24=False, group_size=None
        )
        _decode.launch(x, out, plan, deltas, config, interpret=interpret)
    else:
        _launch_triton(x, out, signs, scales, plan, config, interpret)


def _launch_triton(
    x: torch.Tensor,
    out: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    plan: BitDeltaPlan,
    config: BitDeltaKernelConfig,
    interpret: bool,
) -> None:
    k = x.shape[1]
    n = out.shape[1]
    units, unit_bits = _sign_units(signs, config.block_k)
    _common.launch_over_tiles(
        _jitted(interpret),
        plan,
        config,
        x,
        out,
        units,
        scales,
        n,
        k,
        units.shape[3],
        units.shape[1],
        x.stride(0),
        out.stride(0),
        units.stride(0),
        units.stride(1),
        units.stride(2),
        scales.stride(0),
        scales.stride(1),
        scales.stride(2),
        BLOCK_M=plan.block_m,
        BLOCK_N=config.block_n,
        BLOCK_U=config.block_k // unit_bits,
        UNIT_BITS=unit_bits,
        EVEN_N=n % config.block_n == 0,
        EVEN_K=k % config.block_k == 0,
        PAIRED=x.dtype != torch.float32,
        NEG_ONE=_NEG_ONE_BITS[x.dtype],
        **_common.dot_constexprs(x.dtype, interpret),
    )


# ===================================================================================================
# Public launcher
# ===================================================================================================


def bitdelta_matmul(
    x: torch.Tensor,
    out: torch.Tensor,
    slots: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    *,
    backend: Backend = "auto",
    plan: BitDeltaPlan | None = None,
    config: BitDeltaKernelConfig | _decode.DecodeConfig | None = None,
) -> torch.Tensor:
    """Add each row's 1-bit delta product into ``out`` in place (mixed batch: one delta per row).

    See the module docstring for the exact semantics. Rows with slot ``-1`` are left untouched.

    Args:
        x: Activations ``[M, K]``, float16, bfloat16 or float32, contiguous.
        out: ``[M, N]``, same dtype and device as ``x``, rows contiguous; updated in place.
        slots: int32/int64 ``[M]``: index of each row's delta in ``signs`` / ``scales``, ``-1`` for none.
        signs: uint8 ``[D, P, N, ceil(K / 8)]``, packed sign bits (:func:`hf_delta.packing.pack_1bit_u8`),
            last dim contiguous.
        scales: float32 ``[D, P, N]`` with any strides (pass a per-matrix ``[D, P, 1]`` scale as is or
            ``.expand(D, P, N)``-ed; stride 0 costs nothing).
        backend: ``"auto"``: Triton for CUDA tensors, the PyTorch reference for CPU tensors.
            ``"triton"``: force the kernel (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``).
            ``"torch"``: force the reference.
        plan: A :func:`plan_bitdelta_batch` result for exactly these ``slots`` (skips the per-call plan
            and its host sync); its ``block_m`` overrides ``config.block_m``.
        config: Kernel tile sizes: a ``BitDeltaKernelConfig`` runs the tile kernel, a ``DecodeConfig`` the
            split-K decode kernel. Default: by batch size, autotuned on CUDA for decode batches and cached
            per (shape, M bucket, D); call :func:`~hf_delta.kernels.warmup` before timing anything.

    Returns:
        ``out``.

    Raises:
        TypeError: A dtype is wrong (x/out not fp16/bf16/fp32 or not equal, slots not int, signs not uint8,
            scales not fp32) or an argument is not a tensor.
        ValueError: Shapes disagree, tensors sit on different devices, ``x`` is not contiguous, a slot is
            outside ``[-1, D)``, ``plan`` does not match, ``config.block_k`` is below 32 with 16-bit
            activations, or the requested backend cannot run here.
        ImportError: The Triton backend is needed but triton is not installed.

    Example:
        >>> import torch
        >>> from hf_delta.packing import pack_1bit_u8
        >>> signs = pack_1bit_u8(torch.randn(2, 1, 4, 10) > 0)      # 2 deltas, 1 pass, N=4, K=10
        >>> scales = torch.full((2, 1, 4), 0.01)
        >>> x, out = torch.randn(3, 10), torch.zeros(3, 4)
        >>> bitdelta_matmul(x, out, torch.tensor([1, -1, 0]), signs, scales).shape
        torch.Size([3, 4])
    """
    _common.check_backend_name(backend, op=_OP)
    _check_inputs(x, out, slots, signs, scales)
    tiles = isinstance(config, BitDeltaKernelConfig)
    if tiles and x.dtype != torch.float32 and config.block_k < MIN_BLOCK_K_16BIT:
        raise ValueError(
            f"{_OP}: config.block_k={config.block_k} is too small for {x.dtype} activations; use block_k >= "
            f"{MIN_BLOCK_K_16BIT} (see BitDeltaKernelConfig) or leave config=None for the default tiles."
        )
    num_deltas = signs.shape[0]
    if scales.shape[2] != out.shape[1]:
        scales = scales.expand(-1, -1, out.shape[1])  # per-matrix scale: stride 0, no copy
    _common.check_plan_matches(plan, x.shape[0], num_deltas, op=_OP)

    use_triton, interpret = _common.choose_backend(backend, x.device, op=_OP, stacklevel=3)
    if not use_triton:
        has_rows = _common.reference_has_rows(slots, num_deltas, plan, op=_OP)
        return _reference(x, out, slots, signs, scales) if has_rows else out

    empty = x.shape[0] == 0 or out.shape[1] == 0 or num_deltas == 0
    block_m = config.block_m if tiles else None
    plan = _common.launch_plan(slots, num_deltas, plan, block_m, device=x.device, empty=empty, op=_OP)
    if plan is not None:
        if config is None:
            tile = _default_config(plan.block_m, out.shape[1], plan.tile_slot.numel(), x.dtype, x.device, interpret)
            key = (_OP, x.dtype, out.shape[1], x.shape[1], signs.shape[1])
            launch = functools.partial(_launch, x, signs=signs, scales=scales, plan=plan, interpret=interpret)
            config = _tuning.choose_for_call(key, tile, x, out, plan, launch, interpret=interpret)
        _launch(x, out, config, signs=signs, scales=scales, plan=plan, interpret=interpret)
    return out

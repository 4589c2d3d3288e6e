"""Mixed-batch low-bit delta matmul: many DeltaZip fine-tunes (2/4/8-bit, dense or 2:4) in one launch.

Semantics (``D`` deltas stacked, each an ``[N, K]`` matrix of symmetric ints times fp scales)::

    # x: [M, K]  out: [M, N]  slots: [M] in [-1, D)
    # qweight: uint8 [D, N, packed(V)]   V = K ("dense") or K / 2 ("2:4": only the kept values)
    # positions: uint8 [D, N, ceil(K / 8)]  ("2:4" only: 2-bit in-group column of each kept value)
    # scales: fp16/bf16/fp32 [D, N, G]   G = 1 (per output channel) or ceil(K / group_size)
    for r in range(M):
        d = slots[r]
        if d < 0:
            continue                                           # base-model row: out[r] untouched
        q = unpack(qweight[d], positions[d])                   # [N, K] ints, 0 where 2:4 pruned them
        s = scales[d] if G == 1 else repeat(scales[d], group_size)[:, :K]   # [N, 1] or [N, K]
        acc = x[r].float() @ (q * s.float()).T                 # fp32 accumulation
        out[r, :] = (out[r, :].float() + acc).to(out.dtype)   # one rounding per element

``qweight`` / ``positions`` / ``scales`` are exactly ``DeltaZipWeight``'s ``qweight`` / ``mask`` / ``scales``
stacked along a new first axis (:mod:`hf_delta.packing`: offset-binary ints packed little-endian along
``K``; 2:4 positions with :func:`~hf_delta.packing.pack_2of4_u8`).

What runs where:

* Triton kernel: ``bits`` in {2, 4, 8}, layouts ``"dense"`` and ``"2:4"``, per-channel or group scales,
  fp16/bf16/fp32 activations, any ``M``, ``N``, ``K`` (``K % 4 == 0`` for 2:4, as the format guarantees).
* PyTorch reference only: 3-bit values (a bit stream that crosses bytes). ``backend="auto"`` takes the
  reference for them even on CUDA; ``backend="triton"`` refuses them.
* Not here: the ``"bitmap"`` layout (kept values of all rows in one flat stream, so rows cannot be tiled)
  and ``row_index`` (only some rows stored). ``DeltaZipWeight.add_to_rows`` sends those weights to the
  generic dense path instead of this function.

The Triton kernel groups rows by delta with the same plan as the 1-bit kernel (``plan_bitdelta_batch``:
rows sorted by slot and cut into tiles of at most ``block_m`` rows of one delta; one plan per forward
pass serves both kernels), and each program owns one row tile × one ``BLOCK_N`` slice of the output: it
streams that slice's packed bytes over ``K`` once, decodes them in registers to exact small integers in
the activation dtype, and ``tl.dot``\\ s them with the rows' activations. Ints of at most 8 bits times
fp16/bf16 activations are exact products, so per-channel scales are applied once after the ``K`` loop
and group scales once per ``BLOCK_K`` step (``BLOCK_K`` divides ``group_size``); both in fp32. Group
sizes with no power-of-two divisor >= 16 (rare; ``tl.dot`` needs ``K`` tiles of 16) are scaled per element
in fp32 and use an exact fp32 dot instead, slower but still one rounding.

Dispatch (``backend="auto"``): CUDA tensors run the Triton kernel, CPU tensors the PyTorch reference
``deltazip_matmul_reference``. ``backend="triton"`` forces the kernel (CPU tensors need
``TRITON_INTERPRET=1``, how the tests run it without a GPU); ``backend="torch"`` forces the reference.
The shared pieces (checks of ``x`` / ``out`` / ``slots``, the plan, backend choice, launch helpers) live in
``_common.py``; this module keeps what is specific to the DeltaZip formats, and the Triton kernel's body
is in ``_deltazip_jit.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hf_delta.packing import LOWBIT_WIDTHS, lowbit_packed_width

from . import _common, _decode, _tuning
from ._common import Backend, BitDeltaPlan, KernelConfig, tl, triton  # noqa: F401  (triton: None without it; tests read it here)
from ._common import interpret_enabled as _interpret_enabled  # noqa: F401  (the kernel tests read it here)
from ._common import sm_count as _sm_count
from ._deltazip_jit import _deltazip_kernel, _kernel_constexprs

__all__ = ["DeltaZipKernelConfig", "deltazip_kernel_supports", "deltazip_matmul", "deltazip_matmul_reference"]

_OP = "deltazip_matmul"
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNEL_BITS = (2, 4, 8)  # of LOWBIT_WIDTHS: 3-bit rows are a bit stream, which only the reference reads
_LAYOUTS = ("dense", "2:4")


class _Deltas(NamedTuple):
    """The stacked deltas of one call and their format: the arguments of the public ops after ``slots``."""

    qweight: torch.Tensor
    scales: torch.Tensor
    positions: torch.Tensor | None
    bits: int
    layout: str
    group_size: int | None


def deltazip_kernel_supports(bits: int, layout: str) -> bool:
    """Whether the Triton kernel handles ``bits`` / ``layout`` (else only the reference does)."""
    return bits in _KERNEL_BITS and layout in _LAYOUTS


# ===================================================================================================
# Pure-PyTorch reference (CPU path and test oracle)
# ===================================================================================================


def deltazip_matmul_reference(
    x: torch.Tensor,
    out: torch.Tensor,
    slots: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int,
    layout: str,
    group_size: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[r] += x[r] @ dequant(Δ[slots[r]])ᵀ`` in plain PyTorch (fp32 accumulation, one rounding).

    Same contract as :func:`deltazip_matmul` (see the module docstring for the exact semantics); it is the
    CPU implementation and the oracle the Triton kernel is tested against. Handles 3-bit values too.

    Returns:
        ``out``.

    Raises:
        TypeError, ValueError: see :func:`deltazip_matmul`.
    """
    deltas = _Deltas(qweight, scales, positions, bits, layout, group_size)
    _check_inputs(x, out, slots, deltas)
    _common.check_slot_range(slots, qweight.shape[0], op=_OP)
    return _reference(x, out, slots, deltas)


def _dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    positions: torch.Tensor | None,
    k: int,
    bits: int,
    layout: str,
    group_size: int | None,
) -> torch.Tensor:
    """One delta ``[N, K]`` in fp32 (the same maths as ``DeltaZipWeight.to_dense``)."""
    # Imported here so kernels/ also loads as a bare package, without hf_delta (ahead-of-time
    # compile checks in a bare subprocess); after the first call it is a dictionary lookup.
    from hf_delta.packing import unpack_2of4_u8, unpack_lowbit_u8

    n = qweight.shape[0]
    if layout == "dense":
        q = unpack_lowbit_u8(qweight, bits, k)
    else:
        keep = unpack_2of4_u8(positions, k)
        values = unpack_lowbit_u8(qweight, bits, k // 2)
        q = torch.zeros(n, k, dtype=values.dtype, device=qweight.device)
        q[keep] = values.reshape(-1)
    s = scales.float()
    if s.shape[1] > 1:
        s = s.repeat_interleave(group_size, dim=1)[:, :k]
    return q.float() * s


def _reference(x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, deltas: _Deltas) -> torch.Tensor:
    qweight, scales, positions, bits, layout, group_size = deltas
    k = x.shape[1]
    for d, idx in _common.rows_by_delta(slots):
        pos = positions[d] if positions is not None else None
        delta = _dequantize(qweight[d], scales[d], pos, k, bits, layout, group_size)
        _common.add_into_rows(out, idx, x.index_select(0, idx).float() @ delta.T)
    return out


# ===================================================================================================
# Validation
# ===================================================================================================


def _check_inputs(x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, deltas: _Deltas) -> None:
    """Shapes, dtypes, devices, layout options; no device synchronisation."""
    qweight, scales, positions, bits, layout, group_size = deltas
    fn = _OP
    if bits not in LOWBIT_WIDTHS:
        raise ValueError(f"{fn}: bits must be one of {LOWBIT_WIDTHS}, got {bits!r}.")
    if layout not in _LAYOUTS:
        hint = " (bitmap rows cannot be tiled; use DeltaZipWeight.add_to_rows)" if layout == "bitmap" else ""
        raise ValueError(f"{fn}: layout must be 'dense' or '2:4', got {layout!r}{hint}.")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise ValueError(f"{fn}: group_size must be a positive int or None (per channel), got {group_size!r}.")
    weights = [("qweight", qweight), ("scales", scales)]
    if layout == "2:4":
        weights.append(("positions", positions))
    elif positions is not None:
        raise ValueError(f"{fn}: positions are only for layout='2:4'; pass positions=None for 'dense'.")
    _common.check_batch_dtypes(fn, x, out, slots, weights)
    if qweight.dtype != torch.uint8:
        raise TypeError(f"{fn}: qweight must be uint8 packed ints, got {qweight.dtype}.")
    if scales.dtype not in _SCALE_DTYPES:
        raise TypeError(f"{fn}: scales must be float16, bfloat16 or float32, got {scales.dtype}.")
    if positions is not None and positions.dtype != torch.uint8:
        raise TypeError(f"{fn}: positions must be uint8 2:4 metadata, got {positions.dtype}.")
    _, k, n = _common.check_batch_shapes(fn, x, out, slots, weights)
    if layout == "2:4" and k % 4:
        raise ValueError(f"{fn}: layout '2:4' needs K divisible by 4, got K={k}.")
    values = k if layout == "dense" else k // 2
    qb = lowbit_packed_width(values, bits)
    if qweight.dim() != 3 or qweight.shape[1] != n or qweight.shape[2] != qb:
        raise ValueError(
            f"{fn}: qweight must be [D, N={n}, {qb}] ({values} {bits}-bit values per row for layout {layout!r} "
            f"and K={k}), got shape {tuple(qweight.shape)}."
        )
    d = qweight.shape[0]
    if positions is not None and tuple(positions.shape) != (d, n, (k + 7) // 8):
        raise ValueError(
            f"{fn}: positions must be [D={d}, N={n}, ceil(K/8)={(k + 7) // 8}], got shape {tuple(positions.shape)}."
        )
    groups = None if group_size is None else -(-k // group_size)
    if scales.dim() != 3 or tuple(scales.shape[:2]) != (d, n) or scales.shape[2] not in (1, groups):
        want = "[D, N, 1] (per channel)" + ("" if groups is None else f" or [D, N, ceil(K/group_size)={groups}]")
        raise ValueError(
            f"{fn}: scales must be {want} with D={d}, N={n}, group_size={group_size}, got shape {tuple(scales.shape)}."
        )
    _common.check_batch_strides(fn, x, out, [("qweight", qweight), ("positions", positions)])


# ===================================================================================================
# Launch configuration
# ===================================================================================================


@dataclass(frozen=True)
class DeltaZipKernelConfig(KernelConfig):
    """Tile sizes of the Triton kernel (powers of two; ``tl.dot`` needs each >= 16 on GPUs).

    ``block_m`` rows of one delta × ``block_n`` outputs per program, ``block_k`` inputs per loop step. With
    group scales, a ``block_k`` that divides ``group_size`` scales per step; any other scales per element.
    """

    block_n: int = 64


def _default_config(
    block_m: int,
    n: int,
    num_tiles: int,
    dtype: torch.dtype,
    layout: str,
    group_size: int | None,
    device: torch.device,
    interpret: bool,
) -> DeltaZipKernelConfig:
    """Tiles by regime (the plan's ``block_m`` tells decode from prefill).

    Starting points by analogy with the 1-bit kernel, not yet tuned on hardware (``benchmarks/kernel_bench.py
    --sweep`` measures alternatives). Group scales cap ``block_k`` at the largest power of two dividing
    ``group_size`` so each step has one scale per output.
    """
    group_cap = 1 << 30 if group_size is None else group_size & -group_size
    if interpret:  # the interpreter's cost is per program and per op, hardly per element: few, wide programs
        block_k = 64 if group_cap < 16 else min(64, group_cap)
        return DeltaZipKernelConfig(block_m=16, block_n=64, block_k=block_k, num_warps=1, num_stages=1)
    if dtype == torch.float32 or group_cap < 16:  # exact fp32 dot on FMA units: small tiles avoid spills
        block_k = 32 if group_cap >= 32 or group_cap < 16 else 16
        return DeltaZipKernelConfig(block_m=block_m, block_n=64 if block_m == 16 else 32, block_k=block_k)
    if block_m > 16:  # prefill: tensor-core bound, one decode of the packed bytes serves block_m rows
        return DeltaZipKernelConfig(block_m=block_m, block_n=128, block_k=min(64, group_cap), num_warps=8, num_stages=3)
    # Decode: bound by streaming and decoding the packed bytes. A 2:4 step reads half the values, so it can
    # cover more K per step for the same bytes; N tiles as wide as still fill the SMs.
    block_k = min(256 if layout == "2:4" else 128, group_cap)
    block_n = _common.fill_block_n(n, num_tiles, _sm_count(_common.device_index(device)), widest=128)
    return DeltaZipKernelConfig(block_m=16, block_n=block_n, block_k=block_k, num_warps=4, num_stages=3)


_jitted = _common.jit_on_first_use(_deltazip_kernel)


def _scale_mode(scales: torch.Tensor, group_size: int | None, block_k: int) -> int:
    if scales.shape[2] == 1:
        return 0
    return 1 if group_size % block_k == 0 else 2


def _launch_triton(
    x: torch.Tensor,
    out: torch.Tensor,
    deltas: _Deltas,
    plan: BitDeltaPlan,
    config: DeltaZipKernelConfig,
    interpret: bool,
) -> None:
    qweight, scales, positions, bits, layout, group_size = deltas
    k = x.shape[1]
    n = out.shape[1]
    scale_mode = _scale_mode(scales, group_size, config.block_k)
    # Dense layout: no positions; the kernel never reads the pointer, any uint8 tensor will do.
    pos = positions if positions is not None else qweight
    pos_strides = (pos.stride(0), pos.stride(1)) if positions is not None else (0, 0)
    constexprs = _kernel_constexprs(
        x.dtype,
        bits,
        layout,
        scale_mode,
        config,
        n % config.block_n == 0,
        k % config.block_k == 0,
        interpret,
    )
    _common.launch_over_tiles(
        _jitted(interpret),
        plan,
        config,
        x,
        out,
        qweight,
        pos,
        scales,
        n,
        k,
        qweight.shape[2],
        pos.shape[2] if positions is not None else 0,
        group_size or 1,
        x.stride(0),
        out.stride(0),
        qweight.stride(0),
        qweight.stride(1),
        *pos_strides,
        scales.stride(0),
        scales.stride(1),
        scales.stride(2),
        **constexprs,
    )


def _launch_decode(
    x: torch.Tensor,
    out: torch.Tensor,
    deltas: _Deltas,
    plan: BitDeltaPlan,
    config: _decode.DecodeConfig,
    interpret: bool,
) -> None:
    qweight, scales, positions, bits, layout, group_size = deltas
    q_words = _decode.word_view(qweight)
    p_words = None if positions is None else _decode.word_view(positions)
    if q_words is not None and (positions is None or p_words is not None):  # one unit type for both
        qweight, positions = q_words, p_words
    packed = _decode.PackedDeltas(
        qweight.unsqueeze(1),
        positions,
        scales.unsqueeze(1),
        bits=bits,
        sparse24=layout == "2:4",
        group_size=group_size if scales.shape[2] > 1 else None,
    )
    _decode.launch(x, out, plan, packed, config, interpret=interpret)


def _launch(
    x: torch.Tensor,
    out: torch.Tensor,
    config: DeltaZipKernelConfig | _decode.DecodeConfig,
    *,
    deltas: _Deltas,
    plan: BitDeltaPlan,
    interpret: bool,
) -> None:
    """The kernel ``config`` names: the split-K decode kernel or the tile kernel."""
    if isinstance(config, _decode.DecodeConfig):
        _launch_decode(x, out, deltas, plan, config, interpret)
        return
    if config.block_m != plan.block_m:
        config = dataclasses.replace(config, block_m=plan.block_m)
    _launch_triton(x, out, deltas, plan, config, interpret)


# ===================================================================================================
# Public launcher
# ===================================================================================================


def deltazip_matmul(
    x: torch.Tensor,
    out: torch.Tensor,
    slots: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int,
    layout: str,
    group_size: int | None = None,
    positions: torch.Tensor | None = None,
    backend: Backend = "auto",
    plan: BitDeltaPlan | None = None,
    config: DeltaZipKernelConfig | _decode.DecodeConfig | None = None,
) -> torch.Tensor:
    """Add each row's low-bit DeltaZip product into ``out`` in place (mixed batch: one delta per row).

    See the module docstring for the exact semantics and for which formats run on Triton. Rows with slot
    ``-1`` are left untouched.

    Args:
        x: Activations ``[M, K]``, float16, bfloat16 or float32, contiguous.
        out: ``[M, N]``, same dtype and device as ``x``, rows contiguous; updated in place.
        slots: int32/int64 ``[M]``: index of each row's delta in the stacked tensors, ``-1`` for none.
        qweight: uint8 ``[D, N, packed(V)]``: ``DeltaZipWeight.qweight`` of ``D`` deltas stacked (``V = K`` for
            ``"dense"``, ``K / 2`` kept values for ``"2:4"``), last dim contiguous.
        scales: float16/bfloat16/float32 ``[D, N, 1]`` (per output channel) or ``[D, N, ceil(K / group_size)]``,
            any strides (``DeltaZipWeight.scales`` stacked; fp16 is read as is).
        bits: Bits per stored value: 2, 4 or 8 (Triton or reference), 3 (reference only).
        layout: ``"dense"`` or ``"2:4"``.
        group_size: Input columns per scale when ``scales`` has more than one column.
        positions: uint8 ``[D, N, ceil(K / 8)]``, the 2:4 metadata (``DeltaZipWeight.mask`` stacked); ``"2:4"``
            only.
        backend: ``"auto"``: Triton for CUDA tensors (reference for 3-bit), the PyTorch reference for CPU
            tensors. ``"triton"``: force the kernel (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``).
            ``"torch"``: force the reference.
        plan: A :func:`~hf_delta.kernels.plan_bitdelta_batch` result for exactly these ``slots`` and ``D``
            (the same plan serves the 1-bit kernel); skips the per-call plan and its host sync. Its
            ``block_m`` overrides ``config.block_m``.
        config: Kernel tile sizes: a ``DeltaZipKernelConfig`` runs the tile kernel, a ``DecodeConfig`` the
            split-K decode kernel. Default: by batch size, dtype, layout and group size, autotuned on CUDA
            for decode batches and cached per (shape, format, M bucket, D); call
            :func:`~hf_delta.kernels.warmup` before timing anything.

    Returns:
        ``out``.

    Raises:
        TypeError: A dtype is wrong (x/out not fp16/bf16/fp32 or not equal, slots not int, qweight or
            positions not uint8, scales not floating) or an argument is not a tensor.
        ValueError: Shapes disagree with ``bits`` / ``layout`` / ``group_size``, tensors sit on different
            devices, ``x`` is not contiguous, a slot is outside ``[-1, D)``, ``plan`` does not match, or the
            requested backend cannot run this format here.
        ImportError: The Triton backend is needed but triton is not installed.

    Example:
        >>> import torch
        >>> from hf_delta.packing import pack_lowbit_u8
        >>> q = torch.randint(-8, 8, (2, 4, 10))                   # 2 deltas, N=4, K=10, 4-bit
        >>> qweight, scales = pack_lowbit_u8(q, 4), torch.full((2, 4, 1), 0.01, dtype=torch.float16)
        >>> x, out = torch.randn(3, 10), torch.zeros(3, 4)
        >>> deltazip_matmul(x, out, torch.tensor([1, -1, 0]), qweight, scales, bits=4, layout="dense").shape
        torch.Size([3, 4])
    """
    _common.check_backend_name(backend, op=_OP)
    deltas = _Deltas(qweight, scales, positions, bits, layout, group_size)
    _check_inputs(x, out, slots, deltas)
    num_deltas = qweight.shape[0]
    _common.check_plan_matches(plan, x.shape[0], num_deltas, op=_OP)

    use_triton, interpret = _choose_backend(backend, x.device, bits)
    if not use_triton:
        has_rows = _common.reference_has_rows(slots, num_deltas, plan, op=_OP)
        return _reference(x, out, slots, deltas) if has_rows else out

    m, n = x.shape[0], out.shape[1]
    empty = m == 0 or n == 0 or num_deltas == 0 or x.shape[1] == 0
    block_m = config.block_m if isinstance(config, DeltaZipKernelConfig) else None
    plan = _common.launch_plan(slots, num_deltas, plan, block_m, device=x.device, empty=empty, op=_OP)
    if plan is not None:
        if config is None:
            group = group_size if scales.shape[2] > 1 else None
            tiles = plan.tile_slot.numel()
            tile = _default_config(plan.block_m, n, tiles, x.dtype, layout, group, x.device, interpret)
            key = (_OP, x.dtype, n, x.shape[1], bits, layout, group)
            launch = functools.partial(_launch, x, deltas=deltas, plan=plan, interpret=interpret)
            config = _tuning.choose_for_call(key, tile, x, out, plan, launch, interpret=interpret)
        _launch(x, out, config, deltas=deltas, plan=plan, interpret=interpret)
    return out


def _choose_backend(backend: Backend, device: torch.device, bits: int) -> tuple[bool, bool]:
    """``(use_triton, interpreter_mode)`` for a call on ``device``; 3-bit deltas always take the reference."""
    if bits not in _KERNEL_BITS:
        if backend == "triton":
            raise ValueError(
                f"{_OP}(backend='triton') supports bits {_KERNEL_BITS}, got {bits}; 3-bit deltas run on "
                "the reference: use backend='auto' or 'torch'."
            )
        return False, False
    return _common.choose_backend(backend, device, op=_OP, stacklevel=4)

"""What every mixed-batch delta kernel shares: input checks, the row-grouping plan, backend choice, launch helpers.

A kernel module (``bitdelta.py``, ``deltazip.py``) keeps only what is specific to its delta format: the
PyTorch reference, the checks of its packed tensors, the ``@triton.jit`` kernel, its tile choice and its
public op. Everything here is format-free: it sees activations ``x [M, K]``, an output ``out [M, N]``, the
per-row delta index ``slots [M]`` and ``D``, the number of stacked deltas.

Private to ``hf_delta.kernels``; ``BitDeltaPlan`` and ``plan_bitdelta_batch`` are public through
``hf_delta.kernels`` (and ``hf_delta.kernels.bitdelta``), whose name they keep: the 1-bit kernel had the plan
first, and one plan per forward pass serves every kernel.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

try:  # Triton is optional: CPU-only installs use the reference path and never need it.
    import triton
    import triton.language as tl
except ImportError:  # tested by hiding triton from the import system
    triton = None
    tl = None

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SLOT_DTYPES = (torch.int32, torch.int64)
Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")


# ===================================================================================================
# Environment: interpreter switch, device properties
# ===================================================================================================


def interpret_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (how kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (the current device for a bare ``"cuda"``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


# ===================================================================================================
# Validation of the batch (x, out, slots); each kernel checks its own packed tensors in between
# ===================================================================================================


def check_batch_dtypes(op: str, x: object, out: object, slots: object, weights: Sequence[tuple[str, object]]) -> None:
    """Every argument is a tensor; ``x`` is fp16/bf16/fp32, ``out`` the same dtype, ``slots`` int32/int64."""
    for name, t in (("x", x), ("out", out), ("slots", slots), *weights):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}.")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}.")
    if out.dtype != x.dtype:
        raise TypeError(f"{op}: out dtype {out.dtype} must equal x dtype {x.dtype}.")
    if slots.dtype not in SLOT_DTYPES:
        raise TypeError(f"{op}: slots must be int32 or int64, got {slots.dtype}.")


def check_batch_shapes(
    op: str, x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, weights: Sequence[tuple[str, torch.Tensor]]
) -> tuple[int, int, int]:
    """All tensors on one device, ``x [M, K]``, ``out [M, N]``, ``slots [M]``; returns ``(M, K, N)``."""
    named = [("x", x), ("out", out), ("slots", slots), *weights]
    if len({t.device for _, t in named}) != 1:
        where = ", ".join(f"{name}={t.device}" for name, t in named)
        raise ValueError(f"{op}: all tensors must be on one device, got {where}.")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K] (flatten tokens), got {tuple(x.shape)}.")
    m, k = x.shape
    if out.dim() != 2 or out.shape[0] != m:
        raise ValueError(f"{op}: out must be [M={m}, N], got shape {tuple(out.shape)}.")
    if slots.shape != (m,):
        raise ValueError(f"{op}: slots must be [M={m}], got shape {tuple(slots.shape)}.")
    return m, k, out.shape[1]


def check_batch_strides(
    op: str, x: torch.Tensor, out: torch.Tensor, packed: Sequence[tuple[str, torch.Tensor | None]]
) -> None:
    """``x`` contiguous, ``out``'s rows contiguous, and the last dim of each packed tensor (``None``: absent)."""
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous; call x.contiguous() first.")
    if out.stride(1) != 1 and out.shape[1] > 1:
        raise ValueError(f"{op}: out rows must be contiguous (stride(1) 1), got {out.stride()}.")
    for name, t in packed:
        if t is not None and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{op}: {name}' last dim must be contiguous, got strides {t.stride()}.")


def check_slot_range(slots: torch.Tensor, num_deltas: int, *, op: str) -> bool:
    """Raise unless every slot is in ``[-1, num_deltas)``; return whether any row has a delta.

    This is the launcher's only host synchronisation (one small copy for both bounds).
    """
    if slots.numel() == 0:
        return False
    lo, hi = torch.stack([slots.min(), slots.max()]).tolist()
    if lo < -1 or hi >= num_deltas:
        raise ValueError(
            f"{op}: slots must lie in [-1, {num_deltas}) (-1 = no delta, else an index into the "
            f"{num_deltas} stacked deltas), got values in [{lo}, {hi}]."
        )
    return hi >= 0


def _count_rows_per_delta(
    slots: torch.Tensor, key: torch.Tensor, num_deltas: int, *, op: str
) -> tuple[torch.Tensor, int]:
    """Rows per delta ``[num_deltas]`` and how many deltas have rows; checks the slots in the same one sync.

    ``key``: the slots with ``-1`` mapped to ``num_deltas`` (out-of-range values are clamped only for
    counting, and then refused as :func:`check_slot_range` refuses them).
    """
    counts = torch.zeros(num_deltas + 1, dtype=torch.int64, device=slots.device)
    if slots.numel() == 0:
        return counts[:num_deltas], 0
    counts.scatter_add_(0, key.clamp(0, num_deltas), torch.ones_like(key))
    counts = counts[:num_deltas]
    lo, hi, used = torch.stack([slots.min(), slots.max(), (counts > 0).sum()]).tolist()
    if lo < -1 or hi >= num_deltas:
        check_slot_range(slots, num_deltas, op=op)  # raises, with the message every path gives
    return counts, used


def rows_by_delta(slots: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(delta, row indices)`` for every delta some row uses (the PyTorch references loop over these)."""
    slots = slots.long()
    for d in torch.unique(slots).tolist():
        if d >= 0:
            yield d, (slots == d).nonzero().squeeze(1)


def add_into_rows(out: torch.Tensor, idx: torch.Tensor, acc: torch.Tensor) -> None:
    """``out[idx] = (out[idx] + acc)`` with fp32 ``acc``: one rounding per element, as in the kernels."""
    out.index_copy_(0, idx, (out.index_select(0, idx).float() + acc).to(out.dtype))


# ===================================================================================================
# Batch plan: rows grouped by delta, cut into tiles
# ===================================================================================================


@dataclass(frozen=True)
class BitDeltaPlan:
    """Rows of one batch grouped by delta and cut into tiles; build once per forward pass, reuse per layer.

    ``tile_*`` have a fixed length (an upper bound on the number of tiles, so building needs no host
    sync); unused tiles carry slot ``-1`` and the kernel skips them. One plan serves every kernel of
    ``hf_delta.kernels`` (the 1-bit one gave it its name).
    """

    rows: torch.Tensor  # int32 [M]: row indices sorted by slot, rows without a delta last
    tile_slot: torch.Tensor  # int32 [T]: delta of each tile, -1 = unused
    tile_start: torch.Tensor  # int32 [T]: first position in `rows`
    tile_end: torch.Tensor  # int32 [T]: one past the last position
    block_m: int
    num_rows: int
    num_deltas: int
    any_rows: bool  # False when every slot is -1: nothing to launch
    num_used: int = 0  # distinct deltas the rows use (the decode kernels' split and config choice read it)


def default_block_m(m: int) -> int:
    # Decode: few rows per delta, and 16 is tl.dot's minimum. Prefill: taller tiles re-read the bits less
    # and keep the tensor cores busy, but too tall wastes them when many deltas split the batch.
    return 16 if m <= 64 else 64 if m <= 1024 else 128


def plan_bitdelta_batch(slots: torch.Tensor, num_deltas: int, *, block_m: int | None = None) -> BitDeltaPlan:
    """Group the rows of a batch by delta for :func:`bitdelta_matmul` (the same plan serves ``deltazip_matmul``).

    Args:
        slots: int32/int64 ``[M]``: delta index per row, ``-1`` for none.
        num_deltas: ``D``, the number of stacked deltas the slots index into.
        block_m: Rows per tile; default picks from ``M`` (16 for decode-sized batches).

    Returns:
        A :class:`BitDeltaPlan` on ``slots``' device.

    Raises:
        TypeError: ``slots`` is not an int32/int64 tensor.
        ValueError: ``slots`` is not 1-D or holds a value outside ``[-1, num_deltas)``.
    """
    return build_plan(slots, num_deltas, block_m=block_m, op="bitdelta_matmul")


def build_plan(slots: torch.Tensor, num_deltas: int, *, block_m: int | None, op: str) -> BitDeltaPlan:
    """:func:`plan_bitdelta_batch`, with a slot-range error worded for the op ``op`` that needs the plan."""
    if not isinstance(slots, torch.Tensor) or slots.dtype not in SLOT_DTYPES:
        raise TypeError(f"plan_bitdelta_batch: slots must be an int32/int64 tensor, got {slots!r:.80}.")
    if slots.dim() != 1:
        raise ValueError(f"plan_bitdelta_batch: slots must be 1-D [M], got shape {tuple(slots.shape)}.")
    m = slots.shape[0]
    key = torch.where(slots < 0, num_deltas, slots.long())  # no-delta rows sort after every delta
    counts, num_used = _count_rows_per_delta(slots, key, num_deltas, op=op)
    block_m = block_m or default_block_m(m)
    dev = slots.device
    rows = torch.sort(key, stable=True).indices.to(torch.int32)
    seg_start = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    tiles_cum = torch.cumsum(tiles, 0)
    # Each non-empty segment wastes at most one partial tile, so this bounds the tile count without a sync.
    t_max = max(1, -(-m // block_m) + min(num_deltas, m))
    t = torch.arange(t_max, device=dev)
    owner = torch.searchsorted(tiles_cum, t, right=True)  # first delta whose tiles end after t
    used = owner < num_deltas
    d = owner.clamp(max=max(num_deltas - 1, 0))
    if num_deltas == 0:
        start = end = torch.zeros_like(t)
    else:
        start = seg_start[d] + (t - (tiles_cum[d] - tiles[d])) * block_m
        end = torch.minimum(start + block_m, seg_start[d] + counts[d])
    zero = torch.zeros_like(t)
    return BitDeltaPlan(
        rows=rows,
        tile_slot=torch.where(used, d, -1).to(torch.int32),
        tile_start=torch.where(used, start, zero).to(torch.int32),
        tile_end=torch.where(used, end, zero).to(torch.int32),
        block_m=block_m,
        num_rows=m,
        num_deltas=num_deltas,
        any_rows=num_used > 0,
        num_used=num_used,
    )


# ===================================================================================================
# Public-op flow: backend choice, plan checks, when there is nothing to launch
# ===================================================================================================


def check_backend_name(backend: object, *, op: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"{op}: backend must be 'auto', 'triton' or 'torch', got {backend!r}.")


def check_plan_matches(plan: BitDeltaPlan | None, num_rows: int, num_deltas: int, *, op: str) -> None:
    """A caller's plan must have been built for this batch size and this number of deltas."""
    if plan is not None and (plan.num_rows != num_rows or plan.num_deltas != num_deltas):
        raise ValueError(
            f"{op}: plan was built for M={plan.num_rows}, D={plan.num_deltas}, but the call has "
            f"M={num_rows}, D={num_deltas}; build it from these slots with plan_bitdelta_batch."
        )


def choose_backend(backend: Backend, device: torch.device, *, op: str, stacklevel: int) -> tuple[bool, bool]:
    """``(use_triton, interpreter_mode)`` for a call of ``op`` on ``device``.

    ``stacklevel`` (as in :func:`warnings.warn`, counted from here) points the missing-triton warning at
    the caller of the public op.
    """
    if backend == "torch":
        return False, False
    interpret = interpret_enabled()
    if backend == "auto":
        if device.type != "cuda":
            return False, False
        if triton is None:
            warnings.warn(
                f"{op}: triton is not installed, using the slow PyTorch reference on CUDA; "
                "`pip install hf_delta[kernels]` for the fused kernel.",
                stacklevel=stacklevel,
            )
            return False, False
        return True, interpret
    # backend == "triton"
    if triton is None:
        raise ImportError(f"{op}(backend='triton') needs triton: `pip install hf_delta[kernels]`.")
    if device.type == "cuda":
        return True, interpret
    if device.type == "cpu" and interpret:
        return True, True
    raise ValueError(
        f"{op}(backend='triton') needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; "
        f"got tensors on {device}. Use backend='auto' or 'torch' here."
    )


def reference_has_rows(slots: torch.Tensor, num_deltas: int, plan: BitDeltaPlan | None, *, op: str) -> bool:
    """Before the reference path: check the slots (a plan checked them when built); False if no row has a delta."""
    if plan is None:
        check_slot_range(slots, num_deltas, op=op)
        return True
    return plan.any_rows


def launch_plan(
    slots: torch.Tensor,
    num_deltas: int,
    plan: BitDeltaPlan | None,
    block_m: int | None,
    *,
    device: torch.device,
    empty: bool,
    op: str,
) -> BitDeltaPlan | None:
    """The plan a Triton launch uses (the caller's, or one built now), or ``None`` if nothing needs launching.

    ``empty``: the call has no work whatever the slots (a dimension of size 0, no deltas); the slots are
    still range-checked, so a bad call fails alike on every path. ``block_m``: tile height for a plan built
    here (``None``: by batch size).
    """
    if empty:
        check_slot_range(slots, num_deltas, op=op)
        return None
    if plan is None:
        plan = build_plan(slots, num_deltas, block_m=block_m, op=op)
    elif plan.rows.device != device:
        raise ValueError(f"{op}: plan is on {plan.rows.device}, tensors on {device}.")
    return plan if plan.any_rows else None


# ===================================================================================================
# Launch helpers: tile configs, grid, JIT on first use
# ===================================================================================================


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of a Triton kernel (powers of two; ``tl.dot`` needs each >= 16 on GPUs).

    ``block_m`` rows of one delta × ``block_n`` outputs per program, ``block_k`` inputs per loop step.
    Each kernel subclasses it with its own defaults.
    """

    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{type(self).__name__}.{name} must be a power of two >= 16, got {v}.")


def fill_block_n(n: int, num_tiles: int, sms: int, *, widest: int) -> int:
    """Widest power-of-two ``block_n`` (from ``widest`` down to 32) whose grid still covers the SMs twice.

    Wide N tiles amortise the activation tile; a batch with few deltas has few row tiles, so it needs
    narrower N tiles to keep every SM busy.
    """
    block_n = widest
    while block_n > 32 and num_tiles * -(-n // block_n) < 2 * sms:
        block_n //= 2
    return block_n


def dot_constexprs(dtype: torch.dtype, interpret: bool, *, exact: bool = False) -> dict[str, object]:
    """``DOT_FP32`` and ``DOT_PRECISION`` of a kernel's ``tl.dot`` (``exact``: its fp32 operands must stay fp32)."""
    return {
        # Interpreter + bf16 only (its bf16 dot is wrong): bf16 -> fp32 is exact, so products and fp32
        # accumulation match the GPU's bf16 tensor-core dot.
        "DOT_FP32": interpret and dtype == torch.bfloat16,
        # fp32 operands must not be rounded to TF32 (1e-3 error); the setting only affects fp32 operands.
        "DOT_PRECISION": "ieee" if dtype == torch.float32 or exact else "tf32",
    }


def launch_over_tiles(
    kernel: object,
    plan: BitDeltaPlan,
    config: KernelConfig,
    x: torch.Tensor,
    out: torch.Tensor,
    *args: object,
    **constexprs: object,
) -> None:
    """Launch a jitted ``kernel`` with one program per row tile of ``plan`` × ``config.block_n`` outputs.

    Every kernel takes ``x, out, rows, tile_slot, tile_start, tile_end`` first, then its own ``args``.
    """
    grid = (plan.tile_slot.numel(), triton.cdiv(out.shape[1], config.block_n))
    kernel[grid](
        x,
        out,
        plan.rows,
        plan.tile_slot,
        plan.tile_start,
        plan.tile_end,
        *args,
        **constexprs,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def jit_on_first_use(kernel: Callable) -> Callable[[bool], object]:
    """``jitted(interpret)``: ``triton.jit(kernel)``, decorated on first use and cached per interpreter mode.

    Not at import: triton.jit picks interpreter vs. compiler from TRITON_INTERPRET at decoration time, and
    tests set that variable after a kernel module may already have been imported.
    """

    @functools.cache
    def jitted(interpret: bool):
        del interpret  # only the cache key; triton.jit reads the environment itself
        return triton.jit(kernel)

    return jitted

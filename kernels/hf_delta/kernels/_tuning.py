"""Which kernel configuration a call runs: chosen once per (format, shape, M bucket, deltas), then cached.

On CUDA (compiled Triton, ``HF_DELTA_AUTOTUNE`` not ``0``) the first call with a new key times every
candidate on a scratch copy of ``out`` and keeps the fastest; elsewhere (the interpreter, tuning off) it
keeps the first candidate, the heuristic's pick. Either way later calls with the key are a dictionary
lookup. Timing compiles each candidate, so serving code and benchmarks call :func:`warmup` with their
batch sizes before anything is timed or captured in a CUDA graph.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Iterable, Sequence

import torch

from . import _decode
from ._common import BitDeltaPlan, triton

logger = logging.getLogger(__name__)

# key -> chosen config. Keys hold every argument the choice depends on, so one process may mix shapes.
_CHOSEN: dict[tuple, object] = {}
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
_TIMED_REPS = 10


def m_bucket(m: int) -> int:
    """Batch sizes share a choice within powers of two (1, 2, 3-4, 5-8, ...)."""
    return 1 << max(m - 1, 0).bit_length()


def autotune_enabled(device: torch.device, interpret: bool) -> bool:
    """Timing candidates needs compiled kernels on a GPU, outside CUDA-graph capture (where it cannot
    synchronise); ``HF_DELTA_AUTOTUNE=0`` turns it off."""
    off = os.environ.get("HF_DELTA_AUTOTUNE", "1").strip().lower() in ("0", "false", "no", "off")
    if device.type != "cuda" or interpret or off:
        return False
    return not torch.cuda.is_current_stream_capturing()


def chosen_configs() -> dict[tuple, object]:
    """A copy of the configs chosen so far, by key (what benchmarks report beside their timings)."""
    return dict(_CHOSEN)


def choose(key: tuple, candidates: Sequence[object], run: Callable[[object], None], *, tune: bool) -> object:
    """The cached config for ``key``: the fastest of ``candidates`` under ``run(config)`` if ``tune``, else the
    first. ``run`` must leave the caller's tensors alone (it writes a scratch output)."""
    config = _CHOSEN.get(key)
    if config is None:
        config = _fastest(candidates, run) if tune and len(candidates) > 1 else candidates[0]
        _CHOSEN[key] = config
        logger.debug("kernel config for %s: %s", key, config)
    return config


def choose_for_call(
    key: tuple,
    tile_default: object,
    x: torch.Tensor,
    out: torch.Tensor,
    plan: BitDeltaPlan,
    launch: Callable[[torch.Tensor, object], None],
    *,
    interpret: bool,
) -> object:
    """A call's config when the caller gave none. Prefill (``plan.block_m`` > 16): ``tile_default``. Decode:
    the split-K kernel's candidates and ``tile_default``, timed once per ``key`` + (M bucket, bucket of the
    deltas the rows use, device) on CUDA; untuned, the split-K kernel for up to 4 rows per used delta, else
    ``tile_default``.

    ``launch(out, config)`` runs the op's kernel with ``config`` into ``out`` (here: a scratch copy).
    """
    if plan.block_m > 16:
        return tile_default
    m, used = plan.num_rows, max(plan.num_used, 1)
    rows = -(-m // used)  # rows per used delta, on average
    decode = _decode.candidates(rows, interpret)
    scratch = []

    def run(config: object) -> None:
        if not scratch:  # timing writes a copy: the caller's out is updated once, by the chosen config
            scratch.append(out.clone())
        launch(scratch[0], config)

    ordered = [*decode, tile_default] if rows <= 4 else [tile_default, *decode]
    full_key = (*key, m_bucket(m), m_bucket(used), x.device)
    return choose(full_key, ordered, run, tune=autotune_enabled(x.device, interpret))


def _fastest(candidates: Sequence[object], run: Callable[[object], None]) -> object:
    out_of_resources = getattr(getattr(triton, "runtime", None), "errors", None)
    out_of_resources = getattr(out_of_resources, "OutOfResources", ())
    best, best_ms = candidates[0], float("inf")
    for config in candidates:
        try:
            run(config)  # compiles; not timed
        except out_of_resources:  # too many registers / too much shared memory on this GPU: not a candidate
            continue
        torch.cuda.synchronize()
        samples = []
        for _ in range(_TIMED_REPS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(config)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        ms = statistics.median(samples)
        if ms < best_ms:
            best, best_ms = config, ms
    return best


def warmup(
    op: Callable[..., torch.Tensor],
    *weights: torch.Tensor,
    in_features: int,
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    deltas_in_use: Iterable[int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    **op_kwargs: object,
) -> int:
    """Compile (and on CUDA autotune) ``op`` for every batch size a server will run, before any timing.

    Calls ``op(x, out, slots, *weights, **op_kwargs)`` once per size on random activations with rows spread
    over as many deltas as there are rows (each row its own delta, up to the stack's size), writing a scratch
    output. Configurations are chosen per M bucket and bucket of deltas in use, so pass ``deltas_in_use`` to
    also prepare batches whose rows share deltas.

    Args:
        op: :func:`~hf_delta.kernels.bitdelta_matmul` or :func:`~hf_delta.kernels.deltazip_matmul`.
        *weights: The stacked packed tensors the real calls pass after ``slots``.
        in_features: ``K``.
        batch_sizes: Batch sizes (rows per step) to prepare.
        deltas_in_use: Numbers of distinct deltas per batch to prepare (each at most the batch size and the
            stack's size); default: one per row.
        dtype: Activation dtype of the real calls.
        **op_kwargs: The other keyword arguments of the real calls (``bits``, ``layout``, ``backend``, ...).

    Returns:
        The number of calls made.

    Example:
        >>> import torch
        >>> from hf_delta.kernels import bitdelta_matmul, warmup
        >>> signs, scales = torch.zeros(2, 1, 4, 2, dtype=torch.uint8), torch.ones(2, 1, 4)
        >>> warmup(bitdelta_matmul, signs, scales, in_features=16, batch_sizes=(1, 4), dtype=torch.float32)
        2
    """
    device, num_deltas, n = weights[0].device, weights[0].shape[0], weights[0].shape[-2]
    calls = 0
    for m in batch_sizes:
        x = torch.randn(m, in_features, device=device).to(dtype)
        out = torch.zeros(m, n, device=device, dtype=dtype)
        for used in sorted({max(1, min(u, m, num_deltas)) for u in (deltas_in_use or (m,))}):
            slots = torch.arange(m, device=device, dtype=torch.int32) % used
            op(x, out, slots, *weights, **op_kwargs)
            calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return calls

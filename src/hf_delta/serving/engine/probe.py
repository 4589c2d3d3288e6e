"""The engine's start-up probe: can this model run through the packed step, and what must its KV cache hold?

``probe_model`` runs a short token sequence through the engine's own path and compares each pass's logits with
the model's plain forward (``DeltaModel`` with ``"__base__"``, in the model's own attention implementation):

1. one uncached segment (it attends within itself), recording what every decoder layer's attention call
   received: key/value heads, head size, dtype, sliding window, soft-capping;
2. through a small paged cache sized from that record: a prefill in two chunks, then two decodes; the sequence
   is longer than the shortest sliding window when that window is short enough to probe cheaply.

The model is refused (``EngineConfigError`` naming the feature) when a pass fails, when a decoder layer never
calls transformers' attention interface or calls it more than once, when layers disagree on their key/value
shape, or when the logits differ. Semantics of the check, for each pass ``p`` over positions ``..i``::

    |engine_logits(p)[i] - forward(ids)[i]|_max <= tol · max(1, |forward(ids)[i]|_max)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ...errors import EngineConfigError
from ...model import BASE_NAME
from .kv_cache import PagedKVCache
from .step import AttentionPlan, LayerAttention, Segment, StepBatch, forward_step

logger = logging.getLogger(__name__)

_FIRST = 8  # tokens of the uncached pass (and the shortest cached sequence)
_LONGEST = 64  # the cached pass covers a sliding window only when it is at most this long
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}  # relative to the logits' scale; 16-bit types: 5e-2
_WHAT_TO_DO = "Run it with DeltaModel.generate instead (no continuous batching), or serve another architecture."

# Config settings that explain a refusal when the comparison fails; the check itself is the comparison.
_SUSPECTS = (
    (
        lambda c: getattr(c, "alibi", False) or getattr(c, "position_embedding_type", None) == "alibi",
        "ALiBi position bias (transformers adds it to the attention mask, which the paged attention does not use)",
    ),
    (lambda c: getattr(c, "use_bidirectional_attention", False), "bidirectional attention"),
    (lambda c: getattr(c, "attention_chunk_size", None), "chunked attention (attention_chunk_size)"),
)


@dataclass(frozen=True)
class AttentionLayout:
    """What the probe saw: the KV cache's shape and dtype, and each decoder layer's sliding window."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    sliding_windows: tuple[int | None, ...]


def probe_model(model) -> AttentionLayout:
    """Check that ``model`` (a ``DeltaModel``) runs correctly through the engine's packed step; see the module
    docstring.

    Raises:
        EngineConfigError: the model cannot be served; the message names the failing feature or layers.
    """
    base = model.base_model
    config = base.config.get_text_config()
    name = type(base).__name__
    unknown = sorted(set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"})
    if unknown:  # before any forward: the model's own mask code may not even run under the engine's attention
        raise EngineConfigError(
            f"{name} cannot be served by the engine: its config.layer_types include {unknown}, and the paged "
            f"attention implements full and sliding-window attention only. {_WHAT_TO_DO}"
        )
    vocab = config.vocab_size
    limit = getattr(config, "max_position_embeddings", None) or _LONGEST
    ids = torch.randint(vocab, (min(_LONGEST, limit),), generator=torch.Generator().manual_seed(0)).tolist()
    first = min(_FIRST, len(ids))

    record: dict[int, LayerAttention] = {}
    batch = StepBatch.pack([Segment("probe", 0, first, cached=False)], [ids[:first]], device=model.device)
    plan = AttentionPlan(batch, None)
    plan.record = record
    uncached = _run(name, config, lambda: forward_step(model, batch, None, plan=plan).logits[0])
    layout = _layout(name, config, record)

    windows = [w for w in layout.sliding_windows if w is not None]
    length = first if not windows or min(windows) + 4 > len(ids) else max(first, min(windows) + 4)
    with torch.inference_mode():
        reference = model(
            input_ids=torch.tensor([ids[:length]], device=model.device), use_cache=False, delta_names=[BASE_NAME]
        ).logits[0]
    _compare(name, config, "one uncached segment", uncached, reference[first - 1], layout.dtype)

    cache = PagedKVCache(
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        max_tokens=length,
        block_size=4,
        dtype=layout.dtype,
        device=model.device,
    )
    cache.reserve("probe", length)
    half = (length - 2) // 2
    for start, size in ((0, half), (half, length - 2 - half), (length - 2, 1), (length - 1, 1)):
        step = StepBatch.pack([Segment("probe", start, size)], [ids[start : start + size]], device=model.device)
        logits = _run(name, config, lambda step=step: forward_step(model, step, cache).logits[0])
        what = f"{'decode' if size == 1 else 'prefill chunk'} at positions {start}..{start + size - 1} of {length}"
        _compare(name, config, what, logits, reference[start + size - 1], layout.dtype)
    logger.info(
        "%s passed the engine's start-up probe (%d tokens, windows %s)", name, length, sorted(set(windows)) or "none"
    )
    return layout


def _run(name: str, config, fn):
    try:
        with torch.inference_mode():
            return fn()
    except EngineConfigError:
        raise
    except Exception as err:
        raise EngineConfigError(
            f"{name} cannot be served by the engine: a forward pass through its paged attention "
            f"failed ({type(err).__name__}: {err}){_suspect(config)}. {_WHAT_TO_DO}"
        ) from err


def _layout(name: str, config, record: dict[int, LayerAttention]) -> AttentionLayout:
    expected = getattr(config, "num_hidden_layers", None) or len(record)
    missing = sorted(set(range(expected)) - set(record))
    if missing:
        raise EngineConfigError(
            f"{name} cannot be served by the engine: decoder layers {missing} of {expected} never called "
            "transformers' attention interface, so the engine's paged KV cache cannot run them (layers without "
            "softmax attention, such as state-space or linear-attention layers, or attention that does not follow "
            f"config._attn_implementation){_suspect(config)}. {_WHAT_TO_DO}"
        )
    repeated = sorted(layer for layer, seen in record.items() if seen.calls != 1)
    if repeated or set(record) != set(range(expected)):
        raise EngineConfigError(
            f"{name} cannot be served by the engine: attention layer indices {sorted(record)} do not map one to one "
            f"onto its {expected} decoder layers (repeated: {repeated}; shared or cross-layer attention). "
            f"{_WHAT_TO_DO}"
        )
    shapes = {(seen.num_kv_heads, seen.head_dim, seen.dtype) for seen in record.values()}
    if len(shapes) != 1:
        raise EngineConfigError(
            f"{name} cannot be served by the engine: its layers' keys and values differ in shape or dtype "
            f"({sorted(map(str, shapes))}), and the paged KV cache holds one shape for all layers. {_WHAT_TO_DO}"
        )
    kinds = list(getattr(config, "layer_types", None) or [])
    unwindowed = [
        i
        for i, kind in enumerate(kinds)
        if kind == "sliding_attention" and i in record and record[i].sliding_window is None
    ]
    if unwindowed:
        raise EngineConfigError(
            f"{name} cannot be served by the engine: layers {unwindowed} are sliding-window layers "
            "(config.layer_types) but their attention call receives no sliding_window, so the engine cannot apply "
            f"the window. {_WHAT_TO_DO}"
        )
    ((heads, head_dim, dtype),) = shapes
    return AttentionLayout(
        expected, heads, head_dim, dtype, tuple(record[layer].sliding_window for layer in range(expected))
    )


def _compare(name: str, config, what: str, logits: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    width = min(logits.shape[-1], reference.shape[-1])
    reference = reference[:width].float()
    error = (logits[:width].float() - reference).abs().max().item()
    allowed = _TOLERANCE.get(dtype, 5e-2) * max(1.0, reference.abs().max().item())
    if not error <= allowed:  # also catches NaN
        raise EngineConfigError(
            f"{name} cannot be served by the engine: its logits through the paged attention ({what}) differ from "
            f"its own forward by {error:.3g} (allowed {allowed:.3g}){_suspect(config)}. {_WHAT_TO_DO}"
        )


def _suspect(config) -> str:
    found = [feature for applies, feature in _SUSPECTS if applies(config)]
    return f"; the likely cause: {', '.join(found)}" if found else ""

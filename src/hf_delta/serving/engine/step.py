"""One engine step: a single forward pass over a packed set of tokens from many sequences and many deltas.

A ``StepBatch`` is the whole contract between the scheduler and the model:

* ``input_ids``, ``positions``, ``slots``: one entry per token (``[N]``), tokens of all sequences packed
  one after the other; ``slots[i]`` is the delta slot of token ``i`` (``-1`` = base), read by every
  delta-aware layer through the model's ``DeltaRouting``;
* ``segments``: which consecutive tokens belong to one sequence, where they start (their positions), the
  KV handle they read and append to, and whether the logits of their last token (or of all of them, to
  score a prompt) are wanted.

Attention runs through a transformers attention function registered under ``"hf_delta_paged"``: the model
computes projections, rotary embeddings, MLPs and the output head as usual over ``[N, 1]`` tokens (one a row); the
attention itself is per segment, reading and writing the paged KV cache. Semantics, for each segment ``s``
with tokens ``a..b-1`` at positions ``p0..p0+(b-a)-1``::

    cache[s.key][p0 : p0+b-a] = k[a:b], v[a:b]                    (cached segments)
    out[a+i] = softmax(q[a+i] · cache[s.key][lo : p0+i+1]ᵀ) · V    (causal over the sequence so far)

where ``lo = 0``, or ``p0+i+1 - window`` in a layer with a sliding window (transformers passes each layer's
``sliding_window`` to the attention function: Mistral's every layer, Gemma 2/3's sliding layers). The cache
keeps every position of every layer; a window only masks.

A segment with ``cached=False`` attends only within itself and leaves the cache alone: that is where a later
co-serving feature adds fine-tuning tokens (a trainable LoRA's forward) to the same pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ...errors import EngineConfigError
from ...utils.logits import softcap_logits
from .kv_cache import PagedKVCache

ATTENTION_NAME = "hf_delta_paged"
_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class Segment:
    """Consecutive tokens of one sequence inside a ``StepBatch``."""

    key: str
    start: int
    length: int
    slot: int = -1
    cached: bool = True
    logits: bool = True
    all_logits: bool = False  # logits of every token (prompt log-probabilities), not only the last one's

    @property
    def num_logits(self) -> int:
        """Rows of the step's logits that belong to this segment."""
        return self.length if self.all_logits else int(self.logits)


@dataclass
class StepBatch:
    """The packed description of one forward pass (see the module docstring)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    segments: list[Segment]
    logits_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @classmethod
    def pack(cls, segments: Sequence[Segment], tokens: Sequence[Sequence[int]], *,
             device: torch.device | str = "cpu") -> StepBatch:
        """Pack ``tokens[i]`` (the new tokens of ``segments[i]``) into one batch."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        for seg, toks in zip(segments, tokens, strict=True):
            if len(toks) != seg.length or seg.length < 1:
                raise ValueError(f"Segment {seg.key!r} declares {seg.length} tokens but got {len(toks)}.")
            ids.extend(toks)
            pos.extend(range(seg.start, seg.start + seg.length))
            slots.extend([seg.slot] * seg.length)
            if seg.all_logits:
                last.extend(range(len(ids) - seg.length, len(ids)))
            elif seg.logits:
                last.append(len(ids) - 1)

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long).to(device)

        return cls(t(ids), t(pos), t(slots), list(segments), t(last))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class StepOutput:
    """Final hidden states of every token (``[N, hidden]``) and logits of the wanted ones (``[K, vocab]``, in
    segment order, ``Segment.num_logits`` rows each)."""

    hidden: torch.Tensor
    logits: torch.Tensor


class AttentionPlan:
    """Index tensors the attention function needs, computed once per step (not once per layer).

    Masks depend on a layer's sliding window, so they are built on first use per window and reused by every layer
    with the same one. ``record``, when a dict, collects what each layer's attention call received (the probe).
    """

    def __init__(self, batch: StepBatch, cache: PagedKVCache | None):
        self.cache = cache
        self.record: dict[int, LayerAttention] | None = None
        self.device = device = batch.input_ids.device
        write_tok: list[int] = []
        write_rows: list[int] = []
        decode_tok: list[int] = []
        decode_keys: list[str] = []
        decode_len: list[int] = []
        self.chunks: list[tuple[int, int, torch.Tensor, int]] = []  # tokens a..b, their cache rows, first position
        self.uncached: list[tuple[int, int]] = []
        offset = 0
        for seg in batch.segments:
            a, b = offset, offset + seg.length
            offset = b
            if not seg.cached:
                self.uncached.append((a, b))
                continue
            if cache is None:
                raise EngineConfigError("A cached segment needs a PagedKVCache.")
            write_tok.extend(range(a, b))
            write_rows.extend(cache.rows(seg.key, seg.start, seg.start + seg.length))
            if seg.length == 1:
                decode_tok.append(a)
                decode_keys.append(seg.key)
                decode_len.append(seg.start + 1)
                continue
            rows = torch.tensor(cache.rows(seg.key, 0, seg.start + seg.length), dtype=torch.long, device=device)
            self.chunks.append((a, b, rows, seg.start))
        self.all_cached = len(write_tok) == batch.num_tokens
        self.write_tokens = torch.tensor(write_tok, dtype=torch.long, device=device)
        self.write_rows = torch.tensor(write_rows, dtype=torch.long, device=device)
        self.decode_tokens = self.decode_rows = self.decode_lengths = None
        if decode_tok:
            self.decode_tokens = torch.tensor(decode_tok, dtype=torch.long, device=device)
            self.decode_rows = cache.rows_tensor(decode_keys, decode_len, device=device)
            self.decode_lengths = torch.tensor(decode_len, device=device)
        self._masks: dict[tuple, torch.Tensor | None] = {}

    @classmethod
    def decode_only(cls, cache: PagedKVCache, rows: torch.Tensor, lengths: torch.Tensor) -> AttentionPlan:
        """The plan of a step where token ``i`` decodes the sequence whose cache rows are ``rows[i]`` (``[R, L]``)
        and whose length with this token is ``lengths[i]``: it writes at ``rows[i, lengths[i] - 1]``.

        Built from tensors alone, without reading them: a captured step's plan whose values change between
        replays (``DecodeGraphs``).
        """
        plan = cls.__new__(cls)
        plan.cache, plan.record, plan.device = cache, None, rows.device
        plan.chunks, plan.uncached, plan.all_cached = [], [], True
        plan.decode_tokens = torch.arange(rows.shape[0], device=rows.device)
        plan.decode_rows, plan.decode_lengths = rows, lengths
        plan.write_tokens = plan.decode_tokens
        plan.write_rows = rows.gather(1, (lengths - 1)[:, None])[:, 0]
        plan._masks = {}
        return plan

    def _mask(self, key: tuple, q_pos: torch.Tensor, width: int, window: int | None, *, plain_causal: bool
              ) -> torch.Tensor | None:
        """``visible(q_pos, width, window)``, memoised under ``key``; ``None`` where plain causal attention (SDPA's
        ``is_causal``) is the same thing (``plain_causal``: the queries are keys ``0..Q-1`` themselves)."""
        if window is not None and window >= width:
            window = None  # a window longer than every sequence here changes nothing
        key = (*key, window)
        if key not in self._masks:
            self._masks[key] = None if plain_causal and window is None else visible(q_pos, width, window)
        return self._masks[key]

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """``[R, 1, 1, L]``: the keys each decoding token sees."""
        lengths = self.decode_lengths
        mask = self._mask(("decode",), lengths - 1, self.decode_rows.shape[1], window, plain_causal=False)
        return mask[:, None, None, :]

    def chunk_mask(self, index: int, window: int | None) -> torch.Tensor | None:
        """``[1, 1, Q, K]`` of the ``index``-th multi-token cached segment (``None``: plain causal)."""
        a, b, rows, start = self.chunks[index]
        q_pos = torch.arange(start, start + b - a, device=rows.device)
        mask = self._mask(("chunk", index), q_pos, rows.numel(), window, plain_causal=start == 0)
        return None if mask is None else mask[None, None]

    def uncached_mask(self, index: int, window: int | None) -> torch.Tensor | None:
        a, b = self.uncached[index]
        q_pos = torch.arange(b - a, device=self.device)
        mask = self._mask(("uncached", index), q_pos, b - a, window, plain_causal=True)
        return None if mask is None else mask[None, None]


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention call received: its key/value shape and dtype, window and soft-capping."""

    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    sliding_window: int | None
    softcap: float | None
    calls: int = 1


def visible(q_pos: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """``[Q, width]`` bool: key ``j`` is visible from the query at position ``q`` iff ``j <= q`` and, with a sliding
    window, ``q - j < window`` (transformers' ``sliding_window_overlay``: the query and ``window - 1`` keys before)."""
    k = torch.arange(width, device=q_pos.device)[None]
    q = q_pos[:, None]
    seen = k <= q
    return seen & (k > q - window) if window is not None else seen


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
          *, causal: bool = False, softcap: float | None = None) -> torch.Tensor:
    """``softmax(cap(q kᵀ · scale) + mask) v`` with grouped-query heads (q ``[B, H, Q, d]``, k/v ``[B, Hkv, L, d]``);
    ``cap(s) = tanh(s / softcap) · softcap`` when ``softcap`` is set, else the identity."""
    if softcap is not None:
        return _softcapped(q, k, v, mask, scale, causal=causal, softcap=softcap)
    if k.shape[1] != q.shape[1]:
        if _GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                                  enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal)


def _softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
                *, causal: bool, softcap: float) -> torch.Tensor:
    # SDPA cannot cap the scores (Gemma 2's attn_logit_softcapping), so they are computed here; softmax in float32
    # as transformers' eager attention does.
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if causal:
        mask = visible(torch.arange(q.shape[-2], device=q.device), k.shape[-2], None)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, softcap: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function over a packed step (``query``: ``[N, H, 1, d]``) → ``[N, 1, H, d]``.

    The step's ``AttentionPlan`` comes from ``packed_attention`` (a context variable, not a keyword argument:
    some models, e.g. Falcon, do not pass their forward's keyword arguments down to the layers). ``sliding_window``
    and ``softcap`` are the layer's own, as transformers passes them (Mistral: every layer; Gemma 2/3: the
    sliding layers only).
    """
    plan = _PLAN.get()
    if plan is None:
        raise EngineConfigError(f"The {ATTENTION_NAME!r} attention runs only inside an hf_delta engine step.")
    layer = module.layer_idx
    if plan.record is not None:
        seen = plan.record.get(layer)
        plan.record[layer] = LayerAttention(key.shape[1], key.shape[3], key.dtype, sliding_window, softcap,
                                            1 if seen is None else seen.calls + 1)
    # [B, H, S, d] → [B·S, H, d]: the engine packs one token per row (B = N, S = 1); a caller may pack them
    # along the sequence instead (B = 1, S = N), as the co-serving trainer's layer-by-layer backward does.
    batch, steps = query.shape[0], query.shape[2]
    q = query.transpose(1, 2).reshape(batch * steps, query.shape[1], query.shape[3])
    k = key.transpose(1, 2).reshape(batch * steps, key.shape[1], key.shape[3])
    v = value.transpose(1, 2).reshape(batch * steps, value.shape[1], value.shape[3])
    cache = plan.cache
    if plan.write_rows.numel():
        if plan.all_cached:
            cache.write(layer, plan.write_rows, k, v)
        else:
            cache.write(layer, plan.write_rows, k[plan.write_tokens], v[plan.write_tokens])
    out = torch.empty_like(q)
    if plan.decode_tokens is not None:
        kd, vd = cache.gather(layer, plan.decode_rows)  # [R, L, Hkv, d]
        qd = q[plan.decode_tokens].unsqueeze(2)  # [R, H, 1, d]
        o = _sdpa(qd, kd.transpose(1, 2).to(q.dtype), vd.transpose(1, 2).to(q.dtype),
                  plan.decode_mask(sliding_window), scaling, softcap=softcap)
        out[plan.decode_tokens] = o.squeeze(2)
    for i, (a, b, rows, _) in enumerate(plan.chunks):
        kc, vc = cache.gather(layer, rows)  # [L, Hkv, d]
        mask = plan.chunk_mask(i, sliding_window)
        o = _sdpa(q[a:b].transpose(0, 1)[None], kc.transpose(0, 1)[None].to(q.dtype),
                  vc.transpose(0, 1)[None].to(q.dtype), mask, scaling, causal=mask is None, softcap=softcap)
        out[a:b] = o[0].transpose(0, 1)
    for i, (a, b) in enumerate(plan.uncached):
        mask = plan.uncached_mask(i, sliding_window)
        o = _sdpa(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                  mask, scaling, causal=mask is None, softcap=softcap)
        out[a:b] = o[0].transpose(0, 1)
    return out.reshape(batch, steps, out.shape[1], out.shape[2]), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
_PLAN: ContextVar[AttentionPlan | None] = ContextVar("hf_delta_plan", default=None)


@contextlib.contextmanager
def packed_attention(config, plan: AttentionPlan) -> Iterator[None]:
    """While active, the model's attention layers run ``paged_attention`` over ``plan``."""
    previous = config._attn_implementation
    token = _PLAN.set(plan)
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _PLAN.reset(token)


def forward_step(model, batch: StepBatch, cache: PagedKVCache | None, *, plan: AttentionPlan | None = None
                 ) -> StepOutput:
    """Run ``batch`` through ``model`` (a ``DeltaModel``) in one forward pass; see the module docstring.

    Gradients follow the caller's mode: the engine calls this under ``torch.inference_mode()``. ``plan``: one
    built beforehand (the start-up probe's, which records what each layer's attention receives).
    """
    plan = plan or AttentionPlan(batch, cache)
    base = model.base_model
    routing = model.routing
    # One token per row ([N, 1]): every delta-aware module then sees the token axis first whatever its own layout
    # (Gemma 3 normalises queries as [B, H, S, d]), so the per-token delta slots [N] broadcast over the rest.
    with routing.use(batch.slots):
        with packed_attention(base.config, plan):
            packed = base.get_decoder()(input_ids=batch.input_ids[:, None], position_ids=batch.positions[:, None],
                                        use_cache=False).last_hidden_state
        hidden = packed[:, 0]
        index = batch.logits_index
        head = base.get_output_embeddings()
        if index.numel() == 0:  # only prefill chunks that do not reach their prompt's end
            logits = hidden.new_zeros((0, head.weight.shape[0]))
        elif index.numel() == hidden.shape[0]:  # every token wants logits (all decodes): no gather, and the
            # head sees the decoder's [N, 1] layout, so the routing's per-shape plan (its syncs) is reused as is.
            logits = softcap_logits(head(packed)[:, 0], base.config)
        else:
            with routing.use(batch.slots[index]):
                logits = softcap_logits(head(hidden[index]), base.config)
    return StepOutput(hidden=hidden, logits=logits)


"""One engine step: a single forward pass over a packed set of tokens from many sequences and many deltas.

A ``StepBatch`` is the whole contract between the scheduler and the model:

* ``input_ids``, ``positions``, ``slots``: one entry per token (``[N]``), tokens of all sequences packed
  one after the other; ``slots[i]`` is the delta slot of token ``i`` (``-1`` = base), read by every
  delta-aware layer through the model's ``DeltaRouting``;
* ``segments``: which consecutive tokens belong to one sequence, where they start (their positions), the
  KV handle they read and append to, and whether the logits of their last token (or of all of them, to
  score a prompt) are wanted.

Attention runs through a transformers attention function registered under ``"hf_delta_paged"``: the model
computes projections, rotary embeddings, MLPs and the output head as usual over ``[1, N]`` tokens; only the
attention itself is per segment, reading and writing the paged KV cache. Semantics, for each segment ``s``
with tokens ``a..b-1`` at positions ``p0..p0+(b-a)-1``::

    cache[s.key][p0 : p0+b-a] = k[a:b], v[a:b]                    (cached segments)
    out[a+i] = softmax(q[a+i] · cache[s.key][: p0+i+1]ᵀ) · V       (causal over the sequence so far)

A segment with ``cached=False`` attends only within itself and leaves the cache alone: that is where a later
co-serving feature adds fine-tuning tokens (a trainable LoRA's forward) to the same pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
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
    """Index tensors the attention function needs, computed once per step (not once per layer)."""

    def __init__(self, batch: StepBatch, cache: PagedKVCache | None):
        self.cache = cache
        device = batch.input_ids.device
        write_tok: list[int] = []
        write_rows: list[int] = []
        decode_tok: list[int] = []
        decode_keys: list[str] = []
        decode_len: list[int] = []
        self.chunks: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
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
            total = seg.start + seg.length
            rows = torch.tensor(cache.rows(seg.key, 0, total), dtype=torch.long, device=device)
            mask = None
            if seg.start:  # query i sits at position start+i and sees keys 0..start+i
                q_pos = torch.arange(seg.start, total, device=device).unsqueeze(1)
                mask = (torch.arange(total, device=device).unsqueeze(0) <= q_pos)[None, None]
            self.chunks.append((a, b, rows, mask))
        self.all_cached = len(write_tok) == batch.num_tokens
        self.write_tokens = torch.tensor(write_tok, dtype=torch.long, device=device)
        self.write_rows = torch.tensor(write_rows, dtype=torch.long, device=device)
        self.decode_tokens = self.decode_rows = self.decode_mask = None
        if decode_tok:
            self.decode_tokens = torch.tensor(decode_tok, dtype=torch.long, device=device)
            self.decode_rows = cache.rows_tensor(decode_keys, decode_len, device=device)
            lengths = torch.tensor(decode_len, device=device)
            width = self.decode_rows.shape[1]
            self.decode_mask = (torch.arange(width, device=device)[None] < lengths[:, None])[:, None, None, :]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
          *, causal: bool = False) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask) v`` with grouped-query heads (q ``[B, H, Q, d]``, k/v ``[B, Hkv, L, d]``)."""
    if k.shape[1] != q.shape[1]:
        if _GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                                  enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal)


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    hf_delta_plan: AttentionPlan | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function over a packed step (``query``: ``[1, H, N, d]``) → ``[1, N, H, d]``."""
    plan = hf_delta_plan
    if plan is None:
        raise EngineConfigError(f"The {ATTENTION_NAME!r} attention runs only inside an hf_delta engine step.")
    layer = module.layer_idx
    q = query[0].transpose(0, 1)  # [N, H, d]
    k = key[0].transpose(0, 1)  # [N, Hkv, d]
    v = value[0].transpose(0, 1)
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
        o = _sdpa(qd, kd.transpose(1, 2).to(q.dtype), vd.transpose(1, 2).to(q.dtype), plan.decode_mask, scaling)
        out[plan.decode_tokens] = o.squeeze(2)
    for a, b, rows, mask in plan.chunks:
        kc, vc = cache.gather(layer, rows)  # [L, Hkv, d]
        o = _sdpa(q[a:b].transpose(0, 1)[None], kc.transpose(0, 1)[None].to(q.dtype),
                  vc.transpose(0, 1)[None].to(q.dtype), mask, scaling, causal=mask is None)
        out[a:b] = o[0].transpose(0, 1)
    for a, b in plan.uncached:
        o = _sdpa(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                  None, scaling, causal=True)
        out[a:b] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)


@contextlib.contextmanager
def _packed_attention(config) -> Iterator[None]:
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


def check_supported(base_model) -> None:
    """Raise ``EngineConfigError`` for models the packed step cannot run (sliding-window layers, no layer ids)."""
    config = base_model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise EngineConfigError(f"The serving engine supports full-attention decoders only; this model has "
                                f"layer types {sorted(kinds)}.")
    if not any(hasattr(m, "layer_idx") for m in base_model.modules()):
        raise EngineConfigError(f"{type(base_model).__name__} has no attention modules with a layer_idx.")


def forward_step(model, batch: StepBatch, cache: PagedKVCache | None) -> StepOutput:
    """Run ``batch`` through ``model`` (a ``DeltaModel``) in one forward pass; see the module docstring.

    Gradients follow the caller's mode: the engine calls this under ``torch.inference_mode()``.
    """
    plan = AttentionPlan(batch, cache)
    base = model.base_model
    routing = model.routing
    with routing.use(batch.slots.unsqueeze(0)):
        with _packed_attention(base.config):
            packed = base.get_decoder()(input_ids=batch.input_ids[None], position_ids=batch.positions[None],
                                        use_cache=False, hf_delta_plan=plan).last_hidden_state
        hidden = packed[0]
        index = batch.logits_index
        head = base.get_output_embeddings()
        if index.numel() == 0:  # only prefill chunks that do not reach their prompt's end
            logits = hidden.new_zeros((0, head.weight.shape[0]))
        elif index.numel() == hidden.shape[0]:  # every token wants logits (all decodes): no gather, and the
            logits = softcap_logits(head(packed)[0], base.config)  # decoder's [1, N] routing is reused as is
        else:
            with routing.use(batch.slots[index]):
                logits = softcap_logits(head(hidden[index]), base.config)
    return StepOutput(hidden=hidden, logits=logits)


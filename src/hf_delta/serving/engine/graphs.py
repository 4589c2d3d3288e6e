"""Decode steps replayed as CUDA graphs: one capture per batch-size bucket, context bucket and routing.

A decode step (every sequence adds one token) launches a few kernels per layer; at small batch sizes the host
takes longer to launch them than the GPU to run them. ``DecodeGraphs`` runs such a step through *static*
buffers padded to a bucket, so that one captured graph replays every later step of the same shape:

* ``B`` rows, the next batch-size bucket (1, 2, 4, 8, 16, 32, 48, 64, 96, ...): rows past the real ones decode
  token 0 at position 0 on the base, reading and writing one row of a free KV block (whose next owner writes
  each position before reading it), so they change neither the real rows' outputs nor any request's cache; with
  no block free a padded step runs eagerly;
* ``L`` cache rows per sequence, the next power of two (at least one KV block) over the longest sequence: the
  block tables, expanded to rows, are a static ``[B, L]`` tensor refilled before each replay;
* the routing (each row's delta slot) and the residency generation: the delta layers bake which rows go to
  which delta, and where its weights live, into the kernels they launch, so a different mix of deltas, or an
  attach or eviction, is a different graph.

Semantics of a replay, for each real row ``i`` (the step ``forward_step`` runs)::

    logits[i] = head(decoder(embed(ids[i]) at positions[i], cache rows[i, :lengths[i]]))

The token embedding runs eagerly before the replay (its delta routing reads token ids on the host); the
decoder layers, the final norm and the output head are in the graph. A key is captured the second time it is
seen (a mix of requests that lasts one step is not worth a capture); up to ``max_graphs`` graphs are kept
(least recently used dropped), sharing one memory pool. Anything a capture cannot hold (a host sync inside a
layer, an unsupported op) is logged once as a warning and that key runs eagerly from then on; after
``_MAX_FAILURES`` failed captures the engine stops trying.

Without ``capture`` (a CPU engine, or a test) the padded step runs eagerly: the same code path, so its
padding and bucketing are tested where CUDA is not available.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...utils.logits import softcap_logits
from .kv_cache import PagedKVCache
from .step import AttentionPlan, Segment, StepOutput, packed_attention

logger = logging.getLogger(__name__)

_MAX_FAILURES = 3


def batch_bucket(n: int) -> int:
    """The padded batch size of ``n`` decoding rows: powers of two up to 16, then multiples of 16 up to 64 and
    of 32 above (past 16 rows, at most a third of a bucket is padding)."""
    if n <= 16:
        return 1 << max(0, (n - 1).bit_length())
    step = 16 if n <= 64 else 32
    return -(-n // step) * step


def length_bucket(n: int, block_size: int) -> int:
    """Cache rows gathered per sequence for a longest sequence of ``n`` tokens: the next power of two, at least
    one block."""
    return max(block_size, 1 << max(0, (n - 1).bit_length()))


@dataclass
class _Entry:
    """The static buffers of one key, and its graph once captured."""

    ints: torch.Tensor  # [4 * B + B * L] int64 on the device: every input, refilled by one copy
    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor
    rows: torch.Tensor
    embeds: torch.Tensor | None = None  # [B, 1, hidden]: the graph's input
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    graph: Any = None
    keep: list[Any] = field(default_factory=list)  # per-forward plans the captured kernels read (kept alive)
    seen: int = 0
    failed: bool = False


class DecodeGraphs:
    """Decode steps through padded static buffers, captured as CUDA graphs when ``capture`` (see the module
    docstring).

    Args:
        model: the engine's ``DeltaModel``.
        cache: its paged KV cache.
        max_batch: the most decoding rows a step may have (the engine's ``max_running``); larger steps run eagerly.
        capture: capture CUDA graphs (the model is on a CUDA device); otherwise run the padded step eagerly.
        max_graphs: graphs kept at once.
    """

    def __init__(self, model, cache: PagedKVCache, *, max_batch: int, capture: bool, max_graphs: int = 16):
        self.model = model
        self.cache = cache
        self.max_batch = max_batch
        self.capture = capture
        self.max_graphs = max_graphs
        self.device = model.device
        self.counters = {"graph_steps": 0, "padded_eager_steps": 0, "captures": 0, "capture_failures": 0}
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._generation: Any = None
        self._pool = None
        self._warned = False

    @property
    def disabled(self) -> bool:
        return self.counters["capture_failures"] >= _MAX_FAILURES

    def eligible(self, segments: Sequence[Segment]) -> bool:
        """Whether a step of ``segments`` is a plain decode step this can run (one cached token each, its logits
        wanted, no more rows than ``max_batch``)."""
        return (
            0 < len(segments) <= self.max_batch
            and not self.disabled
            and all(s.length == 1 and s.cached and s.logits and not s.all_logits for s in segments)
        )

    def run(
        self, segments: Sequence[Segment], tokens: Sequence[Sequence[int]], *, generation: Any = None
    ) -> StepOutput | None:
        """The step of ``segments`` (``eligible``), its outputs for the real rows only; ``None`` when padding
        rows have no free KV row to use (run the step eagerly). ``generation``: anything that changes when deltas
        are attached or detached (every graph is dropped then)."""
        if generation != self._generation:
            self.clear()
            self._generation = generation
        n = len(segments)
        lengths = [s.start + 1 for s in segments]
        rows_b = batch_bucket(n)
        spare = self.cache.spare_row()
        if spare is None and rows_b > n:
            return None
        width = length_bucket(max(lengths), self.cache.block_size)
        slots = [s.slot for s in segments] + [-1] * (rows_b - n)
        key = (rows_b, width, tuple(slots))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._allocate(rows_b, width)
            while len(self._entries) > self.max_graphs:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        entry.seen += 1
        self._fill(entry, segments, tokens, lengths, slots, spare or 0)
        if self.capture and entry.graph is None and not entry.failed and entry.seen >= 2:
            self._capture(entry, key)
        if entry.graph is not None:
            with self.model.routing.use(entry.slots):
                entry.embeds.copy_(self._embed(entry))
            entry.graph.replay()
            self.counters["graph_steps"] += 1
        else:
            hidden, logits = self._step(entry)
            entry.hidden, entry.logits = hidden, logits
            self.counters["padded_eager_steps"] += 1
        return StepOutput(hidden=entry.hidden[:n], logits=entry.logits[:n])

    def clear(self) -> None:
        """Drop every graph and buffer (their memory returns to the pool)."""
        self._entries.clear()

    # ---------------------------------------------------------------------------------------------- buffers
    def _allocate(self, rows_b: int, width: int) -> _Entry:
        ints = torch.zeros(4 * rows_b + rows_b * width, dtype=torch.long, device=self.device)
        ids, positions, slots, lengths = ints[: 4 * rows_b].view(4, rows_b)
        rows = ints[4 * rows_b :].view(rows_b, width)
        return _Entry(ints=ints, ids=ids, positions=positions, slots=slots, lengths=lengths, rows=rows)

    def _fill(
        self,
        entry: _Entry,
        segments: Sequence[Segment],
        tokens: Sequence[Sequence[int]],
        lengths: list[int],
        slots: list[int],
        spare: int,
    ) -> None:
        """Write this step's inputs into ``entry``'s buffers (padding rows use cache row ``spare``): one
        host-to-device copy."""
        rows_b, width = entry.rows.shape
        n = len(segments)
        pad = rows_b - n
        on_cuda = self.device.type == "cuda"
        host = torch.empty(entry.ints.shape, dtype=torch.long, pin_memory=on_cuda)
        host[: 4 * rows_b] = torch.tensor(
            [t[0] for t in tokens] + [0] * pad + [s.start for s in segments] + [0] * pad + slots + lengths + [1] * pad
        )
        rows = host[4 * rows_b :].view(rows_b, width)
        rows.fill_(spare)  # past a sequence's length: masked
        rows[:n, : max(lengths)] = self.cache.rows_tensor(
            [s.key for s in segments], lengths, device=torch.device("cpu")
        )
        entry.ints.copy_(host, non_blocking=on_cuda)

    # ------------------------------------------------------------------------------------------------ steps
    def _embed(self, entry: _Entry) -> torch.Tensor:
        return self.model.base_model.get_input_embeddings()(entry.ids[:, None])

    def _body(self, entry: _Entry, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder, final norm and output head over ``embeds`` (inside the routing of ``entry.slots``)."""
        base = self.model.base_model
        plan = AttentionPlan.decode_only(self.cache, entry.rows, entry.lengths)
        with packed_attention(base.config, plan):
            hidden = base.get_decoder()(
                inputs_embeds=embeds, position_ids=entry.positions[:, None], use_cache=False
            ).last_hidden_state
        # [B, 1, hidden] into the head, as forward_step does: the decoder's routing plan serves it too.
        return hidden[:, 0], softcap_logits(base.get_output_embeddings()(hidden)[:, 0], base.config)

    def _step(self, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor]:
        with self.model.routing.use(entry.slots):
            return self._body(entry, self._embed(entry))

    def _capture(self, entry: _Entry, key: tuple) -> None:
        routing = self.model.routing
        try:
            # Warm-up and capture share one routing context: the warm-up builds the per-forward plans (routes,
            # slot vectors, kernel tile plans; their host syncs happen here) and the capture reuses them.
            with routing.use(entry.slots):
                entry.embeds = self._embed(entry).clone()
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):  # off the capture: lazy initialisations, kernel tuning, the plans
                    self._body(entry, entry.embeds)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                # thread_local: the loader threads may use CUDA while this thread captures.
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    entry.hidden, entry.logits = self._body(entry, entry.embeds)
                entry.keep = _per_forward_state(routing)
            entry.graph = graph
            self.counters["captures"] += 1
        except Exception as err:  # any failure: this key runs eagerly, the engine keeps serving
            entry.failed, entry.graph, entry.embeds = True, None, None
            self.counters["capture_failures"] += 1
            if not self._warned:
                self._warned = True
                logger.warning(
                    "Capturing a decode step as a CUDA graph failed (%s: %s); such steps run eagerly "
                    "(batch %d, %d cache rows).",
                    type(err).__name__,
                    err,
                    key[0],
                    key[1],
                    exc_info=True,
                )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # what the failed capture queued, before the eager step


def _per_forward_state(routing) -> list[Any]:
    """The per-forward caches a captured step's kernels read, built during its warm-up: the routing's plans (row
    indices, slot vectors, tile plans) and the kernels' identity-keyed slot plans. The graph holds them: they are
    dropped from their caches when the routing changes or newer entries push them out, and memory freed there
    would be reused under the graph. (Private state of ``layers`` and ``methods``, read, never written.)"""
    from ...methods import _dispatch, bitdelta

    # Strict attribute access: if these caches move, this fails (tests/serving/test_decode_graphs.py) rather than
    # letting a graph read freed memory.
    return [routing._plans, *(list(cache._entries) for cache in (_dispatch._SLOTS, bitdelta._ROW_PLANS))]

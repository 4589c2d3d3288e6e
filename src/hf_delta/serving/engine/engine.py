"""``Engine``: continuous batching of many requests over one base model and many deltas.

>>> engine = Engine("org/base-model", deltas={"math": "org/math-delta", "chat": "./chat-delta"})  # doctest: +SKIP
>>> engine.generate(["add 1 to 2 3 ="], model="math", params=SamplingParams(max_tokens=8))  # doctest: +SKIP

The engine owns its model. ``step()`` runs one iteration (schedule, one packed forward pass, sample, stream);
``start()`` runs steps in a background thread so that ``submit`` can be called from any thread (the HTTP
server does so from its event loop).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...errors import DeltaNotFoundError, EngineConfigError, InvalidRequestError
from ...model import BASE_NAME, DeltaModel
from ...utils.loading import load_model, load_tokenizer
from .config import EngineConfig, process_rss
from .graphs import DecodeGraphs
from .handles import GenerationChunk, GenerationResult, RequestHandle
from .hooks import StepHook, StepWork
from .kv_cache import PagedKVCache
from .logits import TokenLogprob, pick_tokens, score_prompt
from .probe import probe_model
from .residency import ResidencyManager
from .sampling import SamplingParams, TextStream, make_generator
from .scheduler import Request, Scheduler
from .step import Segment, StepBatch, StepOutput, forward_step
from .tokenizers import DeltaTokenizers, encode, render_chat

logger = logging.getLogger(__name__)


class Engine:
    """Serve one base model and any number of deltas with iteration-level (continuous) batching.

    Args:
        base: the base model: a Hub id, a folder, a loaded ``PreTrainedModel`` or a ``DeltaModel``.
        deltas: ``{name: delta repo (folder or Hub id)}`` to serve; more with ``register_delta``.
        config: sizes and limits (``EngineConfig``).
        tokenizer: the base's tokenizer (default: loaded from ``base``).
        base_name: the model name that selects the base with no delta (``"__base__"`` always does too).
        dtype, device: for loading the base (default float32 / CPU, or where a given model already is).
        token, cache_dir, local_files_only: for Hub downloads of the base and the deltas.
    """

    def __init__(self, base: str | Path | PreTrainedModel | DeltaModel, *,
                 deltas: Mapping[str, str | Path] | None = None, config: EngineConfig | None = None,
                 tokenizer: PreTrainedTokenizerBase | str | Path | None = None, base_name: str = "base",
                 dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 token: str | bool | None = None, cache_dir: str | Path | None = None,
                 local_files_only: bool = False):
        self.config = config or EngineConfig()
        self.config.validate()
        if isinstance(base, DeltaModel):
            self.model = base
        else:
            model = load_model(base, dtype=dtype or torch.float32, token=token, cache_dir=cache_dir,
                               local_files_only=local_files_only)
            self.model = DeltaModel(model.to(device) if device is not None else model)
        self.model.eval()
        layout = probe_model(self.model)  # refuses what the packed step cannot run, before anything is served
        source = tokenizer if tokenizer is not None else (base if isinstance(base, (str, Path))
                                                          else self.model.base_model.name_or_path)
        self.base_tokenizer = load_tokenizer(source)
        self.base_name = base_name
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_model_len = min(self.config.max_model_len or limit, limit)
        self.cache = PagedKVCache(
            num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
            max_tokens=self.config.kv_cache_tokens, block_size=self.config.block_size, dtype=layout.dtype,
            device=self.model.device)
        self.residency = ResidencyManager(
            self.model, device_slots=self.config.device_slots, cpu_slots=self.config.cpu_slots,
            loader_threads=self.config.loader_threads, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, retry_failed_after=self.config.retry_failed_after)
        self.scheduler = Scheduler(self.cache, self.residency, max_batch_tokens=self.config.max_batch_tokens,
                                   max_running=self.config.max_running, fairness_steps=self.config.fairness_steps)
        # Decode steps as CUDA graphs: only where there is CUDA (elsewhere the launches they save cost nothing).
        self.graphs = (DecodeGraphs(self.model, self.cache, max_batch=self.config.max_running, capture=True)
                       if self.config.cuda_graphs and self.model.device.type == "cuda" else None)
        self.tokenizers = DeltaTokenizers(self.base_tokenizer, self.model.base_model.generation_config.eos_token_id,
                                          self.residency.folder)
        self._inbox: list[tuple[str, Any]] = []
        self._wake = threading.Condition()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._requests: dict[str, Request] = {}
        self.counters = {"steps": 0, "tokens": 0, "generated": 0, "failed_steps": 0, "requests": 0,
                         "peak_deltas_per_step": 0}  # most distinct models (deltas or base) in one pass
        self.trainer: StepHook | None = None  # adds fine-tuning tokens to the steps (attach_trainer)
        for name, repo in (deltas or {}).items():
            self.register_delta(name, repo)

    # ------------------------------------------------------------------------------------------ models
    def register_delta(self, name: str, source: str | Path, *, revision: str | None = None) -> None:
        """Serve delta repo ``source`` (folder or Hub id) under ``name``; it is loaded when first requested."""
        if name == self.base_name:
            raise EngineConfigError(f"{name!r} already names the base model; pick another delta name.")
        self.residency.register(name, source, revision=revision)
        self.tokenizers.forget(name)

    def model_names(self) -> list[str]:
        """Names a request may use: the base's, then every registered delta."""
        return [self.base_name, *self.residency.names()]

    def resolve_model(self, model: str) -> str:
        """``"__base__"`` for the base's names, else the delta name; raises ``DeltaNotFoundError`` if unknown."""
        if model in (self.base_name, BASE_NAME):
            return BASE_NAME
        if model not in self.residency:
            raise DeltaNotFoundError(f"The model {model!r} does not exist; served models: {self.model_names()}.")
        return model

    def tokenizer_for(self, model: str) -> PreTrainedTokenizerBase:
        """The tokenizer (and chat template) of ``model``: the delta's own when it carries one, else the base's."""
        return self.tokenizers.get(self.resolve_model(model))

    def render_chat(self, model: str, messages: Sequence[Mapping[str, Any]]) -> str:
        """``messages`` through ``model``'s own chat template, ending with the assistant's turn."""
        return render_chat(self.tokenizer_for(model), model, messages)

    def encode(self, model: str, prompt: str | Sequence[int], *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``prompt`` for ``model`` (ids are checked against its vocabulary)."""
        return encode(self.tokenizer_for(model), model, prompt, add_special_tokens=add_special_tokens)

    # ---------------------------------------------------------------------------------------- requests
    def submit(self, model: str, prompt: str | Sequence[int], *, params: SamplingParams | None = None,
               request_id: str | None = None, loop=None, add_special_tokens: bool = True) -> RequestHandle:
        """Queue one request; returns its handle (iterate it, or ``handle.result()``).

        Raises:
            DeltaNotFoundError: ``model`` is not served.
            InvalidRequestError: the prompt is empty or it cannot fit the context / KV budget, or ``logit_bias``
                names a token outside the model's vocabulary.
            DeltaLoadError: the delta's repo cannot be fetched (its tokenizer is needed here).
        """
        params = params or SamplingParams()
        name = self.resolve_model(model)
        tokenizer = self.tokenizer_for(model)
        ids = self.encode(model, prompt, add_special_tokens=add_special_tokens)
        self.check_length(len(ids), params.max_tokens)
        outside = sorted(t for t in params.logit_bias if t >= len(tokenizer))
        if outside:
            raise InvalidRequestError(f"logit_bias names token ids {outside} outside the vocabulary of {model!r} "
                                      f"(ids 0..{len(tokenizer) - 1}).")
        request = Request(id=request_id or f"req-{uuid.uuid4().hex[:16]}", model=name, prompt_ids=ids,
                          params=params, eos_ids=self.tokenizers.eos_ids(name))
        handle = RequestHandle(request.id, model, len(ids), loop=loop)
        request.state.update(stream=TextStream(tokenizer, params.stop), handle=handle,
                             generator=None if params.greedy else make_generator(params.seed, self.model.device))
        if params.prompt_logprobs is not None:  # position 0 has nothing before it to be scored by
            request.state.update(prompt_logprobs=[None] * len(ids), prompt_scored=len(ids) == 1)
        self._post("submit", request)
        return handle

    @property
    def max_total_tokens(self) -> int:
        """The longest prompt + completion a request may have (the context, or the whole KV budget if smaller)."""
        return min(self.max_model_len, self.cache.capacity)

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ``InvalidRequestError`` if a request of this size can never run."""
        if prompt_tokens < 1:
            raise InvalidRequestError("The prompt is empty; send at least one token.")
        total = prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the request needs "
                f"{total} ({prompt_tokens} in the prompt + {max_tokens} max_tokens). Shorten the prompt or "
                "lower max_tokens.")
        if total > self.cache.capacity:
            raise InvalidRequestError(f"The request needs {total} tokens of KV cache but the engine's whole budget "
                                      f"is {self.cache.capacity}; lower max_tokens.")

    def abort(self, request_id: str) -> None:
        """Stop a request (a client went away); its memory is freed at the next step."""
        self._post("abort", request_id)

    def _post(self, kind: str, item: Any) -> None:
        with self._wake:
            self._inbox.append((kind, item))
            self._wake.notify()

    def generate(self, prompts: Sequence[str | Sequence[int]], *, model: str | Sequence[str] = BASE_NAME,
                 params: SamplingParams | None = None) -> list[GenerationResult]:
        """Run ``prompts`` (one model for all, or one per prompt) to completion; results in prompt order."""
        models = [model] * len(prompts) if isinstance(model, str) else list(model)
        handles = [self.submit(m, p, params=params) for m, p in zip(models, prompts, strict=True)]
        if self._thread is None:
            while not all(h.done for h in handles):
                if self.step() == 0:
                    time.sleep(0.001)  # waiting on a background delta load: let its thread run
        return [h.result() for h in handles]

    # ------------------------------------------------------------------------------------------ stepping
    def start(self) -> None:
        """Run steps in a background thread until ``stop()``."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="hf-delta-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread; unfinished requests end with an error."""
        thread, self._thread = self._thread, None
        if thread is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify()
            thread.join()
        for request in list(self._requests.values()):
            self._finish(request, "abort", error=RuntimeError("The engine was stopped."))

    @property
    def is_running(self) -> bool:
        """Whether the background stepping thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self.stop()
        self.residency.close()
        if self.graphs is not None:
            self.graphs.clear()  # their memory pool, before the engine itself is collected

    def attach_trainer(self, trainer: StepHook) -> None:
        """Let ``trainer`` (a ``StepHook``, e.g. a ``CoServingTrainer``) add work to every step while it has some:
        ``trainer.plan`` after the inference tokens are scheduled, its segments packed after them,
        ``trainer.finish`` after the pass (see ``hooks``)."""
        self.trainer = trainer

    def wake(self) -> None:
        """Wake the background thread (new non-request work, e.g. a fine-tuning job, is waiting)."""
        with self._wake:
            self._wake.notify()

    def _has_work(self) -> bool:
        return self.scheduler.has_work() or (self.trainer is not None and self.trainer.has_work())

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._inbox or self._has_work()):
                    self._wake.wait(timeout=0.5)
                if self._stopping:
                    return
            try:
                if self.step() == 0 and self.scheduler.has_work():
                    time.sleep(0.002)  # waiting on a delta load or a KV block: do not spin
            except Exception:  # the loop must survive anything a step throws
                logger.exception("Engine step failed")

    @torch.inference_mode()
    def step(self) -> int:
        """One iteration: take new requests, schedule, run one forward pass, sample and stream.

        Returns the number of tokens computed (0 when there was nothing to run).
        """
        with self._step_lock:
            self._drain_inbox()
            self.residency.poll()
            for request in list(self.scheduler.waiting):
                err = self.residency.error(request.model) if request.model != BASE_NAME else None
                if err is not None:
                    self._finish(request, "error", error=err)
            self.residency.prefetch(self.scheduler.wanted_deltas())
            plan = self.scheduler.schedule()
            trainer = self.trainer if self.trainer is not None and self.trainer.has_work() else None
            training = None if trainer is None else trainer.plan(
                inference_tokens=sum(n for _, n in plan), idle=not plan and not self.scheduler.has_work())
            if not plan and training is None:
                return 0
            self._run(plan, training)
            if training is not None:
                trainer.finish(training)
            self.counters["steps"] += 1
            self.counters["peak_deltas_per_step"] = max(self.counters["peak_deltas_per_step"],
                                                        len({request.model for request, _ in plan}))
            work = 0 if training is None else training.num_tokens + training.backward_layers
            return sum(n for _, n in plan) + work

    def _drain_inbox(self) -> None:
        with self._wake:
            inbox, self._inbox = self._inbox, []
        for kind, item in inbox:
            if kind == "submit":
                self._requests[item.id] = item
                self.scheduler.add(item)
                self.counters["requests"] += 1
            elif kind == "abort" and item in self._requests:
                self._finish(self._requests[item], "abort")

    def _slot(self, request: Request) -> int:
        return -1 if request.model == BASE_NAME else self.model.routing.slot_of(request.model)

    def _segment(self, request: Request, n: int) -> Segment:
        start = request.num_computed
        return Segment(request.id, start, n, self._slot(request), logits=start + n == request.num_tokens,
                       all_logits=request.state.get("prompt_scored") is False)

    def _segments(self, plan: Sequence[tuple[Request, int]]) -> tuple[list[Segment], list[list[int]]]:
        segments = [self._segment(request, n) for request, n in plan]
        return segments, [request.tokens[s.start : s.start + n] for s, (request, n) in zip(segments, plan, strict=True)]

    def _forward(self, plan: Sequence[tuple[Request, int]],
                 training: StepWork | None = None) -> tuple[torch.Tensor | None, dict[str, BaseException]]:
        """Logits of the requests whose last token this step computes (one row each, in plan order; ``None`` if
        there are none) and the errors of failed requests: when the packed pass fails, each request is retried
        alone so that one bad request fails by itself."""
        segments, tokens = self._segments(plan)
        if training is not None and training.segments:
            return self._forward_with_training(plan, segments, tokens, training)
        try:
            return self._decode_or_step(segments, tokens).logits, {}
        except Exception as err:
            if len(plan) == 1:
                return None, {plan[0][0].id: err}
            self.counters["failed_steps"] += 1
            logger.warning("A packed step failed (%s); retrying its %d requests one by one", err, len(plan),
                           exc_info=True)
        rows: list[torch.Tensor] = []
        errors: dict[str, BaseException] = {}
        for item in plan:
            logits, failed = self._forward([item])
            rows.extend(logits if logits is not None else [])
            errors.update(failed)
        if not rows:
            return None, errors
        width = max(row.shape[-1] for row in rows)  # rows run alone may differ (grown vocabularies)
        return torch.stack([row if row.shape[-1] == width else
                            F.pad(row, (0, width - row.shape[-1]), value=torch.finfo(row.dtype).min)
                            for row in rows]), errors

    def _decode_or_step(self, segments: list[Segment], tokens: list[list[int]]) -> StepOutput:
        """The packed pass: a captured decode graph where one holds it, else ``forward_step``."""
        if self.graphs is not None and self.graphs.eligible(segments):
            counters = self.residency.counters
            out = self.graphs.run(segments, tokens, generation=(counters["attaches"], counters["device_evictions"]))
            if out is not None:
                return out
        return forward_step(self.model, StepBatch.pack(segments, tokens, device=self.model.device), self.cache)

    def _forward_with_training(self, plan: Sequence[tuple[Request, int]], segments: list[Segment],
                               tokens: list[list[int]], training: StepWork) -> tuple[torch.Tensor | None,
                                                                                dict[str, BaseException]]:
        """The packed pass with the trainer's segments after the requests' (their layer inputs captured); if it
        fails, the requests run again without them and the trainer is told."""
        try:
            batch = StepBatch.pack(segments + training.segments, tokens + training.tokens, device=self.model.device)
            with training.capture(sum(s.length for s in segments)):
                out = forward_step(self.model, batch, self.cache)
        except Exception as err:
            self.trainer.forward_failed(training, err)
            return self._forward(plan) if plan else (None, {})
        return out.logits, {}  # training segments want no logits: every row is a request's

    def _run(self, plan: Sequence[tuple[Request, int]], training: StepWork | None = None) -> None:
        segments = [self._segment(request, n) for request, n in plan]  # before the pass moves num_computed
        logits, errors = (self._forward(plan, training) if plan or (training is not None and training.segments)
                          else (None, {}))
        sampling: list[Request] = []
        rows: list[int] = []  # the logits row of each request in ``sampling``
        offset = 0  # failed requests have no rows
        for (request, n), segment in zip(plan, segments, strict=True):
            error = errors.get(request.id)
            if error is not None:
                self._finish(request, "error", error=error)
                continue
            offset += segment.num_logits
            if segment.all_logits:
                score_prompt(request, segment.start, logits[offset - segment.num_logits : offset])
            request.num_computed += n
            self.counters["tokens"] += n
            if request.num_computed < request.num_tokens:
                continue
            if request.params.max_tokens == 0:  # only the prompt's log-probabilities were asked for
                self._finish(request, "length")
            else:  # its last token ran: the segment wanted its logits
                sampling.append(request)
                rows.append(offset - 1)
        if not sampling:
            return
        picked, logprobs = pick_tokens(logits[rows], sampling)
        now = time.monotonic()
        for request, token, logprob in zip(sampling, picked, logprobs, strict=True):
            self._append(request, token, now, logprob)

    def _append(self, request: Request, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        request.output_ids.append(token)
        self.counters["generated"] += 1
        if request.first_token_at is None:
            request.first_token_at = now
        params, stream = request.params, request.state["stream"]
        if token in request.eos_ids and not params.ignore_eos:
            self._finish(request, "stop")
            return
        text = stream.push(token, can_stop=len(request.output_ids) >= params.min_tokens)
        reason = None
        if stream.stopped:
            reason = "stop"
        elif len(request.output_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
            reason = "length"
        request.state.setdefault("pending", []).append(token)
        if logprob is not None:
            request.state.setdefault("pending_logprobs", []).append(logprob)
        if reason is None:
            if text:
                self._push(request, GenerationChunk(request.id, text, []))
            return
        self._finish(request, reason, text=text)

    @staticmethod
    def _push(request: Request, chunk: GenerationChunk) -> None:
        """Send ``chunk`` with the tokens (and log-probabilities) not sent yet; the first chunk also carries the
        prompt's log-probabilities."""
        chunk.token_ids = request.state.pop("pending", [])
        if request.params.logprobs is not None:
            chunk.logprobs = request.state.pop("pending_logprobs", [])
        if request.state.get("prompt_scored"):
            chunk.prompt_logprobs = request.state.pop("prompt_logprobs", None)
        request.state["handle"]._push(chunk)

    def _finish(self, request: Request, reason: str, *, error: BaseException | None = None, text: str = "") -> None:
        if request.status == "finished":
            return
        self.scheduler.finish(request)
        self._requests.pop(request.id, None)
        request.finished_at = time.monotonic()
        request.finish_reason = reason
        if error is None and reason != "abort":
            text += request.state["stream"].flush()
        self._push(request, GenerationChunk(request.id, text, [], finish_reason=reason, error=error,
                                            timing=self._timing(request)))

    @staticmethod
    def _timing(request: Request) -> dict[str, float | None]:
        first = request.first_token_at
        return {"arrival": request.arrival, "first_token": first, "finished": request.finished_at,
                "ttft": None if first is None else first - request.arrival,
                "completion_tokens": len(request.output_ids), "preemptions": request.preemptions}

    # ---------------------------------------------------------------------------------------- reporting
    def memory_stats(self) -> dict[str, Any]:
        """Weight bytes counted by the engine (base, deltas per tier), the KV cache, and the process RSS."""
        weights = self.residency.weight_bytes()
        return {"weight_bytes": weights, "kv_cache_bytes": self.cache.nbytes,
                "kv_cache_tokens": self.cache.capacity, "kv_used_tokens": self.cache.used_tokens,
                "kv_peak_tokens": self.cache.peak_used_tokens,
                "rss_bytes": process_rss()}

    def stats(self) -> dict[str, Any]:
        """Counters, queue sizes, residency tiers and memory (consistent: taken between two steps)."""
        with self._step_lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        graphs = {} if self.graphs is None else {"graphs": dict(self.graphs.counters)}
        return {"config": asdict(self.config), "counters": dict(self.counters), **graphs,
                "preemptions": self.scheduler.preemptions, "waiting": len(self.scheduler.waiting),
                "running": len(self.scheduler.running), "residency": self.residency.stats(),
                "memory": self.memory_stats()}

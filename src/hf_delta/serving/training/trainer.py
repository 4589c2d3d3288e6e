"""``CoServingTrainer``: LoRA fine-tuning inside the engine's inference steps (FlexLLM-style co-serving).

The trainable adapter is one more delta on the engine's model: a ``LowRankWeight`` per target module whose
``A``/``B`` require grad, attached through the same slots as compressed deltas, so training tokens, BitDelta
rows and DeltaZip rows share one packed forward pass with no special case.

Each engine step (``plan`` before the forward pass, ``finish`` after it, both on the engine thread):

1. **Forward, in chunks.** After the inference tokens are scheduled, the trainer adds as many training tokens
   as the ``CoServeScheduler`` allows, as ``Segment``s of the packed step (KV in the engine's paged cache
   under a ``train:`` key, so a chunk attends to its sequence's earlier chunks). The pass runs without
   grad; a forward pre-hook on every decoder layer copies that layer's *input* hidden states of the training
   tokens (``tokens × hidden`` per layer): that is all the activation memory kept.
2. **Backward, by layers.** Once every sequence of the optimizer batch is through, each step recomputes as
   many whole decoder layers as its budget allows, last layer first, from the saved inputs, with grad (the
   last one also through the final norm, the head and the loss), and back-propagates the gradient carried
   from the layer above. The base and the other deltas are frozen, so only the LoRA factors get
   gradients, and only one layer's activations exist at a time.
3. **Optimizer step** (AdamW) when layer 0 is done; then the next batch. Checkpoints and the final adapter are
   PEFT adapters (``finetune.save_adapter``); the final one is registered with the engine under the job's
   adapter name, so it is served (in mixed batches) as soon as training ends.

Semantics: the gradients equal those of ``loss.backward()`` on a standard PEFT model for the same batch, up
to float rounding (attention over chunks vs over the whole sequence).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import BaseModelNotServedError, FineTuneConfigError, FineTuneJobNotFoundError
from ...model import BASE_NAME
from ...utils.logits import softcap_logits
from ...utils.sizes import tensor_bytes
from ..engine.step import AttentionPlan, Segment, StepBatch, forward_step, packed_attention
from .budget import CoServeScheduler
from .jobs import (
    IGNORE,
    FineTuneJob,
    Hyperparameters,
    adapter_delta,
    base_fingerprint_of,
    batches,
    hyperparameters_from,
    init_lora,
    job_state,
    push_adapter,
    resolve_lora,
    save_adapter,
    tokenize_dataset,
)
from .state import SavedTensorMeter, TrainingBatch, TrainingRun, TrainingSeq, TrainingStep

logger = logging.getLogger(__name__)

POLICIES = ("coserve", "turns")
HEAD_CHUNK = 64  # tokens whose logits are materialised at once in the loss


class CoServingTrainer:
    """Runs fine-tuning jobs inside an ``Engine``'s steps (see the module docstring). One job runs at a time.

    Args:
        engine: the engine; the trainer attaches itself (``engine.trainer``).
        scheduler: the TPOT-SLO scheduler of the training share (``policy="coserve"``).
        policy: ``"coserve"`` (training tokens in the inference passes, within the SLO) or ``"turns"`` (naive
            turn-taking: one whole training step of its own after every engine step).

    >>> trainer = CoServingTrainer(engine, scheduler=CoServeScheduler(tpot_slo_ms=40))  # doctest: +SKIP
    >>> job = trainer.submit(lora=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), data=pairs,
    ...                      output_dir="ft/math", adapter_name="math-lora")  # doctest: +SKIP
    """

    def __init__(self, engine, *, scheduler: CoServeScheduler | None = None, policy: str = "coserve"):
        if policy not in POLICIES:
            raise FineTuneConfigError(f"policy must be one of {POLICIES}, got {policy!r}.")
        self.engine = engine
        self.scheduler = scheduler or CoServeScheduler()
        self.policy = policy
        self.jobs: dict[str, FineTuneJob] = {}
        self._queue: list[FineTuneJob] = []
        self._lock = threading.Lock()
        self._run: TrainingRun | None = None
        self.counters = {"steps": 0, "forward_tokens": 0, "backward_layers": 0, "optimizer_steps": 0,
                         "paused_steps": 0, "failed_forwards": 0}
        decoder = engine.model.base_model.get_decoder()
        self._decoder = decoder
        self._layers = list(decoder.layers)
        engine.attach_trainer(self)

    # -------------------------------------------------------------------------------------------- jobs
    def submit(self, *, lora: Any, data: Any, output_dir: str | Path, adapter_name: str | None = None,
               model: str | None = None, hyperparameters: Hyperparameters | Mapping[str, Any] | None = None,
               hub_model_id: str | None = None) -> FineTuneJob:
        """Queue a fine-tuning job; it starts at the next engine step once earlier jobs are done.

        Args:
            lora: a ``peft.LoraConfig`` (or a dict of its fields): target modules, ``r``, ``lora_alpha``.
            data: texts, ``{"prompt", "response"}`` pairs (loss on response tokens only) or a ``.jsonl`` path.
            output_dir: where checkpoints (``checkpoint-<step>``) and the final adapter (``final``) go.
            adapter_name: the name the trained adapter is served under (default ``ft-<job id>``).
            model: the base to fine-tune: the engine's base name (default) or ``"__base__"``.
            hyperparameters: ``Hyperparameters`` or a dict of its fields.
            hub_model_id: also push the final adapter to this Hub repo.

        Raises:
            BaseModelNotServedError: ``model`` is not this engine's base.
            FineTuneConfigError: bad LoRA config, empty dataset, bad hyperparameters or a taken adapter name.
        """
        engine = self.engine
        if model not in (None, engine.base_name, BASE_NAME):
            raise BaseModelNotServedError(
                f"Cannot fine-tune {model!r}: this engine serves the base {engine.base_name!r} (LoRA jobs train on "
                "the base only; a delta cannot be the base of a job). Use model={engine.base_name!r}.")
        hyper = (hyperparameters if isinstance(hyperparameters, Hyperparameters)
                 else hyperparameters_from(hyperparameters or {}))
        hyper.validate()
        spec = resolve_lora(lora, engine.model.base_model)
        examples = tokenize_dataset(data, engine.base_tokenizer, max_length=min(hyper.max_length,
                                                                                engine.max_model_len - 1))
        job = FineTuneJob(adapter_name="", base=engine.base_name, lora=spec, hyper=hyper, examples=examples,
                          output_dir=Path(output_dir), hub_model_id=hub_model_id)
        job.adapter_name = adapter_name or f"ft-{job.id.removeprefix('ftjob-')[:12]}"
        with self._lock:
            taken = set(engine.model_names()) | {j.adapter_name for j in self.jobs.values() if not j.finished}
            if job.adapter_name in taken or job.adapter_name == BASE_NAME:
                raise FineTuneConfigError(f"Adapter name {job.adapter_name!r} is already served or being trained; "
                                          "pick another adapter_name (suffix).")
            self.jobs[job.id] = job
            self._queue.append(job)
        logger.info("Fine-tuning job %s queued: %d sequences, %d steps, adapter %r", job.id, len(examples),
                    job.steps_total, job.adapter_name)
        engine.wake()
        return job

    def get(self, job_id: str) -> FineTuneJob:
        """The job ``job_id``; raises ``FineTuneJobNotFoundError``."""
        job = self.jobs.get(job_id)
        if job is None:
            raise FineTuneJobNotFoundError(f"No fine-tuning job {job_id!r}; known jobs: {sorted(self.jobs)[:10]}.")
        return job

    def list_jobs(self) -> list[FineTuneJob]:
        """Every job, newest first."""
        return sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)

    def cancel(self, job_id: str) -> FineTuneJob:
        """Stop a job at the next step boundary (a queued job at once); its checkpoints stay on disk."""
        job = self.get(job_id)
        with self._lock:
            if job.status == "queued" and job in self._queue:
                self._queue.remove(job)
                job._end("cancelled")
            elif not job.finished:
                job.cancel_requested = True
        self.engine.wake()
        return job

    def has_work(self) -> bool:
        """Whether a job is running or queued (the engine keeps stepping while so)."""
        return self._run is not None or bool(self._queue)

    # ------------------------------------------------------------------------------------- engine hooks
    def plan(self, *, inference_tokens: int, idle: bool) -> TrainingStep | None:
        """Called by the engine after scheduling inference: the training work of this step (``None``: no job)."""
        started = time.perf_counter()
        with torch.inference_mode(False):
            run = self._current()
            if run is None:
                return None
            peak = inference_tokens >= self.engine.config.max_batch_tokens
            budget = 0.0 if peak else self.scheduler.budget(inference_tokens, idle=idle)
            step = TrainingStep(inference_tokens, budget, started, self._layers)
            try:
                if run.batch is None:
                    run.batch = self._next_batch(run)
                if self.policy == "coserve" and run.batch is not None and not run.batch.forward_done:
                    self._fill_forward(run, step, self.scheduler.forward_tokens(budget))
            except Exception as err:
                self._fail(run, err)
                return None
        return step

    def finish(self, step: TrainingStep) -> None:
        """Called by the engine after the packed pass: bookkeeping, backward layers, optimizer step."""
        run = self._run
        if run is None:
            return
        with torch.inference_mode(False), torch.enable_grad():
            try:
                self._advance(run, step)
                if self.policy == "turns":
                    self._whole_step(run, step)
                elif run.batch is not None and run.batch.forward_done:
                    left = step.budget_s - self.scheduler.forward_seconds(step.num_tokens)
                    layers = self.scheduler.backward_layers(left, run.batch.tokens, run.batch.layer - run.lowest + 1)
                    for _ in range(layers):
                        self._backward_layer(run, run.batch, step)
                self.counters["steps"] += 1
                if not step.num_tokens and not step.backward_layers:
                    self.counters["paused_steps"] += 1
                if self.policy == "coserve":
                    self.scheduler.observe(step.inference_tokens, step.num_tokens, step.backward_tokens,
                                           step.backward_layers, time.perf_counter() - step.started)
                if run.batch is not None and run.batch.layer < run.lowest:
                    self._optimizer_step(run)
            except Exception as err:
                self._fail(run, err)

    def forward_failed(self, step: TrainingStep, err: BaseException) -> None:
        """The packed pass with this step's training tokens failed (inference is retried without them)."""
        step.error = err
        self.counters["failed_forwards"] += 1
        logger.warning("A co-served training chunk failed: %s", err)

    # ------------------------------------------------------------------------------------------- phases
    def _current(self) -> TrainingRun | None:
        run = self._run
        if run is not None and run.job.cancel_requested:
            self._stop(run)
            run.job._end("cancelled")
            logger.info("Fine-tuning job %s cancelled at step %d", run.job.id, len(run.job.history))
            run = None
        if run is None:
            with self._lock:
                job = self._queue.pop(0) if self._queue else None
            if job is None:
                return None
            try:
                run = self._start(job)
            except Exception as err:
                job._end("failed", str(err))
                logger.exception("Fine-tuning job %s could not start", job.id)
                return None
        return run

    def _start(self, job: FineTuneJob) -> TrainingRun:
        model = self.engine.model
        base = model.base_model
        weights = init_lora(job.lora, base, seed=job.hyper.seed, device=model.device, dtype=base.dtype)
        fingerprint = base_fingerprint_of(model)
        delta = adapter_delta(weights, job.lora, base, fingerprint)
        delta.weights = weights  # attach the trainable factors themselves, not the frozen copy
        active = model.routing.active
        model.add_delta(job.adapter_name, delta, ignore_base_mismatch=True)
        model.routing.active = active
        params = [t for w in weights.values() for t in (w.A, w.B)]
        h = job.hyper
        optimizer = torch.optim.AdamW(params, lr=h.learning_rate, betas=tuple(h.betas), eps=h.eps,
                                      weight_decay=h.weight_decay)
        names = {n: int(n.split(".layers.")[1].split(".")[0]) for n in weights}
        run = TrainingRun(job=job, weights=weights, optimizer=optimizer, slot=model.routing.slot_of(job.adapter_name),
                   lowest=min(names.values()), batches=batches(job.examples, h), fingerprint=fingerprint)
        job.status = "running"
        self._run = run
        logger.info("Fine-tuning job %s started (%s policy)", job.id, self.policy)
        return run

    def _next_batch(self, run: TrainingRun) -> TrainingBatch | None:
        examples = next(run.batches, None)
        if examples is None:
            self._complete(run)
            return None
        cfg = self.engine.model.config
        dtype = self.engine.model.base_model.dtype
        seqs = [TrainingSeq(f"train:{run.job.id}:{len(run.job.history)}:{i}", ex,
                     torch.zeros(len(self._layers), len(ex.inputs), cfg.hidden_size, dtype=dtype,
                                 device=self.engine.model.device))
                for i, ex in enumerate(examples)]
        segments = [Segment(s.key, 0, s.length, run.slot, cached=False, logits=False) for s in seqs]
        packed = StepBatch.pack(segments, [s.example.inputs for s in seqs], device=self.engine.model.device)
        targets = torch.tensor([t for s in seqs for t in s.example.targets], device=self.engine.model.device)
        return TrainingBatch(seqs, packed, targets, int((targets != IGNORE).sum()), layer=len(self._layers) - 1)

    def _fill_forward(self, run: TrainingRun, step: TrainingStep, budget_tokens: int) -> None:
        cache, sched = self.engine.cache, self.engine.scheduler
        headroom = sched.watermark + len(sched.running)
        for seq in run.batch.seqs:
            if budget_tokens <= 0:
                break
            left = seq.length - seq.done
            if not left:
                continue
            n = min(left, budget_tokens)
            whole = seq.done == 0 and n == left
            if not whole:  # a chunk: its keys/values stay in the cache for the sequence's next chunks
                need = cache.extra_blocks(seq.key, seq.done + n)
                if cache.free_blocks - need < headroom or not cache.reserve(seq.key, seq.done + n):
                    break  # KV is for inference first
                seq.cached = True
            step.segments.append(Segment(seq.key, seq.done, n, run.slot, cached=not whole, logits=False))
            step.tokens.append(seq.example.inputs[seq.done : seq.done + n])
            step.seqs.append(seq)
            budget_tokens -= n

    def _advance(self, run: TrainingRun, step: TrainingStep) -> None:
        if step.error is not None:
            if self.counters["failed_forwards"] >= 3:
                raise RuntimeError(f"co-served forward failed repeatedly: {step.error}")
            return
        for seg, seq in zip(step.segments, step.seqs, strict=True):
            seq.done += seg.length
            if seq.done == seq.length and seq.cached:
                self.engine.cache.release(seq.key)
        self.counters["forward_tokens"] += step.num_tokens

    def _whole_step(self, run: TrainingRun, step: TrainingStep) -> None:
        """Turn-taking: the whole batch's forward in a pass of its own, then every layer's backward."""
        batch = run.batch
        if batch is None:
            return
        if not batch.forward_done:
            own = TrainingStep(0, 0.0, step.started, self._layers, list(batch.packed.segments),
                               [s.example.inputs for s in batch.seqs], list(batch.seqs))
            with torch.no_grad(), own.capture(0):
                forward_step(self.engine.model, batch.packed, self.engine.cache)
            for seq in batch.seqs:
                seq.done = seq.length
            self.counters["forward_tokens"] += batch.tokens
        while batch.layer >= run.lowest:
            self._backward_layer(run, batch, step)

    def _backward_layer(self, run: TrainingRun, batch: TrainingBatch, step: TrainingStep) -> None:
        """Recompute decoder layer ``batch.layer`` from its saved input with grad and back-propagate through it."""
        model = self.engine.model
        base, routing = model.base_model, model.routing
        index = batch.layer
        last = index == len(self._layers) - 1
        x = torch.cat([s.saved[index] for s in batch.seqs])[None].requires_grad_(index > run.lowest)
        positions = batch.packed.positions[None]
        frozen = [*base.parameters(), *(t for w in run.weights.values() for t in (w.A, w.B))]
        meter = SavedTensorMeter(exclude=frozen)
        with routing.use(batch.packed.slots[None]):
            with meter, packed_attention(base.config, AttentionPlan(batch.packed, None)):
                out = self._layers[index](x, attention_mask=None, position_ids=positions,
                                          position_embeddings=self._decoder.rotary_emb(x, position_ids=positions))
                y = out[0] if isinstance(out, tuple) else out
                if last:
                    y = self._decoder.norm(y)  # the norm may be a delta-aware layer too: [1, T] routing
            if last:
                grad, batch.loss, head_bytes = self._head_loss(batch, y[0].detach(), frozen)
                y.backward(grad[None])
            else:
                head_bytes = 0
                y.backward(batch.grad)
        batch.peak_layer_bytes = max(batch.peak_layer_bytes, meter.bytes + head_bytes)
        batch.grad = x.grad if x.requires_grad else None
        batch.layer -= 1
        step.backward_layers += 1
        step.backward_tokens += batch.tokens
        self.counters["backward_layers"] += 1

    def _head_loss(self, batch: TrainingBatch, hidden: torch.Tensor,
                   frozen: list[torch.Tensor]) -> tuple[torch.Tensor, float, int]:
        """Output head + cross-entropy over ``HEAD_CHUNK`` tokens at a time (the logits of one chunk exist at
        once): the gradient w.r.t. the final hidden states, the batch loss and the most bytes saved by a chunk."""
        base, routing = self.engine.model.base_model, self.engine.model.routing
        grad = torch.zeros_like(hidden)
        total, peak = 0.0, 0
        for a in range(0, hidden.shape[0], HEAD_CHUNK):
            b = min(a + HEAD_CHUNK, hidden.shape[0])
            h = hidden[a:b].requires_grad_()
            with routing.use(batch.packed.slots[a:b]), SavedTensorMeter(exclude=frozen) as meter:
                logits = softcap_logits(base.get_output_embeddings()(h), base.config)
                loss = F.cross_entropy(logits.float(), batch.targets[a:b], ignore_index=IGNORE,
                                       reduction="sum") / batch.n_valid
            loss.backward()
            grad[a:b] = h.grad
            total += loss.detach().item()
            peak = max(peak, meter.bytes)
        return grad, total, peak

    def _optimizer_step(self, run: TrainingRun) -> None:
        batch, job, h = run.batch, run.job, run.job.hyper
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        if h.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, h.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        job.trained_tokens += batch.n_valid
        saved_inputs = tensor_bytes(s.saved for s in batch.seqs)
        job.history.append({"step": len(job.history) + 1, "loss": batch.loss, "tokens": batch.n_valid,
                            "time": time.perf_counter() - run.started, "wall": time.monotonic(),
                            "activation_bytes": saved_inputs + batch.peak_layer_bytes,
                            "saved_input_bytes": saved_inputs})
        self.counters["optimizer_steps"] += 1
        run.batch = None
        step = len(job.history)
        if h.checkpoint_every and step % h.checkpoint_every == 0 and step < job.steps_total:
            folder = job.output_dir / f"checkpoint-{step}"
            self._save(run, folder)
            job.checkpoints.append({"step": step, "path": str(folder), "loss": batch.loss})
        if step >= job.steps_total:
            self._complete(run)

    # ------------------------------------------------------------------------------------------ endings
    def _save(self, run: TrainingRun, folder: Path) -> None:
        base = self.engine.model.base_model
        save_adapter(adapter_delta(run.weights, run.job.lora, base, run.fingerprint), base, folder,
                     state=job_state(run.job))

    def _complete(self, run: TrainingRun) -> None:
        job = run.job
        self._save(run, job.final_dir)
        self._stop(run)
        self.engine.register_delta(job.adapter_name, job.final_dir)
        if job.hub_model_id:
            push_adapter(job.final_dir, job.hub_model_id)
        job._end("succeeded")
        logger.info("Fine-tuning job %s succeeded; serving adapter %r", job.id, job.adapter_name)

    def _stop(self, run: TrainingRun) -> None:
        """Detach the trainable adapter and free the job's KV blocks (the engine thread, between passes)."""
        if run.batch is not None:
            for seq in run.batch.seqs:
                self.engine.cache.release(seq.key)
        if run.job.adapter_name in self.engine.model.deltas:
            self.engine.model.delete_delta(run.job.adapter_name)
        for w in run.weights.values():
            w.A.requires_grad_(False)
            w.B.requires_grad_(False)
        self._run = None

    def _fail(self, run: TrainingRun, err: BaseException) -> None:
        logger.exception("Fine-tuning job %s failed", run.job.id, exc_info=err)
        self._stop(run)
        run.job._end("failed", f"{type(err).__name__}: {err}")

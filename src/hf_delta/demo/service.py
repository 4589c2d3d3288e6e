"""What the demo asks of the engine, without any UI: chat turns, side-by-side compares, stop.

Kept free of gradio so it can be tested (and reused) on its own. Every request is greedy (temperature 0):
the same prompt always gets the same answer, equal to ``hf_delta.evaluation.greedy_generate``'s.

How a message becomes a prompt depends on the model (``prompt_mode``):

* ``"chat"``: the model carries a chat template of its own (one that differs from the base's, e.g. a chat
  fine-tune with new role tokens): the whole conversation goes through that template;
* ``"raw"``: the base, and fine-tunes that share the base's tokenizer (task fine-tunes such as
  ``llama-arith``): the latest message alone is the prompt, continued as text (e.g. ``add 3 to 1 2 3 4 =``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DeltaNotFoundError, InvalidRequestError
from ..serving.engine.engine import Engine
from ..serving.engine.handles import GenerationResult, RequestHandle
from ..serving.engine.sampling import SamplingParams
from .zerogpu import Runner

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    """One model's answer in a compare, with its timings (seconds)."""

    model: str
    text: str
    finish_reason: str
    completion_tokens: int
    latency: float
    ttft: float | None
    first_token_at: float | None = None  # engine clock (time.monotonic) when its first token was sampled
    finished_at: float | None = None
    error: str | None = None


@dataclass
class Comparison:
    """The answers of several models to one prompt, and how the engine batched them."""

    prompt: str
    answers: list[Answer]
    engine_steps: int
    one_batch: bool  # all requests were decoding at the same time: their rows shared the engine's forward passes
    same_step: bool  # and every first token was sampled in the same step (admitted into the batch together)
    wall: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "engine_steps": self.engine_steps, "one_batch": self.one_batch,
            "same_step": self.same_step, "wall_s": round(self.wall, 4),
            "answers": [{"model": a.model, "text": a.text, "finish_reason": a.finish_reason,
                         "completion_tokens": a.completion_tokens, "latency_s": round(a.latency, 4),
                         "ttft_s": None if a.ttft is None else round(a.ttft, 4), "error": a.error}
                        for a in self.answers],
        }


def message_text(content: Any) -> str:
    """The text of a chat message's content as Gradio hands it over (a string, or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, Sequence):
        return "".join(message_text(part) for part in content)
    return str(content)


class DemoService:
    """Chat and compare requests over a running ``Engine``.

    Args:
        engine: the engine (its background loop must be started for streaming, unless ``runner`` is given).
        max_tokens: most tokens per reply.
        runner: runs a list of requests to the end and returns their results (``zerogpu.gpu_runner()`` on
            ZeroGPU, where the engine steps inside ``@spaces.GPU`` calls); replies then come whole, not streamed.
    """

    def __init__(self, engine: Engine, *, max_tokens: int = 64, runner: Runner | None = None):
        self.engine = engine
        self.max_tokens = max_tokens
        self.runner = runner
        self._modes: dict[str, str] = {}
        self._active: dict[str, set[str]] = {}  # session → request ids streaming now
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- models
    def model_names(self) -> list[str]:
        return self.engine.model_names()

    def check_model(self, model: Any) -> str:
        """``model`` if it is served; else ``DeltaNotFoundError`` listing the served ones."""
        if not isinstance(model, str) or not model.strip():
            raise DeltaNotFoundError(f"Pick a model first; served models: {self.model_names()}.")
        if model not in self.model_names():
            self.engine.resolve_model(model)  # "__base__" is fine; anything else raises with the served names
        return model

    def prompt_mode(self, model: str) -> str:
        """``"chat"`` when ``model`` has a chat template of its own (not the base's), else ``"raw"``."""
        model = self.check_model(model)
        if model not in self._modes:
            base_template = self.engine.base_tokenizer.chat_template
            own = self.engine.tokenizer_for(model).chat_template
            is_base = self.engine.resolve_model(model) == self.engine.resolve_model(self.engine.base_name)
            self._modes[model] = "chat" if own and not is_base and own != base_template else "raw"
        return self._modes[model]

    # ---------------------------------------------------------------------------------------- prompts
    def _fit(self, model: str, prompt: str, *, chat: bool) -> list[int]:
        ids = self.engine.encode(model, prompt, add_special_tokens=not chat)
        self.engine.check_length(len(ids), self.max_tokens)
        return ids

    def build_prompt(self, model: str, message: str, history: Sequence[Mapping[str, Any]] = ()) -> tuple[str,
                                                                                                          list[int]]:
        """The prompt text and token ids for ``message`` after ``history`` (oldest turns are dropped when the
        conversation outgrows the context; a message that cannot fit by itself raises ``InvalidRequestError``)."""
        if not isinstance(message, str) or not message.strip():
            raise InvalidRequestError("The message is empty: type something to send.")
        if self.prompt_mode(model) == "raw":
            return message, self._fit(model, message, chat=False)
        turns = [{"role": m["role"], "content": message_text(m.get("content"))} for m in history
                 if m.get("role") in ("user", "assistant", "system") and message_text(m.get("content"))]
        while True:
            prompt = self.engine.render_chat(model, [*turns, {"role": "user", "content": message}])
            try:
                return prompt, self._fit(model, prompt, chat=True)
            except InvalidRequestError:
                if not turns:
                    raise
                turns = turns[2:] if len(turns) > 1 else []  # drop the oldest exchange and try again

    # ------------------------------------------------------------------------------------------- chat
    def _params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=0.0)

    def stream_reply(self, model: str, message: str, history: Sequence[Mapping[str, Any]] = (), *,
                     session: str | None = None) -> Iterator[str]:
        """Yield the reply so far after each new piece of text (greedy). ``stop(session)`` ends it early."""
        _, ids = self.build_prompt(model, message, history)
        if self.runner is not None:
            (result,) = self.runner(self.engine, [(model, ids, self._params())])
            if isinstance(result, Exception):
                raise result
            yield result.text
            return
        handle = self.engine.submit(model, ids, params=self._params())
        self._track(session, handle, add=True)
        text = ""
        try:
            for chunk in handle:
                if chunk.error is not None:
                    raise chunk.error
                if chunk.text:
                    text += chunk.text
                    yield text
            yield text
        finally:
            self._track(session, handle, add=False)
            if not handle.done:  # the consumer went away (stop button, closed tab): free the engine's work
                self.engine.abort(handle.request_id)

    def reply(self, model: str, message: str, history: Sequence[Mapping[str, Any]] = ()) -> str:
        """The whole reply (no streaming)."""
        text = ""
        for partial in self.stream_reply(model, message, history):
            text = partial
        return text

    def _track(self, session: str | None, handle: RequestHandle, *, add: bool) -> None:
        if session is None:
            return
        with self._lock:
            ids = self._active.setdefault(session, set())
            if add:
                ids.add(handle.request_id)
            else:
                ids.discard(handle.request_id)

    def stop(self, session: str | None) -> int:
        """Abort the requests ``session`` is streaming; returns how many."""
        with self._lock:
            ids = list(self._active.get(session or "", ()))
        for request_id in ids:
            self.engine.abort(request_id)
        return len(ids)

    # ---------------------------------------------------------------------------------------- compare
    def compare(self, models: Sequence[str], prompt: str) -> Comparison:
        """Answer ``prompt`` with every model in ``models`` at once: all requests are queued back to back, so the
        engine decodes them as one mixed batch (one forward pass per step, one delta per row).

        ``Comparison.one_batch`` says whether they really shared the forward passes (every request was decoding
        while every other one was); ``same_step`` whether all of them were also admitted in the same step.
        """
        models = list(dict.fromkeys(models or []))
        if not models:
            raise InvalidRequestError("Choose at least one model to compare.")
        for model in models:
            self.check_model(model)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("The prompt is empty: type something to compare.")
        prepared = []
        for model in models:  # tokenize and check everything first: either all requests run or none does
            try:
                prepared.append((model, self.build_prompt(model, prompt)[1]))
            except InvalidRequestError as err:
                raise InvalidRequestError(f"{model}: {err}") from err
        params = self._params()
        steps_before = self.engine.counters["steps"]
        start = time.perf_counter()
        if self.runner is not None:
            outcomes = self.runner(self.engine, [(model, ids, params) for model, ids in prepared])
        else:
            handles = [self.engine.submit(model, ids, params=params) for model, ids in prepared]
            outcomes = [_outcome(handle) for handle in handles]
        answers = []
        for (model, _), result in zip(prepared, outcomes, strict=True):
            if isinstance(result, Exception):  # e.g. a delta that cannot load: only its own answer fails
                answers.append(Answer(model=model, text="", finish_reason="error", completion_tokens=0,
                                      latency=time.perf_counter() - start, ttft=None, error=str(result)))
                continue
            t = result.timing
            answers.append(Answer(model=model, text=result.text, finish_reason=result.finish_reason,
                                  completion_tokens=result.completion_tokens,
                                  latency=(t.get("finished") or time.monotonic()) - t.get("arrival", 0.0),
                                  ttft=t.get("ttft"), first_token_at=t.get("first_token"),
                                  finished_at=t.get("finished")))
        wall = time.perf_counter() - start
        served = [a for a in answers if a.error is None and a.first_token_at is not None and a.finished_at]
        complete = len(served) == len(answers)
        together = complete and max(a.first_token_at for a in served) <= min(a.finished_at for a in served)
        same_step = complete and len({a.first_token_at for a in served}) == 1
        return Comparison(prompt=prompt, answers=answers, engine_steps=self.engine.counters["steps"] - steps_before,
                          one_batch=together, same_step=same_step, wall=wall)


def _outcome(handle: RequestHandle) -> GenerationResult | Exception:
    """The handle's result, or the exception its request failed with."""
    try:
        return handle.result()
    except Exception as err:
        return err

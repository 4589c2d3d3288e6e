"""The OpenAI-compatible request bodies the server accepts (pydantic validates them: bad JSON or types → 422).

Every parameter is either honoured or refused with a 400 that names it; none is accepted and ignored. A field
nobody declared is refused too (``app.create_app`` turns pydantic's ``extra_forbidden`` into a 400 naming it).
Fields OpenAI defines that this server cannot honour are declared here so that they get a specific message
(``_REFUSED``); a few of them are harmless at their neutral value (``tool_choice="none"``, ``store=false``, ...).
``user``, ``safety_identifier`` and ``prompt_cache_key`` are accepted: they tag a request for the provider and do
not change its output (nor do they at OpenAI). The table of every parameter is in ``docs/serving.md``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...errors import InvalidRequestError
from ..engine.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 64  # choices per prompt

# OpenAI parameters this server refuses: name → (values that change nothing and are accepted, why it is refused).
_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": (([],), "function calling is not supported"),
    "tool_choice": (("none",), "function calling is not supported"),
    "functions": (([],), "function calling is not supported"),
    "function_call": (("none",), "function calling is not supported"),
    "parallel_tool_calls": ((True, False), "function calling is not supported"),
    "audio": ((), "audio output is not supported"),
    "modalities": ((["text"],), "only text output is supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "this server runs no reasoning models"),
    "verbosity": ((), "this server has no verbosity setting"),
    "web_search_options": ((), "web search is not supported"),
    "service_tier": (("auto", "default"), "this server has one service tier"),
    "store": ((False,), "completions are not stored"),
    "metadata": (({},), "completions are not stored, so there is nothing to tag"),
    "suffix": (("",), "insertion (a suffix after the completion) is not supported"),
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Extensions (as in vLLM): top-k sampling, repetition penalty, a minimum length and fixed-length outputs.
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = False
    # Refused (see _REFUSED); declared so that the 400 says why.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None

    def _checks(self) -> None:
        for name, (neutral, why) in _REFUSED.items():
            value = getattr(self, name, None)
            if value is not None and value not in neutral:
                raise InvalidRequestError(f"{name}={value!r} is not supported: {why}. Remove {name} from the request.")
        if not 1 <= (self.n or 1) <= MAX_N:
            raise InvalidRequestError(f"n must be in [1, {MAX_N}], got {self.n}.")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise InvalidRequestError("At most 16 stop strings are allowed.")
        kind = (self.response_format or {"type": "text"}).get("type")
        if kind != "text":
            raise InvalidRequestError(f"response_format type {kind!r} is not supported: this server does not "
                                      "constrain outputs to JSON. Omit response_format or use {'type': 'text'}, "
                                      "and ask for JSON in the prompt.")

    def _logit_bias(self) -> dict[int, float]:
        try:
            return {int(token): bias for token, bias in (self.logit_bias or {}).items()}
        except ValueError:
            raise InvalidRequestError(f"logit_bias keys must be token ids (integers as strings), got "
                                      f"{sorted(self.logit_bias)}.") from None

    def sampling(self, max_tokens: int, *, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        """``SamplingParams`` for this request; raises ``InvalidRequestError`` for out-of-range values."""
        self._checks()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=self.stop or (),
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self._logit_bias(),
            min_tokens=self.min_tokens or 0,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("The prompt is empty.")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def checks(self) -> None:
        self._checks()
        if self.best_of not in (None, self.n or 1):
            raise InvalidRequestError(f"best_of={self.best_of} is not supported: each of the n choices is returned "
                                      "(best_of must be absent or equal n).")

    def completion_sampling(self) -> SamplingParams:
        """``SamplingParams`` of each choice; ``echo`` with ``logprobs`` also scores the prompt (and ``echo`` with
        ``max_tokens=0`` only does that)."""
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        prompt = self.logprobs if self.echo else None
        if self.echo and max_tokens == 0 and prompt is None:
            prompt = 0  # the engine runs a prompt alone only to score it
        return self.sampling(max_tokens, logprobs=self.logprobs, prompt_logprobs=prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # refused with a message naming the part's field, in as_text

    type: str
    text: str | None = None

    def as_text(self) -> str:
        if self.type != "text":
            raise InvalidRequestError(f"Content parts of type {self.type!r} are not supported; send text parts only.")
        if self.model_extra:
            raise InvalidRequestError(f"Text content parts take 'type' and 'text' only; remove "
                                      f"{sorted(self.model_extra)}.")
        return self.text or ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # given to the chat template, which may use it
    # Refused when set: tool calls and their results (no function calling); neutral when None.
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None

    def as_dict(self) -> dict[str, str]:
        for field in ("tool_calls", "tool_call_id", "function_call", "refusal", "audio"):
            if getattr(self, field) is not None:
                raise InvalidRequestError(f"messages with {field!r} are not supported (no function calling or "
                                          f"audio); remove {field!r} from the message.")
        content = self.content
        if isinstance(content, list):
            content = "".join(part.as_text() for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None

    def checks(self) -> None:
        self._checks()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true.")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}.")

    def chat_sampling(self, max_tokens: int) -> SamplingParams:
        """``SamplingParams`` of each choice."""
        return self.sampling(max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

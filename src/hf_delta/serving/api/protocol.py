"""The OpenAI-compatible request bodies the server accepts (pydantic validates them: bad JSON or types → 422)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...errors import InvalidRequestError
from ..engine.sampling import SamplingParams


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # Extensions (as in vLLM): top-k sampling and fixed-length outputs.
    top_k: int | None = None
    ignore_eos: bool | None = False

    def _checks(self) -> None:
        if (self.n or 1) != 1:
            raise InvalidRequestError(f"n={self.n} is not supported; send one request per completion (n=1).")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise InvalidRequestError("At most 16 stop strings are allowed.")

    def sampling(self, max_tokens: int) -> SamplingParams:
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
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None

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
        if self.echo:
            raise InvalidRequestError("echo=true is not supported.")
        if self.logprobs:
            raise InvalidRequestError("logprobs are not supported.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise InvalidRequestError("Only text content parts are supported.")
            content = "".join(part.text or "" for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False

    def checks(self) -> None:
        self._checks()
        if self.logprobs:
            raise InvalidRequestError("logprobs are not supported.")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

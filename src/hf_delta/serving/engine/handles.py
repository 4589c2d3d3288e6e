"""What a caller holds for a submitted request: a stream of chunks, usable from threads or from asyncio."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from .logits import TokenLogprob


@dataclass
class GenerationChunk:
    """New text of one request (and the token ids behind it); the last chunk has ``finish_reason`` set.

    ``finish_reason``: ``"stop"`` (end-of-sequence token or stop string), ``"length"`` (max_tokens or the
    context), ``"abort"`` (cancelled) or ``"error"`` (``error`` says why; other requests are unaffected).
    ``logprobs``: one entry per id of ``token_ids`` when the request asked for them. ``prompt_logprobs``: on
    the request's first chunk when it asked for them, one entry per prompt token (``None`` for the first).
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: BaseException | None = None
    timing: dict[str, Any] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationResult:
    """A finished request: its text, token ids, why it stopped, token counts and timings; the log-probabilities
    of its tokens (and of its prompt's) when it asked for them."""

    request_id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timing: dict[str, Any] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class RequestHandle:
    """Chunks of one request as the engine produces them.

    Iterate it from a thread (``for chunk in handle``), or with ``async for`` when it was submitted with
    ``loop=`` the running event loop; ``result()`` / ``await aresult()`` wait for the whole text.
    """

    def __init__(self, request_id: str, model: str, prompt_tokens: int, *, loop: asyncio.AbstractEventLoop | None
                 = None):
        self.request_id = request_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._chunks: list[GenerationChunk] = []
        self.done = False

    def _push(self, chunk: GenerationChunk) -> None:
        """Called by the engine thread."""
        self.done = self.done or chunk.finished
        if self._loop is None:
            self._queue.put(chunk)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
        except RuntimeError:  # the loop is closed: the client is gone
            pass

    def __iter__(self) -> Iterator[GenerationChunk]:
        if self._loop is not None:
            raise TypeError("This handle was submitted with an event loop; use `async for`.")
        while True:
            chunk = self._queue.get()
            yield chunk
            if chunk.finished:
                return

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        if self._loop is None:
            raise TypeError("This handle was submitted without an event loop; iterate it from a thread.")
        while True:
            chunk = await self._queue.get()
            yield chunk
            if chunk.finished:
                return

    def _collect(self, chunks: list[GenerationChunk]) -> GenerationResult:
        last = chunks[-1]
        if last.error is not None:
            raise last.error
        ids = [t for c in chunks for t in c.token_ids]
        logprobs = None if last.logprobs is None else [e for c in chunks for e in c.logprobs or ()]
        prompt = next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None)
        return GenerationResult(self.request_id, self.model, "".join(c.text for c in chunks), ids,
                                last.finish_reason, self.prompt_tokens, last.timing.get("completion_tokens", len(ids)),
                                last.timing, logprobs, prompt)

    def result(self) -> GenerationResult:
        """Block until the request finishes; raises the request's error if it failed."""
        return self._collect(list(self))

    async def aresult(self) -> GenerationResult:
        return self._collect([c async for c in self])

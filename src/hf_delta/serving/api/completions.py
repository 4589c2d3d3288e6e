"""The inference routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/stats``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (both with SSE streaming). The ``model`` field of a request picks the delta (or
the base). Each choice (``n`` per prompt) is one engine request; every request runs in the shared engine and
one that fails never affects the others. Streams carry the same ``logprobs`` as whole answers, chunk by chunk."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..engine.engine import Engine
from ..engine.handles import GenerationChunk, RequestHandle
from ..engine.sampling import SamplingParams
from .errors import SSE_DONE, error_event, from_exception
from .logprobs import TokenStrings, chat_logprobs, completion_logprobs, merge_completion_logprobs
from .protocol import ChatCompletionRequest, CompletionRequest


def completions_router(engine: Engine) -> APIRouter:
    """The inference routes over ``engine``."""
    app = APIRouter()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if engine.is_running else "stopped", "models": len(engine.model_names()),
                "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": now, "owned_by": "hf_delta"}
                                           for name in engine.model_names()]}

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        choices: list[_Choice] = []
        try:
            engine.resolve_model(body.model)
            body.checks()
            params = body.completion_sampling()
            prompts = body.prompts()
            encoded = [await run_in_threadpool(engine.encode, body.model, p) for p in prompts]
            for ids in encoded:
                engine.check_length(len(ids), params.max_tokens)
            tokenizer = engine.tokenizer_for(body.model)
            loop = asyncio.get_running_loop()
            for prompt, ids in zip(prompts, encoded, strict=True):
                echo = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) if body.echo else None
                for i in range(body.n or 1):
                    handle = engine.submit(body.model, ids, params=_nth(params, i), loop=loop)
                    choices.append(_Choice(handle, ids, echo))
        except Exception as err:
            _abort(engine, choices)
            return from_exception(err)
        return await _respond(engine, choices, body, TokenStrings(tokenizer), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        choices: list[_Choice] = []
        try:
            engine.resolve_model(body.model)
            body.checks()
            text = await run_in_threadpool(engine.render_chat, body.model, [m.as_dict() for m in body.messages])
            ids = await run_in_threadpool(engine.encode, body.model, text, add_special_tokens=False)
            requested = body.requested_max_tokens
            max_tokens = requested if requested is not None else max(1, engine.max_total_tokens - len(ids))
            params = body.chat_sampling(max_tokens)
            engine.check_length(len(ids), params.max_tokens)
            loop = asyncio.get_running_loop()
            for i in range(body.n or 1):
                handle = engine.submit(body.model, ids, params=_nth(params, i), loop=loop, add_special_tokens=False)
                choices.append(_Choice(handle, ids, None))
        except Exception as err:
            _abort(engine, choices)
            return from_exception(err)
        return await _respond(engine, choices, body, TokenStrings(engine.tokenizer_for(body.model)), chat=True)
    return app


@dataclass
class _Choice:
    """One choice of an answer: its request, its prompt's ids, and the prompt text it echoes (``echo``)."""

    handle: RequestHandle
    prompt_ids: list[int]
    echo: str | None


def _nth(params: SamplingParams, i: int) -> SamplingParams:
    """The parameters of a prompt's ``i``-th choice: a seeded request's choices get seeds ``seed, seed+1, ...``
    (the same seed would give ``n`` equal samples)."""
    return params if i == 0 or params.seed is None else replace(params, seed=params.seed + i)


def _abort(engine: Engine, choices: list[_Choice]) -> None:
    for choice in choices:
        engine.abort(choice.handle.request_id)


def _usage(choices: list[_Choice], completion_tokens: int, n: int) -> dict[str, int]:
    prompt = sum(len(c.prompt_ids) for c in choices[::n])  # a prompt counts once, however many choices it has
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def _prompt_logprobs(strings: TokenStrings, choice: _Choice, entries) -> tuple[dict[str, Any], int]:
    return completion_logprobs(strings, choice.prompt_ids, entries or [None] * len(choice.prompt_ids))


async def _respond(engine: Engine, choices: list[_Choice], body, strings: TokenStrings, *, chat: bool):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        return await _stream(engine, choices, body, strings, rid, created, chat=chat)
    try:
        results = [await c.handle.aresult() for c in choices]
    except Exception as err:
        _abort(engine, choices)
        return from_exception(err)
    answers = []
    for i, (choice, r) in enumerate(zip(choices, results, strict=True)):
        if chat:
            logprobs = chat_logprobs(strings, r.logprobs) if body.logprobs else None
            answers.append({"index": i, "message": {"role": "assistant", "content": r.text},
                            "finish_reason": r.finish_reason, "logprobs": logprobs})
            continue
        logprobs, offset = None, 0
        if body.logprobs is not None and choice.echo is not None:
            logprobs, offset = _prompt_logprobs(strings, choice, r.prompt_logprobs)
        if body.logprobs is not None:
            generated, _ = completion_logprobs(strings, r.token_ids, r.logprobs, offset)
            logprobs = generated if logprobs is None else merge_completion_logprobs(logprobs, generated)
        answers.append({"index": i, "text": (choice.echo or "") + r.text, "finish_reason": r.finish_reason,
                        "logprobs": logprobs})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": answers,
            "usage": _usage(choices, sum(r.completion_tokens for r in results), body.n or 1)}


async def _merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Chunks of several handles as they come, tagged with the handle's index."""
    if len(handles) == 1:
        async for chunk in handles[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
        async for chunk in h:
            await queue.put((i, chunk))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        for _ in range(len(handles)):
            while True:
                i, chunk = await queue.get()
                yield i, chunk
                if chunk.finished:
                    break
    finally:
        for t in tasks:
            t.cancel()


async def _stream(engine: Engine, choices: list[_Choice], body, strings: TokenStrings, rid: str, created: int, *,
                  chat: bool):
    chunks = _merged([c.handle for c in choices])
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:  # pragma: no cover - a handle always ends with a finished chunk
        first = None
    if first is not None and first[1].error is not None and len(choices) == 1:
        return from_exception(first[1].error)  # failed before any output: a plain HTTP error
    kind = "chat.completion.chunk" if chat else "text_completion"
    offsets = [0] * len(choices)  # completions: characters sent so far per choice (their logprobs' text_offset)
    started = [False] * len(choices)

    def frame(i: int, chunk: GenerationChunk | None) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if chunk is None else {}
            if chunk is not None and chunk.text:
                delta["content"] = chunk.text
            logprobs = chat_logprobs(strings, chunk.logprobs) if chunk is not None and body.logprobs else None
            choice = {"index": i, "delta": delta, "finish_reason": chunk and chunk.finish_reason, "logprobs": logprobs}
        else:
            text, logprobs = chunk.text, None
            echo = choices[i].echo if not started[i] else None
            if body.logprobs is not None:
                if echo is not None:
                    logprobs, offsets[i] = _prompt_logprobs(strings, choices[i], chunk.prompt_logprobs)
                generated, offsets[i] = completion_logprobs(strings, chunk.token_ids, chunk.logprobs or [], offsets[i])
                logprobs = generated if logprobs is None else merge_completion_logprobs(logprobs, generated)
            choice = {"index": i, "text": (echo or "") + text, "finish_reason": chunk.finish_reason,
                      "logprobs": logprobs}
            started[i] = True
        payload = {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        done: list[GenerationChunk] = []
        try:
            if chat:
                for i in range(len(choices)):
                    yield frame(i, None)
            pending = [first] if first is not None else []
            while True:
                if pending:
                    i, chunk = pending.pop()
                else:
                    try:
                        i, chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                if chunk.error is not None:
                    yield error_event(chunk.error)
                    return
                if chunk.text or chunk.finished or (choices[i].echo is not None and not started[i]):
                    yield frame(i, chunk)
                if chunk.finished:
                    done.append(chunk)
            if body.include_usage:
                usage = _usage(choices, sum(c.timing.get("completion_tokens", 0) for c in done), body.n or 1)
                yield f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': body.model, 'choices': [], 'usage': usage})}\n\n"  # noqa: E501
            yield SSE_DONE
        finally:
            _abort(engine, [c for c in choices if not c.handle.done])

    return StreamingResponse(events(), media_type="text/event-stream")

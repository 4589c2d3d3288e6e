"""The inference routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/stats``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (both with SSE streaming). The ``model`` field of a request picks the delta (or
the base). Every request runs in the shared engine; one that fails never affects the others."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..engine.engine import Engine
from ..engine.handles import GenerationChunk, RequestHandle
from .errors import SSE_DONE, error_event, from_exception
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
        try:
            engine.resolve_model(body.model)
            body.checks()
            max_tokens = 16 if body.max_tokens is None else body.max_tokens
            params = body.sampling(max_tokens)
            prompts = [await run_in_threadpool(engine.encode, body.model, p) for p in body.prompts()]
            for ids in prompts:
                engine.check_length(len(ids), params.max_tokens)
            loop = asyncio.get_running_loop()
            handles = [engine.submit(body.model, ids, params=params, loop=loop) for ids in prompts]
        except Exception as err:
            return from_exception(err)
        return await _respond(engine, handles, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        try:
            engine.resolve_model(body.model)
            body.checks()
            text = await run_in_threadpool(engine.render_chat, body.model, [m.as_dict() for m in body.messages])
            ids = await run_in_threadpool(engine.encode, body.model, text, add_special_tokens=False)
            requested = body.requested_max_tokens
            max_tokens = requested if requested is not None else max(1, engine.max_total_tokens - len(ids))
            params = body.sampling(max_tokens)
            engine.check_length(len(ids), params.max_tokens)
            handles = [engine.submit(body.model, ids, params=params, loop=asyncio.get_running_loop(),
                                     add_special_tokens=False)]
        except Exception as err:
            return from_exception(err)
        return await _respond(engine, handles, body, chat=True)
    return app


async def _respond(engine: Engine, handles: list[RequestHandle], body, *, chat: bool):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        return await _stream(engine, handles, body, rid, created, chat=chat)
    try:
        results = [await h.aresult() for h in handles]
    except Exception as err:
        for h in handles:
            engine.abort(h.request_id)
        return from_exception(err)
    choices = []
    for i, r in enumerate(results):
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": r.text},
                            "finish_reason": r.finish_reason, "logprobs": None})
        else:
            choices.append({"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": choices, "usage": _usage(results)}


def _usage(results) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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


async def _stream(engine: Engine, handles: list[RequestHandle], body, rid: str, created: int, *, chat: bool):
    chunks = _merged(handles)
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:  # pragma: no cover - a handle always ends with a finished chunk
        first = None
    if first is not None and first[1].error is not None and len(handles) == 1:
        return from_exception(first[1].error)  # failed before any output: a plain HTTP error
    kind = "chat.completion.chunk" if chat else "text_completion"

    def frame(i: int, text: str | None, finish: str | None, *, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
        payload = {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        done: list[GenerationChunk] = []
        try:
            if chat:
                for i in range(len(handles)):
                    yield frame(i, None, None, role=True)
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
                if chunk.text or chunk.finished:
                    yield frame(i, chunk.text, chunk.finish_reason)
                if chunk.finished:
                    done.append(chunk)
            if body.include_usage:
                prompt = sum(h.prompt_tokens for h in handles)
                completion = sum(c.timing.get("completion_tokens", 0) for c in done)
                usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
                yield f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': body.model, 'choices': [], 'usage': usage})}\n\n"  # noqa: E501
            yield SSE_DONE
        finally:
            for h in handles:
                if not h.done:
                    engine.abort(h.request_id)

    return StreamingResponse(events(), media_type="text/event-stream")

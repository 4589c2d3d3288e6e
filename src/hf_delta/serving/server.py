"""An OpenAI-compatible HTTP server over an ``Engine`` (FastAPI + uvicorn).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
with SSE streaming), ``GET /v1/stats``, and the fine-tuning jobs API (``finetune_routes.py``). The ``model``
field of a request picks the delta (or the base).

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: unknown model → 404 (the message
lists the served ones), prompt/context/``max_tokens`` limits and unsupported options → 400, malformed JSON or
wrong types → 422, missing/wrong API key → 401, a delta whose repo cannot be loaded → 500 for its own
requests only. Every request runs in the shared engine; one that fails never affects the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import DeltaLoadError, DeltaNotFoundError, InvalidRequestError
from .engine import Engine
from .handles import GenerationChunk, RequestHandle
from .protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)
SSE_DONE = "data: [DONE]\n\n"  # the closing event of every stream


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def _from_exception(err: BaseException) -> JSONResponse:
    if isinstance(err, DeltaNotFoundError):
        return _error(404, str(err), "invalid_request_error", "model_not_found")
    if isinstance(err, InvalidRequestError):
        return _error(400, str(err), "invalid_request_error")
    if isinstance(err, DeltaLoadError):
        return _error(500, str(err), "delta_load_error")
    logger.error("Request failed: %r", err)
    return _error(500, f"The request failed: {err}", "server_error")


def _error_event(err: BaseException) -> str:
    kind = "delta_load_error" if isinstance(err, DeltaLoadError) else "server_error"
    return f"data: {json.dumps({'error': {'message': str(err), 'type': kind, 'param': None, 'code': None}})}\n\n"


def authorized(authorization: str, api_key: str | None) -> bool:
    """Whether an ``Authorization`` header value carries ``api_key`` (always true when no key is set)."""
    return not api_key or secrets.compare_digest(authorization.encode(), f"Bearer {api_key}".encode())


def unauthorized() -> JSONResponse:
    """The 401 answer to a request without the right API key."""
    return _error(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.", "invalid_request_error",
                  "invalid_api_key")


def create_app(engine: Engine, *, api_key: str | None = None,
               fine_tuning_dir: str | Path | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (its thread is started and stopped with the app).

    ``fine_tuning_dir`` is where fine-tuning jobs write (default ``~/.cache/hf_delta/fine_tuning``); a request's
    ``output_dir`` is a folder inside it.
    """
    owns_thread = not engine.is_running

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            if owns_thread:
                engine.stop()

    app = FastAPI(title="hf_delta", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error(422, f"Invalid request body: {problems}", "invalid_request_error")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith("/v1/") and not authorized(request.headers.get("authorization", ""), api_key):
            return unauthorized()
        return await call_next(request)

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
            return _from_exception(err)
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
            return _from_exception(err)
        return await _respond(engine, handles, body, chat=True)

    from .finetune_routes import add_fine_tuning_routes

    add_fine_tuning_routes(app, engine, output_root=fine_tuning_dir)
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
        return _from_exception(err)
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
        return _from_exception(first[1].error)  # failed before any output: a plain HTTP error
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
                    yield _error_event(chunk.error)
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


class ServerThread:
    """Run ``app`` with uvicorn in a background thread (tests, notebooks); ``port=0`` picks a free port.

    >>> with ServerThread(create_app(engine)) as server:  # doctest: +SKIP
    ...     print(server.url)
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="hf-delta-server", daemon=True)
        self.host = host

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("The hf_delta server did not start; see the log above.")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

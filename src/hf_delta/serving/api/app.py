"""An OpenAI-compatible HTTP server over an ``Engine`` (FastAPI + uvicorn).

``create_app`` mounts the inference routes (``completions.py``: ``GET /health``, ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/stats``) and the fine-tuning jobs API
(``fine_tuning.py``), whose trainer it attaches to the engine when the app is created. Error bodies and status
codes: ``errors.py``; the request-body limit: ``limits.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..engine.engine import Engine
from ..training.trainer import CoServingTrainer
from .completions import completions_router
from .errors import authorized, error_response, unauthorized
from .fine_tuning import fine_tuning_router
from .limits import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware

logger = logging.getLogger(__name__)


def create_app(engine: Engine, *, api_key: str | None = None, fine_tuning_dir: str | Path | None = None,
               fine_tuning: bool = True, trainer: CoServingTrainer | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``engine`` (its thread is started and stopped with the app).

    Args:
        engine: the engine every route runs in.
        api_key: require ``Authorization: Bearer <api_key>`` on ``/v1/*``.
        fine_tuning_dir: where fine-tuning jobs write (default ``~/.cache/hf_delta/fine_tuning``); a request's
            ``output_dir`` is a folder inside it.
        fine_tuning: mount the fine-tuning jobs API. Its trainer (``trainer``, else the engine's own, else a new
            ``CoServingTrainer``) is attached to ``engine`` here; it adds no work to the steps until a job
            is submitted.
        trainer: the ``CoServingTrainer`` running the jobs.
        max_body_bytes: larger request bodies are answered with 413 before they are read whole or parsed.
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
        unknown = [".".join(str(x) for x in e.get("loc", ())[1:]) for e in exc.errors() if e.get("type") ==
                   "extra_forbidden"]
        if unknown:  # a parameter this server does not know: 400 naming it, never silently ignored
            return error_response(400, f"Unsupported parameter(s): {', '.join(repr(u) for u in unknown)}. This "
                                  "server does not implement them; remove them from the request (docs/serving.md "
                                  "lists every parameter it accepts).", "invalid_request_error",
                                  "unsupported_parameter")
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, f"Invalid request body: {problems}", "invalid_request_error")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith("/v1/") and not authorized(request.headers.get("authorization", ""), api_key):
            return unauthorized()
        return await call_next(request)

    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)  # outermost: runs before the key check
    app.include_router(completions_router(engine))
    if fine_tuning:
        if trainer is None:
            trainer = engine.trainer if isinstance(engine.trainer, CoServingTrainer) else CoServingTrainer(engine)
        elif engine.trainer is not trainer:
            engine.attach_trainer(trainer)
        app.include_router(fine_tuning_router(trainer, output_root=fine_tuning_dir))
    return app


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

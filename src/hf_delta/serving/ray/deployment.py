"""Scale-out on Ray Serve: many engine replicas over one base, requests routed to where their delta is resident.

Needs the ``ray`` extra (``pip install 'hf_delta[ray]'``). Two deployments make one Serve application:

* ``EngineReplica`` (``--replicas N`` of them): one ``Engine`` over one base with every served delta registered,
  running the same FastAPI app as ``hf-delta serve`` in process. The delta name is Serve's *multiplexed model
  id*: a ``@serve.multiplexed`` loader fetches the delta's repo and tokenizer and tells Serve's router that
  the delta now lives here. The engine still batches the requests of all its deltas in one step (no
  ``@serve.batch``: Serve never splits batches per model).
* ``DeltaRouter`` (the HTTP ingress behind Serve's proxy): reads the request's ``model`` field and forwards
  the request through a ``DeploymentHandle`` with ``multiplexed_model_id=<delta>``, so it lands on a replica
  that holds the delta when one is free (Serve loads it elsewhere when those are busy). Unknown models,
  the base and malformed bodies go to any replica, whose app answers them exactly as ``hf-delta serve`` does.
  A replica lost before it answered is retried on another; one lost mid-stream ends the stream with an
  error event, never with a wrong answer.

Each response carries ``x-hf-delta-replica`` (which replica served it) and ``x-hf-delta-residency`` (``hit``
when the delta was already in the replica's memory or being loaded there, ``miss`` when the request had to
start the load). ``GET /v1/stats`` on the router lists every replica's latest counters. The request header
``x-hf-delta-affinity: off`` routes without the multiplexed id (benchmarks compare both).

>>> start_ray(num_cpus=4)  # doctest: +SKIP
>>> serve.run(build_app(base="org/base", deltas={"math": "org/math-delta"}, replicas=2))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from ...errors import EngineConfigError, HfDeltaError, MissingDependencyError

try:
    import ray
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError
except ImportError as _err:  # ray is an optional extra
    raise MissingDependencyError(
        f"hf_delta.serving.ray needs Ray Serve ({_err}): pip install 'hf_delta[ray]'") from _err

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ...utils.specs import parse_delta_specs
from ..api.errors import SSE_DONE, authorized, error_event, error_response, unauthorized
from ..api.limits import DEFAULT_MAX_BODY_BYTES, read_body, too_large_message
from ..engine.config import EngineConfig

logger = logging.getLogger(__name__)

APP_NAME = "hf_delta"
REPLICA_HEADER = "x-hf-delta-replica"
RESIDENCY_HEADER = "x-hf-delta-residency"
AFFINITY_HEADER = "x-hf-delta-affinity"
_LOST = (RayActorError, ReplicaUnavailableError)  # the replica died or went away before answering


# ------------------------------------------------------------------------------------------------- replica
async def _asgi_messages(app: Any, request: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Run one HTTP request through the ASGI ``app`` in this process; yields the messages the app sends.

    Closing the iterator tells the app that the client went away (its streaming requests are aborted).
    """
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request["method"], "scheme": "http", "path": request["path"],
             "raw_path": request["path"].encode(), "query_string": request["query"], "root_path": "",
             "headers": list(request["headers"]), "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body = [{"type": "http.request", "body": request["body"], "more_body": False}]

    async def receive() -> dict[str, Any]:
        if body:
            return body.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(scope, receive, sent.put)
        except Exception:  # the app already sent its 500 answer (Starlette re-raises after sending it)
            logger.exception("Request %s %s failed in the replica", request["method"], request["path"])
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            yield message
    finally:
        gone.set()
        asyncio.get_running_loop().call_later(5.0, task.cancel)  # a no-op once the app saw the disconnect


class EngineReplica:
    """One Serve replica: an ``Engine`` over one base, every delta registered, ``hf-delta serve``'s app in process.

    Args:
        base: the base model (Hub id or folder) each replica loads.
        deltas: ``{name: (repo, revision)}`` served by every replica (registered; loaded when requested).
        config: the engine's sizes (per replica).
        base_name: the model name that selects the base.
        api_key: require ``Authorization: Bearer <key>`` on ``/v1/*``.
        device, dtype: where the base goes (default: ``cuda`` when the replica has a GPU, else CPU float32).
        torch_threads: torch CPU threads of this replica (replicas sharing a machine should not oversubscribe).
        local_files_only: never download from the Hub.
        max_body_bytes: larger request bodies are answered with 413 (``create_app``).
    """

    def __init__(self, *, base: str, deltas: Mapping[str, tuple[str, str | None]], config: EngineConfig,
                 base_name: str = "base", api_key: str | None = None, device: str | None = None,
                 dtype: str | None = None, torch_threads: int | None = 1, local_files_only: bool = False,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        import torch

        from ..api.app import create_app
        from ..engine.engine import Engine

        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
        self.engine = Engine(base, config=config, base_name=base_name, device=device, dtype=torch_dtype,
                             local_files_only=local_files_only)
        for name, (repo, revision) in deltas.items():
            self.engine.register_delta(name, repo, revision=revision)
        self.engine.start()
        self.app = create_app(self.engine, api_key=api_key, max_body_bytes=max_body_bytes)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.counts = {"requests": 0, "hits": 0, "misses": 0, "multiplexed_loads": 0}

        async def fetch(delta: str) -> str:
            """Serve's loader of multiplexed id ``delta``: fetch its repo and tokenizer here. The engine reads its
            weights at its next step (its own prefetch for queued requests, on its own thread)."""
            self.counts["multiplexed_loads"] += 1
            await asyncio.to_thread(self.engine.tokenizer_for, delta)
            return delta

        # Serve's routing table keeps as many deltas per replica as the engine holds in memory.
        self.resident = serve.multiplexed(max_num_models_per_replica=config.device_slots + config.cpu_slots)(fetch)
        logger.info("Replica %s serves %d deltas on %s", self.replica_id, len(deltas), device)

    def _residency(self, model: str | None) -> str | None:
        """``hit`` / ``miss`` for a request of delta ``model`` arriving now (None for the base or unknown names)."""
        if not model or model not in self.engine.residency:
            return None
        hit = self.engine.residency.tier(model) in ("device", "cpu", "loading")
        self.counts["hits" if hit else "misses"] += 1
        return "hit" if hit else "miss"

    async def forward(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any] | bytes]:
        """Answer one forwarded HTTP request: yields its head (status, headers), body chunks, then this replica's
        counters (``{"replica": ...}``)."""
        self.counts["requests"] += 1
        residency = self._residency(request.get("model"))
        delta = serve.get_multiplexed_model_id()
        if delta:
            try:
                await self.resident(delta)
            except HfDeltaError as err:  # its requests get the engine's own error from the app below
                logger.warning("Delta %r could not be made resident: %s", delta, err)
        extra = [(REPLICA_HEADER.encode(), self.replica_id.encode())]
        if residency:
            extra.append((RESIDENCY_HEADER.encode(), residency.encode()))
        answered, last = False, b""
        async for message in _asgi_messages(self.app, request):
            if message["type"] == "http.response.start":
                answered = True
                yield {"status": message["status"], "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body" and message.get("body"):
                if message["body"] == SSE_DONE.encode():
                    last = message["body"]
                else:
                    yield message["body"]
        if not answered:
            failed = error_response(500, "The replica produced no answer; see its log.", "server_error")
            yield {"status": 500, "headers": [*failed.raw_headers, *extra]}
            yield failed.body
        # The counters go before a stream's closing event: clients hang up on [DONE], which cuts off what follows.
        yield {"replica": await asyncio.to_thread(self.summary)}
        if last:
            yield last

    def summary(self) -> dict[str, Any]:
        """This replica's id, residency hit/miss counts, resident deltas and batching counters."""
        stats = self.engine.stats()
        residency, counters = stats["residency"], stats["counters"]
        tiers = residency["tiers"]
        return {"replica": self.replica_id, **self.counts,
                "resident": sorted(tiers.get("device", []) + tiers.get("cpu", []) + tiers.get("loading", [])),
                "steps": counters["steps"], "peak_deltas_per_step": counters.get("peak_deltas_per_step"),
                "attaches": residency["attaches"], "loads": residency["loads"], "failures": residency["failures"]}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


# -------------------------------------------------------------------------------------------------- router
def _model_of(body: bytes) -> str | None:
    """The ``model`` field of a JSON request body (None when the body is not a JSON object with one)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


class DeltaRouter:
    """The HTTP ingress: routes each request to an ``EngineReplica`` by its ``model`` (see the module docstring).

    Args:
        engine: handle of the ``EngineReplica`` deployment.
        deltas: the served delta names (requests for them carry the multiplexed id).
        api_key: checked here for ``/v1/stats`` (the replicas check every other route).
        retries: times a request is re-sent when its replica is lost before answering.
        max_body_bytes: larger request bodies are answered with 413 here, before they are read whole.
    """

    def __init__(self, engine: Any, *, deltas: list[str], api_key: str | None = None, retries: int = 2,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.engine = engine.options(stream=True)
        self.max_body_bytes = max_body_bytes
        self.deltas = set(deltas)
        self.api_key = api_key
        self.retries = retries
        self.replicas: dict[str, dict[str, Any]] = {}
        self.counts = {"requests": 0, "with_affinity": 0, "retries": 0, "lost": 0}

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/v1/stats" and request.method == "GET":
            if not authorized(request.headers.get("authorization", ""), self.api_key):
                return unauthorized()
            return JSONResponse({"router": self.counts, "replicas": self.replicas})
        body = await read_body(request, self.max_body_bytes)
        if body is None:
            return error_response(413, too_large_message(self.max_body_bytes), "invalid_request_error",
                                  "request_too_large")
        model = _model_of(body) if request.method == "POST" else None
        forwarded = {"method": request.method, "path": path, "query": request.url.query.encode(),
                     "headers": request.headers.raw, "body": body, "model": model}
        self.counts["requests"] += 1
        handle = self.engine
        if model in self.deltas and request.headers.get(AFFINITY_HEADER, "on") != "off":
            handle = handle.options(multiplexed_model_id=model)
            self.counts["with_affinity"] += 1
        for attempt in range(self.retries + 1):
            stream = handle.forward.remote(forwarded)
            try:
                head = await stream.__anext__()
                break
            except _LOST as err:
                self.counts["lost"] += 1
                if attempt == self.retries:
                    return error_response(503, f"The replica serving this request was lost and {self.retries} retries "
                                       f"failed ({type(err).__name__}); send the request again.", "server_error")
                self.counts["retries"] += 1
                logger.warning("Replica lost before answering %s; retrying (%s)", path, err)
                await asyncio.sleep(0.5 * (attempt + 1))
        headers = list(head["headers"])
        if not any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers):
            try:  # a JSON answer: its body follows the head at once
                body = b"".join([chunk async for chunk in self._chunks(stream)])
            except _LOST as err:
                return error_response(503, f"The replica serving this request was lost ({type(err).__name__}); "
                                   "send the request again.", "server_error")
            response = Response(body, status_code=head["status"])
        else:
            response = StreamingResponse(self._events(stream), status_code=head["status"])
        response.raw_headers = headers
        return response

    async def _chunks(self, stream: Any) -> AsyncIterator[bytes]:
        """The body chunks of a replica's answer (its trailing counters are kept for ``/v1/stats``)."""
        finished = False
        try:
            async for item in stream:
                if isinstance(item, bytes):
                    yield item
                else:
                    self.replicas[item["replica"]["replica"]] = item["replica"]
            finished = True
        except _LOST:
            self.counts["lost"] += 1
            raise
        finally:
            if not finished:
                stream.cancel()

    async def _events(self, stream: Any) -> AsyncIterator[bytes]:
        """A streamed answer; a replica lost mid-stream ends it with an error event (never resent in part)."""
        try:
            async for chunk in self._chunks(stream):
                yield chunk
        except _LOST as err:
            logger.warning("Replica lost mid-stream: %s", err)
            yield error_event(RuntimeError(f"The replica serving this stream was lost ({type(err).__name__}); "
                                            "send the request again.")).encode()


# ------------------------------------------------------------------------------------------------- building
def build_app(*, base: str | Path, deltas: Mapping[str, str | Path | tuple[str, str | None]],
              replicas: int = 1, config: EngineConfig | None = None, base_name: str = "base",
              api_key: str | None = None, device: str | None = None, dtype: str | None = None,
              replica_cpus: float = 1.0, replica_gpus: float = 0.0, torch_threads: int | None = 1,
              max_ongoing_requests: int | None = None, local_files_only: bool = False,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> serve.Application:
    """The Serve application: ``replicas`` ``EngineReplica`` s behind one ``DeltaRouter`` ingress.

    Args:
        base: the base model (Hub id or a folder every node can read).
        deltas: ``{name: repo}`` or ``{name: (repo, revision)}``; every replica can serve every delta.
        replicas: number of engine replicas.
        config: engine sizes per replica; Serve keeps at most ``device_slots + cpu_slots`` deltas per replica
            in its routing table, as many as the engine holds in memory.
        replica_cpus, replica_gpus: Ray resources of each replica (``replica_gpus=1`` puts each on its own GPU).
        max_ongoing_requests: requests in flight per replica (default: the engine's ``max_running``); the
            router sends more elsewhere, so keep it at the batch the engine should see.
        base_name, api_key, device, dtype, torch_threads, local_files_only, max_body_bytes: as for
            ``hf-delta serve``.

    Raises:
        EngineConfigError: ``replicas`` < 1 or an impossible engine config.
    """
    config = config or EngineConfig()
    config.validate()
    if replicas < 1:
        raise EngineConfigError(f"replicas must be >= 1, got {replicas}.")
    specs = {name: (str(spec[0]), spec[1]) if isinstance(spec, tuple) else (str(spec), None)
             for name, spec in deltas.items()}
    ongoing = max_ongoing_requests or config.max_running
    replica = serve.deployment(EngineReplica, name="EngineReplica").options(
        num_replicas=replicas, max_ongoing_requests=ongoing,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
    ).bind(base=str(base), deltas=specs, config=config, base_name=base_name, api_key=api_key, device=device,
           dtype=dtype, torch_threads=torch_threads, local_files_only=local_files_only, max_body_bytes=max_body_bytes)
    router = serve.deployment(DeltaRouter, name="DeltaRouter").options(
        num_replicas=1, max_ongoing_requests=max(1000, ongoing * replicas), ray_actor_options={"num_cpus": 0})
    return router.bind(replica, deltas=list(specs), api_key=api_key, max_body_bytes=max_body_bytes)


def app_builder(args: Mapping[str, Any]) -> serve.Application:
    """The application from a Serve config file (``import_path: hf_delta.serving.ray:app_builder``).

    ``args`` holds ``build_app``'s keyword arguments, with ``deltas`` as ``{name: "repo[@revision]"}`` and the
    engine's sizes under ``engine`` (``EngineConfig`` fields).

    Raises:
        EngineConfigError: a missing ``base``, an unknown key or an impossible engine setting.
    """
    args = dict(args)
    engine = args.pop("engine", None) or {}
    allowed = set(inspect.signature(build_app).parameters) - {"config"}
    unknown = sorted(set(args) - allowed)
    if unknown or "base" not in args:
        raise EngineConfigError(f"Serve config args need 'base' and take only {sorted(allowed)} and 'engine'; "
                                f"unknown: {unknown}.")
    fields = set(inspect.signature(EngineConfig).parameters)
    if not set(engine) <= fields:
        raise EngineConfigError(f"Unknown engine settings {sorted(set(engine) - fields)}; known: {sorted(fields)}.")
    deltas = parse_delta_specs([f"{name}={repo}" for name, repo in (args.pop("deltas", None) or {}).items()])
    return build_app(config=EngineConfig(**engine), deltas=deltas, **args)


# --------------------------------------------------------------------------------------------------- cluster
def start_ray(*, address: str | None = None, num_cpus: int | None = None, host: str = "127.0.0.1",
              port: int = 8000) -> None:
    """Join the Ray cluster at ``address`` (``"auto"``: the one ``ray start`` runs on this machine), or start a
    local one (on 127.0.0.1 when ``host`` is a loopback address); then start Serve's HTTP proxy on ``host:port``."""
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            loopback = host in ("127.0.0.1", "localhost")
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     _node_ip_address="127.0.0.1" if loopback else None)
    serve.start(http_options={"host": host, "port": port})

"""Scale-out on Ray Serve: a local Ray instance on 127.0.0.1, two engine replicas behind Serve's HTTP proxy.

One cluster shared by the module (starting it costs most of this file's time), started by the first test that
needs it. Each test passes alone and in any order: the affinity test has deltas of its own that no other test
requests, and the replica-kill test shuts the cluster down afterwards (a later test starts a fresh one).
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from http_helpers import request_json

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from hf_delta.cli.serve import add_serve_arguments  # noqa: E402
from hf_delta.errors import EngineConfigError, MissingDependencyError  # noqa: E402
from hf_delta.serving import EngineConfig  # noqa: E402
from hf_delta.serving.ray import (  # noqa: E402
    AFFINITY_HEADER,
    APP_NAME,
    REPLICA_HEADER,
    RESIDENCY_HEADER,
    app_builder,
    build_app,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = "ray-key"
MAX = 8
DELTAS = ("arith-x1", "arith-x6", "cipher-x3", "cipher-x10", "facts-x1", "facts-x6", "chat-x3", "chat-x10")
# Served too, but requested only by test_requests_go_to_the_replica_that_holds_their_delta, which needs deltas
# that no replica holds yet whatever ran before it.
FRESH = ("arith-x3", "cipher-x1", "cipher-x6", "facts-x3", "facts-x10")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Cluster:
    """A local Ray instance running the app, started on first use; ``discard()`` shuts it down."""

    def __init__(self, base, deltas):
        self.base, self.deltas, self.url = base, deltas, None

    def get(self) -> str:
        if self.url is None:
            try:
                self.url = _start_cluster(self.base, self.deltas)
            except BaseException:
                self.discard()
                raise
        return self.url

    def discard(self) -> None:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.url = None


def _start_cluster(base, deltas) -> str:
    port = _free_port()
    # On a loaded 2-core CI machine a replica's queue-length answer can take longer than Serve's 0.1 s probe
    # deadline, and Serve then routes as if the replica were busy. Patient probes make the tests check the
    # routing rule rather than the machine's load (docs/ray.md names these settings). Starting a Ray worker
    # there can take longer than the 5 s Serve gives its HTTP proxy to report ready before killing it.
    patient = {"RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "2.0",
               "RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "5.0",
               "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "20.0"}
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level=logging.WARNING, runtime_env={"env_vars": patient})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = EngineConfig(device_slots=4, cpu_slots=4, kv_cache_tokens=2048, block_size=8, max_running=32)
    serve.run(build_app(base=base, deltas=deltas, replicas=2, config=config, api_key=KEY),
              name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def clusters(micro_base, serving_deltas, broken_delta):
    deltas = {**{name: serving_deltas[name] for name in DELTAS + FRESH}, "broken": broken_delta}
    manager = _Cluster(micro_base, deltas)
    yield manager
    if manager.url is not None:
        manager.discard()


@pytest.fixture
def cluster(clusters) -> str:
    """The base URL of the module's cluster (started if no earlier test left one running)."""
    return clusters.get()


@pytest.fixture
def disposable_cluster(clusters) -> Iterator[str]:
    """The module's cluster, shut down after the test: for a test that breaks it (kills a replica)."""
    yield clusters.get()
    clusters.discard()


@pytest.fixture
def client(cluster):
    return openai.OpenAI(base_url=cluster + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _complete(client, name: str, prompt: str, max_tokens: int = MAX, *,
              affinity: bool = True) -> tuple[str, str, str | None]:
    """(text, replica id, residency) of one greedy completion (routed without the delta's replica when
    ``affinity`` is false)."""
    raw = client.completions.with_raw_response.create(model=name, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=0,
                                                      extra_headers=None if affinity else {AFFINITY_HEADER: "off"})
    return raw.parse().choices[0].text, raw.headers[REPLICA_HEADER], raw.headers.get(RESIDENCY_HEADER)


def _stats(client) -> dict:
    return client.get("/stats", cast_to=object)


def _post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    return request_json(url + "/v1/completions", method="POST", body=body, key=key)


# ------------------------------------------------------------------------------------------ without Ray running
def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "hf_delta.serving.ray")
    monkeypatch.delitem(sys.modules, "hf_delta.serving.ray.deployment")
    with pytest.raises(MissingDependencyError, match=r"pip install 'hf_delta\[ray\]'"):
        importlib.import_module("hf_delta.serving.ray")


def test_cli_flags_and_serve_config_args(micro_base):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--base", "b", "--ray", "--replicas", "3", "--ray-address", "auto"])
    assert args.ray and args.replicas == 3 and args.ray_address == "auto" and args.serve_config is None
    with pytest.raises(EngineConfigError, match="'base'"):
        app_builder({"deltas": {"a": "org/a"}})
    with pytest.raises(EngineConfigError, match="unknown: \\['replica'\\]"):
        app_builder({"base": "b", "replica": 2})
    with pytest.raises(EngineConfigError, match="slots"):
        app_builder({"base": "b", "engine": {"slots": 2}})
    with pytest.raises(EngineConfigError, match="replicas"):
        app_builder({"base": "b", "replicas": 0})
    app = app_builder({"base": str(micro_base), "deltas": {"a": "org/a@v1"}, "replicas": 2,
                       "engine": {"device_slots": 2}})
    assert isinstance(app, serve.Application)


# ------------------------------------------------------------------------------------------------ on the cluster
def test_same_routes_and_errors_as_hf_delta_serve(cluster, client, serving_prompts, reference):
    assert [m.id for m in client.models.list()] == ["base", *DELTAS, *FRESH, "broken"]
    with pytest.raises(openai.NotFoundError, match="arith-x1"):  # lists the served models
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="arith-x1", prompt="hi", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="arith-x1", prompt="hi", max_tokens=0)
    status, body = _post(cluster, b'{"model": "arith-x1", "prompt": ')
    assert status == 422 and "JSON" in body["error"]["message"]
    assert _post(cluster, b'{"model": "arith-x1", "prompt": "x"}', key=None)[0] == 401
    host, port = cluster.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # 50 MB declared, a byte sent: 413 unread
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(50 * 2**20))
    conn.endheaders(b"{")
    assert conn.getresponse().status == 413
    conn.close()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=cluster + "/v1", api_key="wrong", max_retries=0).get("/stats", cast_to=object)

    prompt = serving_prompts("cipher-x3", 1)[0]
    with ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(_complete, client, "cipher-x3", prompt) for _ in range(4)]
        bads = [pool.submit(client.completions.create, model="broken", prompt=prompt, max_tokens=MAX, stream=s)
                for s in (False, True)]
        for f in goods:
            assert f.result()[0] == reference("cipher-x3", prompt, MAX)
        for f in bads:  # a stream that fails before its first token is a plain HTTP error too
            with pytest.raises(openai.InternalServerError, match=r"broken.*corrupt"):
                f.result()
    chat = client.chat.completions.create(model="chat-x3", messages=[{"role": "user", "content": "first: ka lo"}],
                                          max_tokens=MAX, temperature=0)
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_requests_go_to_the_replica_that_holds_their_delta(client, serving_prompts, reference):
    # Deltas no other test uses: one that already sits on both replicas may go to either.
    names = FRESH
    first = {}
    for name in names:  # one request each: Serve places each delta on a replica, which loads it
        text, replica, _ = _complete(client, name, serving_prompts(name, 1)[0])
        first[name] = replica
    assert len(set(first.values())) == 2  # new deltas go to the replica holding fewer
    time.sleep(1.0)  # replicas report their deltas to Serve's controller, which tells the router
    landed = []
    for round_ in range(2):
        for name in names:
            prompt = serving_prompts(name, 2)[round_]
            text, replica, residency = _complete(client, name, prompt)
            landed.append((replica, residency) == (first[name], "hit"))
            assert text == reference(name, prompt, MAX)
    # Serve sends a request elsewhere when its replica looks busy (on a loaded machine a slow queue-length probe
    # counts as busy); without affinity about half would land on the first replica.
    assert sum(landed) >= len(landed) - 2, landed
    replicas = _stats(client)["replicas"]
    for replica in set(first.values()):
        held = {n for n in names if first[n] == replica}
        assert held <= set(replicas[replica]["resident"])


def test_each_replica_batches_several_deltas(client, serving_prompts, reference):
    # Every delta with affinity, plus one request per delta without it. Serve places a delta's requests where it
    # is resident, and may have placed most deltas on one replica (its model counts reach the router late); the
    # requests without affinity go to the replica with the shorter queue, so both replicas get several deltas.
    jobs = [(name, p, True) for name in DELTAS for p in serving_prompts(name, 3)]
    jobs += [(name, serving_prompts(name, 4)[3], False) for name in DELTAS]
    tokens = 6 * MAX  # long enough that requests of different deltas overlap on a busy machine

    def stream(job):
        name, prompt, affinity = job
        raw = client.completions.with_raw_response.create(
            model=name, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
            extra_headers=None if affinity else {AFFINITY_HEADER: "off"})
        return "".join(chunk.choices[0].text for chunk in raw.parse()), raw.headers[REPLICA_HEADER]

    for name in DELTAS:  # every delta loaded first: Serve loads a replica's models one at a time
        _complete(client, name, serving_prompts(name, 1)[0])
    with_affinity = _stats(client)["router"]["with_affinity"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outputs = list(pool.map(stream, jobs))
    served: dict[str, set[str]] = {}  # replica -> the deltas it answered in the burst
    for (name, prompt, _), (text, replica) in zip(jobs, outputs, strict=True):
        assert text == reference(name, prompt, tokens), name
        served.setdefault(replica, set()).add(name)
    stats = _stats(client)
    replicas = stats["replicas"]
    assert len(replicas) == 2 and set(served) <= set(replicas), (served, replicas)
    for replica, summary in replicas.items():
        assert len(served.get(replica, ())) >= 2, served
        assert summary["peak_deltas_per_step"] >= 2, (summary, served)  # one forward pass over several deltas
    assert stats["router"]["with_affinity"] - with_affinity == len(DELTAS) * 3


def _engine_replicas() -> dict[str, str]:
    """``{replica id: actor name}`` of the live ``EngineReplica`` actors."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n.rsplit("#", 1)[1]: n for n in names if n.startswith(f"SERVE_REPLICA::{APP_NAME}#EngineReplica#")}


def test_killed_replica_is_replaced_and_its_clients_never_get_a_wrong_answer(disposable_cluster, client,
                                                                             serving_prompts, reference):
    name = "facts-x6"
    prompts = serving_prompts(name, 4)
    _complete(client, name, prompts[0])  # the delta is resident before the burst
    actors = {rid: ray.get_actor(n, namespace="serve") for rid, n in _engine_replicas().items()}
    assert len(actors) == 2, actors
    lost = _stats(client)["router"]["lost"]
    streaming: list[str] = []  # replica of each stream that has sent its first token
    started = threading.Event()

    def call(i: int):
        prompt = prompts[i % len(prompts)]
        try:
            if i % 2:
                raw = client.completions.with_raw_response.create(model=name, prompt=prompt, max_tokens=48,
                                                                  temperature=0, stream=True)
                text, chunks = "", raw.parse()
                for chunk in chunks:
                    if not started.is_set():
                        streaming.append(raw.headers[REPLICA_HEADER])
                        started.set()
                    text += chunk.choices[0].text
            else:
                text = client.completions.create(model=name, prompt=prompt, max_tokens=48,
                                                 temperature=0).choices[0].text
        except openai.APIError as err:
            return prompt, None, err
        return prompt, text, None

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, i) for i in range(8)]
        assert started.wait(60)
        victim = streaming[0]  # a replica in the middle of a stream: the kill hits a request in flight
        ray.kill(actors[victim], no_restart=True)
        results = [f.result() for f in futures]
    assert _stats(client)["router"]["lost"] > lost  # requests in flight were lost (retried or failed)
    for prompt, text, err in results:
        if err is None:  # served before the kill, or retried on the other replica
            assert text == reference(name, prompt, 48)
        else:
            assert isinstance(err, openai.APIError)

    # Serve's controller notices the death and starts a new replica. Starting its Ray worker took 18-32 s on an
    # idle 2-core machine and 85 s with one busy process beside the tests: hence the long deadline.
    deadline = time.monotonic() + 300
    while True:
        status = serve.status().applications[APP_NAME].deployments["EngineReplica"]
        live = set(_engine_replicas())
        if len(live) == 2 and victim not in live and status.replica_states.get("RUNNING", 0) == 2:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    seen = set()
    for other in DELTAS:  # every delta answers right, and never from the dead replica
        prompt = serving_prompts(other, 1)[0]
        text, replica, _ = _complete(client, other, prompt)
        assert text == reference(other, prompt, MAX), other
        seen.add(replica)
    assert seen <= live, (seen, live)
    # The replacement serves too. A delta's requests stay on the survivor while it holds that delta (it may hold
    # them all), and the router hears of the replacement a moment after the controller does; without affinity
    # the router picks among the replicas it knows, at random when both are idle.
    deadline, i = time.monotonic() + 120, 0
    while seen != live:
        assert time.monotonic() < deadline, (seen, live)
        other = DELTAS[i % len(DELTAS)]
        prompt = serving_prompts(other, 1)[0]
        text, replica, _ = _complete(client, other, prompt, affinity=False)
        assert text == reference(other, prompt, MAX), other
        assert replica in live, (replica, live)
        seen.add(replica)
        i += 1

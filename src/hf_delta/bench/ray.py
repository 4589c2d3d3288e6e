"""``hf-delta bench ray``: engine replicas on Ray Serve, 1 vs 2 replicas and delta affinity on vs off.

One local Ray instance, one Serve application, four phases driven over HTTP with the same seeded skewed
workload (``bench.build_workload``):

1. throughput, 1 replica: every request at once, routed by delta (multiplexed id);
2. throughput, redeployed with 2 replicas: the same;
3. residency, the same 2 replicas: Poisson arrivals at ``rate`` (below saturation), sent *without* the
   multiplexed id (Serve's plain power-of-two routing);
4. residency, the same 2 replicas: the same arrivals, routed by delta.

Each phase uses its own set of delta names (aliases of the same zoo deltas), so no phase finds the deltas
of an earlier one resident. The residency hit rate counts the requests whose delta was already in their
replica's memory (or being loaded there) when they arrived. It is measured below saturation: when every
replica is full, Serve sends requests wherever there is room, with or without affinity.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PHASES = (("throughput, 1 replica", 1, True, "throughput"), ("throughput, 2 replicas", 2, True, "throughput"),
          ("residency, no affinity", 2, False, "residency"), ("residency, affinity", 2, True, "residency"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(url: str, req: Any, *, affinity: bool) -> dict[str, Any]:
    """One streamed completion: first-token and finish times, tokens, the serving replica and residency."""
    body = {"model": req.name, "prompt": req.prompt_ids, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Content-Type": "application/json", **({} if affinity else {"x-hf-delta-affinity": "off"})}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers=headers)
    first, tokens = None, 0
    with urllib.request.urlopen(request, timeout=600) as resp:
        replica, residency = resp.headers.get("x-hf-delta-replica"), resp.headers.get("x-hf-delta-residency")
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"Request {req.index} failed: {event['error']['message']}")
            if event["choices"] and event["choices"][0]["text"]:
                first = first or time.monotonic()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"first": first, "finish": time.monotonic(), "tokens": tokens, "replica": replica, "residency": residency}


def _run_phase(url: str, workload: Sequence[Any], *, affinity: bool) -> tuple[dict[str, Any], dict[int, Any]]:
    """Send every request at its arrival time from its own thread; returns the summary row and raw results."""
    from .workload import _Done, summarize

    results: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []
    t0 = time.monotonic() + 0.5

    def send(req: Any) -> None:
        time.sleep(max(0.0, t0 + req.arrival - time.monotonic()))
        try:
            results[req.index] = _stream(url, req, affinity=affinity)
        except Exception as err:  # reported below with the others
            errors.append(err)

    threads = [threading.Thread(target=send, args=(r,), daemon=True) for r in workload]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(workload)} requests failed; first: {errors[0]}")
    done = {i: _Done(r["first"], r["finish"], r["tokens"]) for i, r in results.items()}
    row = summarize(workload, done, t0)
    hits = sum(r["residency"] == "hit" for r in results.values())
    misses = sum(r["residency"] == "miss" for r in results.values())
    row.update(hit_rate=hits / max(1, hits + misses), misses=misses,
               replicas_used=len({r["replica"] for r in results.values()}))
    return row, results


def _replica_loads(url: str) -> int:
    with urllib.request.urlopen(url + "/v1/stats", timeout=60) as resp:
        return sum(r["loads"] for r in json.loads(resp.read())["replicas"].values())


def bench_ray(*, size: str, zoo_dir: str | Path | None, work_dir: str | Path, out: str | Path, deltas: int = 32,
              requests: int = 256, rate: float = 6.0, max_tokens: int = 16, seed: int = 0, device_slots: int = 4,
              cpu_slots: int = 4, threads: int = 1, ray_cpus: int = 4, command: str) -> str:
    """Run the four phases on a local Ray instance and write ``ray-<size>.{json,md}``; returns the Markdown."""
    import ray
    from ray import serve

    from ..serving.engine.config import EngineConfig
    from ..serving.ray.deployment import APP_NAME, build_app, start_ray
    from .report import write_results
    from .serve import expand, prepare_zoo
    from .workload import build_workload

    work = Path(work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    base, served = prepare_zoo(size, zoo_dir, work)
    names = expand(served, deltas)
    sets = [[replace(s, name=f"{s.name}-p{k}") for s in names] for k in range(len(PHASES))]
    config = EngineConfig(device_slots=device_slots, cpu_slots=cpu_slots, kv_cache_tokens=16384, max_running=64)
    registry = {s.name: s.delta for names_k in sets for s in names_k}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    start_ray(num_cpus=ray_cpus, port=port)
    rows = []
    try:
        for k, (label, replicas, affinity, measure) in enumerate(PHASES):
            if k == 0 or replicas != PHASES[k - 1][1]:  # a new deployment with this many replicas
                serve.run(build_app(base=base, deltas=registry, replicas=replicas, config=config,
                                    torch_threads=threads, replica_cpus=1.0), name=APP_NAME, route_prefix="/")
                _warm_up(url, replicas)
            arrivals = math.inf if measure == "throughput" else rate
            workload = build_workload(sets[k], n_requests=requests, rate=arrivals, popularity="skewed", seed=seed,
                                      max_tokens=max_tokens)
            loads = _replica_loads(url)
            logger.info("bench ray: %s", label)
            row, _ = _run_phase(url, workload, affinity=affinity)
            rows.append({"phase": label, "replicas": replicas, "affinity": affinity, "rate": arrivals, **row,
                         "delta_loads": _replica_loads(url) - loads})
    finally:
        serve.shutdown()
        ray.shutdown()
    one, two, none, both = rows
    two["throughput_vs_1_replica"] = two["throughput_tok_s"] / one["throughput_tok_s"]
    both["hit_rate_minus_no_affinity"] = both["hit_rate"] - none["hit_rate"]
    for r in rows:
        for key, value in list(r.items()):
            if isinstance(value, float) and not math.isfinite(value):
                r[key] = None
    extra = {"note": f"{len(served)} distinct Llama fine-tunes of the {size} zoo (BitDelta, no distillation) "
                     f"served under {deltas} names per phase (aliases), skewed (Zipf) popularity; each replica "
                     "runs one engine with 1 torch thread on one machine.",
             "engine": asdict(config), "requests": requests, "rate": rate, "max_tokens": max_tokens, "seed": seed,
             "ray": ray.__version__}
    return write_results(rows, out, name=f"ray-{size}", command=command, extra=extra)


def _warm_up(url: str, replicas: int) -> None:
    """A few base-model requests so that every replica has run its first forward pass before timing."""
    body = json.dumps({"model": "base", "prompt": [1, 2, 3], "max_tokens": 2}).encode()
    for _ in range(4 * replicas):
        request = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as resp:
            resp.read()


def bench_ray_main(args: argparse.Namespace, *, command: str) -> int:
    """``hf-delta bench ray``: run and print the Markdown table."""
    print(bench_ray(size=args.size, zoo_dir=args.dir, work_dir=args.work_dir, out=args.out, deltas=args.deltas,
                    requests=args.requests, rate=args.rate, max_tokens=args.max_tokens, seed=args.seed,
                    device_slots=args.device_slots, cpu_slots=args.cpu_slots, threads=args.threads,
                    ray_cpus=args.ray_cpus, command=command))
    return 0

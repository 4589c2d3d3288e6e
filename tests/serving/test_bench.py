"""``bench serve`` end to end on tiny synthetic weights (the GPU check runs the same code Llama-7B-shaped)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import json
from collections import Counter

import pytest
import torch

from hf_delta.bench.options import add_bench_serve_arguments
from hf_delta.bench.serve import bench_serve, expand
from hf_delta.bench.workload import BenchSettings, Served, build_workload
from hf_delta.cli.serve import add_serve_arguments
from hf_delta.errors import EngineConfigError
from hf_delta.serving import EngineConfig
from hf_delta.serving.engine.residency import ResidencyManager
from hf_delta.serving.engine.scheduler import Scheduler
from hf_delta.utils.specs import parse_delta_specs


def test_workload_is_seeded_and_skewed():
    served = [Served(f"d{i}", None, None, [[1, 2, 3], [4, 5]]) for i in range(8)]
    a = build_workload(served, n_requests=400, rate=50.0, popularity="skewed", seed=3, max_tokens=4)
    b = build_workload(served, n_requests=400, rate=50.0, popularity="skewed", seed=3, max_tokens=4)
    assert [(r.name, r.arrival) for r in a] == [(r.name, r.arrival) for r in b]
    counts = Counter(r.name for r in a)
    assert counts["d0"] > 2 * counts["d7"]  # Zipf: the first name is the most popular
    assert all(x.arrival < y.arrival for x, y in itertools.pairwise(a))
    uniform = Counter(r.name for r in build_workload(served, n_requests=400, rate=50.0, popularity="uniform",
                                                     seed=3, max_tokens=4))
    assert max(uniform.values()) < 2.5 * min(uniform.values())
    names = expand(served[:2], 5)
    assert [n.name for n in names] == ["d0-v0", "d1-v0", "d0-v1", "d1-v1", "d0-v2"]
    assert names[2].alias_of == "d0" and names[0].alias_of is None


@pytest.mark.slow
def test_bench_serve_writes_results(tmp_path):
    settings = BenchSettings(deltas=(1, 3), popularity=("skewed",), requests=6, rates=(float("inf"),), max_tokens=3,
                             engine=EngineConfig(device_slots=2, cpu_slots=1, kv_cache_tokens=512, max_running=8,
                                                 max_batch_tokens=64))
    torch.manual_seed(0)
    md = bench_serve(size=None, zoo_dir=None, synthetic="tiny", settings=settings, out=tmp_path / "results",
                     work_dir=tmp_path / "work", device="cpu", dtype="float32", command="test", load_repeats=1)
    data = json.loads((tmp_path / "results" / "serve-synthetic-tiny.json").read_text())
    systems = {(r["deltas"], r["system"]) for r in data["rows"]}
    assert systems == {(n, s) for n in (1, 3) for s in ("engine", "naive", "merged", "peft")}
    for row in data["rows"]:
        assert row["requests"] == 6 and row["tokens"] == 18 and row["throughput_tok_s"] > 0
    engine = next(r for r in data["rows"] if r["system"] == "engine" and r["deltas"] == 3)
    assert engine["kv_peak_tokens"] <= engine["kv_budget_tokens"]
    assert {"engine_vs_naive", "engine_vs_merged", "engine_weight_x_base"} <= set(data["ratios"][-1])
    assert data["load_time"]["delta_load_s"] > 0
    assert "| engine |" in md and (tmp_path / "results" / "serve-synthetic-tiny.md").is_file()


def test_cli_arguments_parse():
    serve = argparse.ArgumentParser()
    add_serve_arguments(serve)
    args = serve.parse_args(["--base", "org/base", "--delta", "a=org/a@v1", "--delta", "b=./b", "--device-slots", "2"])
    assert parse_delta_specs(args.delta) == {"a": ("org/a", "v1"), "b": ("./b", None)}
    assert args.device_slots == 2 and args.host == "127.0.0.1"
    for bad in (["noequals"], ["a=x", "a=y"], ["=x"]):
        with pytest.raises(EngineConfigError):
            parse_delta_specs(bad)
    bench = argparse.ArgumentParser()
    add_bench_serve_arguments(bench)
    args = bench.parse_args(["--deltas", "1,16", "--popularity", "skewed", "--synthetic", "llama-7b",
                             "--rate", "8,inf"])
    assert args.deltas == [1, 16] and args.popularity == ["skewed"] and args.max_running == 256
    assert args.rate == [8.0, float("inf")]


def test_engine_defaults_have_one_source():
    """``hf-delta serve``'s engine flags, the ``Scheduler`` and the ``ResidencyManager`` default to ``EngineConfig``."""
    config = EngineConfig()
    serve = argparse.ArgumentParser()
    add_serve_arguments(serve)
    args = serve.parse_args([])
    flags = {f.name for f in dataclasses.fields(EngineConfig) if f.metadata.get("flag")}
    assert flags >= {"device_slots", "cpu_slots", "kv_cache_tokens", "block_size", "max_batch_tokens", "max_running",
                     "fairness_steps"}
    assert {name: getattr(args, name) for name in flags} == {name: getattr(config, name) for name in flags}
    for cls, names in ((Scheduler, ("max_batch_tokens", "max_running", "fairness_steps")),
                       (ResidencyManager, ("device_slots", "cpu_slots", "loader_threads", "retry_failed_after"))):
        params = inspect.signature(cls).parameters
        assert {n: params[n].default for n in names} == {n: getattr(config, n) for n in names}, cls.__name__
    bench = argparse.ArgumentParser()
    add_bench_serve_arguments(bench)  # the benchmark keeps the sizes its recorded results used
    assert (bench.parse_args([]).device_slots, bench.parse_args([]).cpu_slots) == (16, 16)


def test_decode_profile_puts_each_op_in_its_category(micro_base, serving_deltas):
    from hf_delta.bench.step_profile import CATEGORIES, profile_decode, profile_markdown
    from hf_delta.serving import Engine

    engine = Engine(micro_base, deltas={"a": serving_deltas["arith-x1"], "c": serving_deltas["cipher-x3"]},
                    config=EngineConfig(kv_cache_tokens=512, block_size=8))
    prompt = [3, 4, 5, 6, 7]
    base_only = profile_decode(engine, [("base", prompt)] * 3, steps=3)
    mixed = profile_decode(engine, [("a", prompt), ("c", prompt), ("base", prompt)], steps=3)
    engine.close()
    for p in (base_only, mixed):
        assert p["rows"] == 3 and p["time"] == "cpu"
        assert all(p[f"{c}_ms"] > 0 for c in ("base", "attention", "sampling", "other")), p
        assert sum(p[f"{c}_ms"] for c in CATEGORIES) == pytest.approx(p["busy_ms"])
        assert p["busy_ms"] + p["host_ms"] == pytest.approx(p["wall_ms"])
        assert p["eager_wall_ms"] > 0 and "graphs_wall_ms" not in p  # a CPU engine has no graphs
        assert p["syncs_per_step"] >= 1  # the sampled tokens' read-back at least
    assert base_only["delta_ms"] == 0 < mixed["delta_ms"]  # only rows with a delta run delta ops
    assert base_only["syncs_per_step"] < mixed["syncs_per_step"]  # routing rows to deltas costs syncs
    assert "| delta_ms |" in profile_markdown([mixed])


def test_a_warm_engine_run_loads_nothing_inside_its_timed_window(micro_base, serving_deltas):
    from hf_delta.bench.workload import run_engine

    served = [Served(n, serving_deltas[n], None, [[3, 4, 5], [6, 7, 8, 9]]) for n in ("arith-x1", "cipher-x3")]
    workload = build_workload(served, n_requests=4, rate=float("inf"), popularity="uniform", seed=0, max_tokens=3)
    config = EngineConfig(device_slots=2, cpu_slots=2, kv_cache_tokens=256, max_running=8, max_batch_tokens=64)
    cold, warm = (run_engine(micro_base, served, workload, config=config, device=torch.device("cpu"),
                             dtype=torch.float32, warm=w) for w in (False, True))
    assert cold["loads"] == 2 and warm["loads"] == 0  # both deltas stay attached after the warm-up
    assert cold["tokens"] == warm["tokens"] == 12

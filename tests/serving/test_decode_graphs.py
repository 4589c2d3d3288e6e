"""Decode steps through padded static buffers (what a CUDA graph replays) against the packed step.

On the CPU the padded step runs eagerly (the code a capture records); with ``HF_DELTA_TEST_DEVICE=cuda``
(benchmarks/gpu_check.sh's engine phase) the engine test compares captured graphs with eager steps and, with
``HF_DELTA_TEST_REPORT_DIR`` set, writes what it saw to ``graphs-vs-eager.json`` there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from hf_delta import DeltaModel
from hf_delta.serving import Engine, EngineConfig, SamplingParams
from hf_delta.serving.engine.graphs import DecodeGraphs, _per_forward_state, batch_bucket, length_bucket
from hf_delta.serving.engine.kv_cache import PagedKVCache
from hf_delta.serving.engine.step import Segment, StepBatch, forward_step
from hf_delta.utils.loading import load_model


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 33, 48, 64, 65, 100)] == [
        1, 2, 4, 8, 8, 16, 16, 32, 48, 48, 64, 96, 128]  # fmt: skip
    assert [length_bucket(n, 16) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]


def _cache(model: DeltaModel) -> PagedKVCache:
    cfg = model.config
    return PagedKVCache(
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_tokens=96,
        block_size=4,
    )


def test_padding_rows_change_neither_real_rows_nor_the_cache(micro_zoo, micro_delta):
    model = DeltaModel(load_model(micro_zoo["llama-base"].path))
    for name in ("llama-arith", "llama-cipher"):
        model.load_delta(micro_delta(name), name)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    slots = [0, -1, 1]  # 3 rows: padded to 4, and the padding row decodes on the base
    eager, padded = _cache(model), _cache(model)
    graphs = DecodeGraphs(model, padded, max_batch=8, capture=False)
    with torch.inference_mode():
        for cache in (eager, padded):
            for i, p in enumerate(prompts):
                assert cache.reserve(str(i), len(p) + 3)
            forward_step(
                model,
                StepBatch.pack(
                    [Segment(str(i), 0, len(p), s) for i, (p, s) in enumerate(zip(prompts, slots, strict=True))],
                    prompts,
                ),
                cache,
            )
        spare_block = padded.spare_row() // padded.block_size
        tokens = [[p[-1]] for p in prompts]
        for step in range(3):
            segments = [
                Segment(str(i), len(p) + step, 1, s) for i, (p, s) in enumerate(zip(prompts, slots, strict=True))
            ]
            assert graphs.eligible(segments)
            want = forward_step(model, StepBatch.pack(segments, tokens), eager).logits
            got = graphs.run(segments, tokens).logits
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            tokens = [[int(t)] for t in want.argmax(-1)]
    assert graphs.counters == {"graph_steps": 0, "padded_eager_steps": 3, "captures": 0, "capture_failures": 0}
    # Every cache row but the free block the padding row wrote to is the same.
    rows = torch.ones(eager.capacity, dtype=torch.bool)
    rows[spare_block * eager.block_size : (spare_block + 1) * eager.block_size] = False
    torch.testing.assert_close(padded.keys[:, rows], eager.keys[:, rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.values[:, rows], eager.values[:, rows], rtol=1e-5, atol=1e-5)
    assert eager.keys[:, rows].abs().sum() > 0


def test_a_failed_capture_warns_once_and_runs_eagerly(micro_zoo, caplog):
    # On the CPU every capture fails (no CUDA): the fallback a GPU takes when a layer cannot be captured.
    model = DeltaModel(load_model(micro_zoo["llama-base"].path)).eval()
    cache = _cache(model)
    graphs = DecodeGraphs(model, cache, max_batch=8, capture=True)
    want = []
    with torch.inference_mode(), caplog.at_level("WARNING", logger="hf_delta.serving.engine.graphs"):
        for n in (1, 1, 1, 2, 2, 3, 3):  # three keys, each seen twice: three captures tried
            for i in range(n):
                cache.reserve(f"{n}-{i}", 4)
            segments = [Segment(f"{n}-{i}", 0, 1) for i in range(n)]
            tokens = [[7 + i] for i in range(n)]
            got = graphs.run(segments, tokens).logits
            want = forward_step(model, StepBatch.pack(segments, tokens), cache).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for i in range(n):
                cache.release(f"{n}-{i}")
    assert graphs.counters["capture_failures"] == 3 and graphs.counters["graph_steps"] == 0
    assert len([r for r in caplog.records if "CUDA graph" in r.message]) == 1
    assert not graphs.eligible([Segment("a", 4, 1)])  # three failures: no more tries


def test_a_capture_holds_the_plans_its_kernels_read(micro_zoo, micro_delta):
    model = DeltaModel(load_model(micro_zoo["llama-base"].path))
    model.load_delta(micro_delta("llama-arith"), "a")
    routing = model.routing
    with routing.use(torch.tensor([0, -1, 0])):
        routes = routing.routes(torch.Size((3, 1)), torch.device("cpu"))
        held = _per_forward_state(routing)
    assert routes and held[0] is not routing._plans  # the routing let its plans go when the step's context ended
    assert any(plan is routes for plan in held[0].values())  # the graph still holds them


def test_steps_that_are_not_plain_decodes_are_not_eligible(micro_zoo):
    model = DeltaModel(load_model(micro_zoo["llama-base"].path))
    graphs = DecodeGraphs(model, _cache(model), max_batch=2, capture=False)
    assert graphs.eligible([Segment("a", 4, 1), Segment("b", 2, 1, slot=0)])
    assert not graphs.eligible([Segment("a", 0, 3)])  # a prefill chunk
    assert not graphs.eligible([Segment("a", 4, 1), Segment("t", 0, 1, cached=False)])  # fine-tuning tokens
    assert not graphs.eligible([Segment("a", 4, 1, all_logits=True)])  # prompt log-probabilities
    assert not graphs.eligible([Segment(k, 4, 1) for k in "abc"])  # more rows than max_batch


def _run(engine: Engine, jobs: list[tuple[str, str]]) -> tuple[list[str], float]:
    start = time.perf_counter()
    results = engine.generate(
        [p for _, p in jobs], model=[n for n, _ in jobs], params=SamplingParams(max_tokens=8, ignore_eos=True)
    )
    return [r.text for r in results], time.perf_counter() - start


def test_cuda_graphs_give_the_eager_outputs(micro_base, serving_deltas, serving_prompts):
    device = os.environ.get("HF_DELTA_TEST_DEVICE") or "cpu"
    names = ["arith-x1", "cipher-x10"]
    jobs = [(name, p) for name in [*names, "base"] for p in serving_prompts(name, 2 if device != "cpu" else 1)]
    outputs, seconds, counters = {}, {}, None
    for graphs in (False, True):
        engine = Engine(
            micro_base,
            deltas={n: serving_deltas[n] for n in names},
            device=device,
            config=EngineConfig(kv_cache_tokens=1024, block_size=8, cuda_graphs=graphs),
        )
        if device != "cpu":
            _run(engine, jobs)  # warm-up: loads, kernel compilation and the captures
        outputs[graphs], seconds[graphs] = _run(engine, jobs)
        if graphs and engine.graphs is not None:
            counters = dict(engine.graphs.counters)
        engine.close()
    assert outputs[True] == outputs[False]
    if device.startswith("cuda"):
        report = {
            "device": torch.cuda.get_device_name(),
            "outputs_equal": True,
            "eager_s": seconds[False],
            "graphs_s": seconds[True],
            "speedup": seconds[False] / seconds[True],
            "counters": counters,
        }
        print("graphs vs eager:", json.dumps(report))
        if os.environ.get("HF_DELTA_TEST_REPORT_DIR"):
            out = Path(os.environ["HF_DELTA_TEST_REPORT_DIR"]) / "graphs-vs-eager.json"
            out.write_text(json.dumps(report, indent=2))
        assert counters["graph_steps"] > 0, counters
    else:
        assert counters is None  # a CPU engine has no graphs, whatever the option says

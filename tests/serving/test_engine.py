"""The engine without HTTP: outputs, sampling, stop strings, preemption, residency, fairness, isolation."""

from __future__ import annotations

import os
import time

import pytest

from hf_delta.errors import DeltaLoadError, DeltaNotFoundError, InvalidRequestError
from hf_delta.serving import Engine, EngineConfig, SamplingParams

MAX = 8


def _step_until(engine: Engine, done, limit: int = 2000) -> None:
    """Step until ``done()``; idle steps (a delta still loading in the background) wait a little."""
    for _ in range(limit):
        if done():
            return
        if engine.step() == 0:
            time.sleep(0.002)
    raise AssertionError("the engine made no progress")


def _engine(base, deltas, **config) -> Engine:
    # HF_DELTA_TEST_DEVICE=cuda runs these engines on a GPU (benchmarks/gpu_check.sh); references stay on the CPU.
    return Engine(base, deltas=deltas, config=EngineConfig(**{"kv_cache_tokens": 2048, "block_size": 8, **config}),
                  device=os.environ.get("HF_DELTA_TEST_DEVICE"))


@pytest.fixture(scope="module")
def six(serving_deltas):
    names = ["arith-x1", "arith-x10", "cipher-x10", "facts-x6", "chat-x1", "chat-x10"]
    return {n: serving_deltas[n] for n in names}


def test_mixed_batch_matches_single_request_greedy(micro_base, six, serving_prompts, reference):
    engine = _engine(micro_base, six, device_slots=2, cpu_slots=2)
    jobs = [(name, p) for name in [*six, "base"] for p in serving_prompts(name, 2)]
    results = engine.generate([p for _, p in jobs], model=[n for n, _ in jobs], params=SamplingParams(max_tokens=MAX))
    for (name, prompt), res in zip(jobs, results, strict=True):
        assert res.text == reference(name, prompt, MAX), name
        assert res.finish_reason in ("stop", "length")
    assert len({r.text for r in results}) > 3  # the deltas really differ
    stats = engine.residency.stats()
    assert stats["peak_device"] <= 2 and stats["peak_cpu"] <= 2
    assert stats["device_evictions"] > 0  # six deltas through two slots
    engine.close()


def test_the_device_tier_lives_in_the_layers_resident_slot_buffers(micro_base, six, serving_prompts, reference):
    from hf_delta.layers import DeltaLinear

    engine = _engine(micro_base, six, device_slots=2, cpu_slots=3)
    names = ["arith-x1", "cipher-x10", "facts-x6"]  # three deltas through two device slots
    for name in names:
        prompt = serving_prompts(name, 1)[0]
        res = engine.generate([prompt], model=name, params=SamplingParams(max_tokens=2))[0]
        assert res.text == reference(name, prompt, 2), name
    tiers = engine.residency.stats()["tiers"]
    assert len(tiers["device"]) == 2 and engine.residency.stats()["device_evictions"] == 1
    layers = [m for m in engine.model.modules() if isinstance(m, DeltaLinear)]
    assert layers
    for layer in layers:
        buffers = {id(layer.resident_buffer(n)): layer.resident_buffer(n) for n in tiers["device"]}
        assert all(n not in layer.deltas and layer.resident_buffer(n) is None for n in tiers["cpu"])
        for buffer in buffers.values():  # the engine's device slots, allocated at the first attach; the third
            assert buffer.capacity == 2  # delta took the evicted one's slot instead of growing the buffer
        assert sorted(b.slot_of(n) for b in buffers.values() for n in tiers["device"] if b.slot_of(n) is not None) \
            == [0, 1]
    engine.close()


def test_sampling_is_seeded_and_top_k_1_is_greedy(micro_base, six, serving_prompts, reference):
    engine = _engine(micro_base, six)
    prompt = serving_prompts("facts-x6", 1)[0]
    sampled = SamplingParams(max_tokens=MAX, temperature=1.5, seed=7)
    a, b = (engine.generate([prompt], model="facts-x6", params=sampled)[0].text for _ in range(2))
    assert a == b
    top1 = SamplingParams(max_tokens=MAX, temperature=0.7, top_k=1, seed=1)
    assert engine.generate([prompt], model="facts-x6", params=top1)[0].text == reference("facts-x6", prompt, MAX)
    engine.close()


def test_stop_strings_cut_the_text(micro_base, six, serving_prompts, reference):
    engine = _engine(micro_base, six)
    prompt = serving_prompts("arith-x10", 1)[0]
    full = reference("arith-x10", prompt, MAX)
    stop = full.strip()[1:3] or full[:1]
    res = engine.generate([prompt], model="arith-x10", params=SamplingParams(max_tokens=MAX, stop=[stop]))[0]
    assert res.finish_reason == "stop"
    assert res.text == full[: full.index(stop)]
    engine.close()


def test_preemption_under_a_tiny_kv_budget_keeps_outputs(micro_base, six, serving_prompts, reference):
    engine = _engine(micro_base, six, kv_cache_tokens=64, block_size=4, device_slots=6)
    jobs = [(name, p) for name in six for p in serving_prompts(name, 1)]
    results = engine.generate([p for _, p in jobs], model=[n for n, _ in jobs], params=SamplingParams(max_tokens=12))
    for (name, prompt), res in zip(jobs, results, strict=True):
        assert res.text == reference(name, prompt, 12)
    assert engine.scheduler.preemptions > 0
    assert engine.cache.peak_used_tokens <= engine.cache.capacity == 64
    engine.close()


def test_prefill_is_chunked_and_decodes_keep_going(micro_base, six):
    engine = _engine(micro_base, six, max_batch_tokens=8, max_running=4)
    running = engine.submit("arith-x1", [5, 6, 7], params=SamplingParams(max_tokens=30, ignore_eos=True))
    _step_until(engine, lambda: engine.scheduler.running)
    decoding = engine.scheduler.running[0]
    long = engine.submit("cipher-x10", list(range(10, 90)), params=SamplingParams(max_tokens=2))
    for _ in range(5):
        before = len(decoding.output_ids)
        assert engine.step() <= 8
        assert len(decoding.output_ids) == before + 1  # the running request decodes at every step...
    prefilling = next(r for r in engine.scheduler.running if r.model == "cipher-x10")
    assert 0 < prefilling.num_computed < 80  # ...while the 80-token prompt is prefilled in chunks
    _step_until(engine, lambda: running.done and long.done)
    assert long.result().completion_tokens == 2 and running.result().completion_tokens == 30
    engine.close()


def test_hot_delta_cannot_starve_a_cold_one(micro_base, six):
    engine = _engine(micro_base, six, device_slots=1, cpu_slots=1, fairness_steps=4, max_running=8)
    hot = SamplingParams(max_tokens=4, ignore_eos=True)
    for _ in range(4):
        engine.submit("arith-x1", [5, 6, 7], params=hot)
    _step_until(engine, lambda: engine.scheduler.running)
    cold = engine.submit("cipher-x10", [8, 9, 10], params=SamplingParams(max_tokens=2, ignore_eos=True))
    steps = 0
    for steps in range(1, 61):  # noqa: B007 - the count is asserted below
        engine.submit("arith-x1", [5, 6, 7], params=hot)  # the hot delta never goes quiet
        engine.step()
        time.sleep(0.003)  # lets the background loader read the cold delta
        if cold.done:
            break
    assert cold.done, "the cold request never ran"
    assert steps <= 4 + 5 + 8  # overtaken at most fairness_steps times, then the running hot requests drain
    assert engine.residency.stats()["peak_device"] == 1
    engine.close()


def test_broken_delta_fails_only_its_requests(micro_base, six, broken_delta, serving_prompts, reference):
    engine = _engine(micro_base, {**six, "broken": broken_delta})
    prompt = serving_prompts("arith-x1", 1)[0]
    good = engine.submit("arith-x1", prompt, params=SamplingParams(max_tokens=MAX))
    bad = engine.submit("broken", prompt, params=SamplingParams(max_tokens=MAX))
    engine.generate([prompt], model="chat-x1", params=SamplingParams(max_tokens=MAX))
    _step_until(engine, lambda: good.done and bad.done)
    assert good.result().text == reference("arith-x1", prompt, MAX)
    with pytest.raises(DeltaLoadError, match=r"broken.*corrupt"):
        bad.result()
    engine.close()


def test_a_request_that_breaks_the_forward_fails_alone(micro_base, six, serving_prompts, reference, monkeypatch):
    engine = _engine(micro_base, six)
    prompt = serving_prompts("facts-x6", 1)[0]
    good = engine.submit("facts-x6", prompt, params=SamplingParams(max_tokens=MAX))
    monkeypatch.setattr(engine, "encode", lambda model, p, **kw: list(p))  # let an impossible token id through
    bad = engine.submit("arith-x1", [5, 10**6, 7], params=SamplingParams(max_tokens=MAX))
    _step_until(engine, lambda: good.done and bad.done)
    assert good.result().text == reference("facts-x6", prompt, MAX)
    with pytest.raises(IndexError):
        bad.result()
    engine.close()


def test_requests_that_can_never_run_are_refused(micro_base, six):
    engine = _engine(micro_base, six)
    with pytest.raises(DeltaNotFoundError, match="arith-x1"):
        engine.submit("nope", "hello")
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        engine.submit("arith-x1", "hello", params=SamplingParams(max_tokens=10_000))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.submit("arith-x1", "")
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    engine.close()


def test_background_thread_serves_concurrent_callers(micro_base, six, serving_prompts, reference):
    from concurrent.futures import ThreadPoolExecutor

    engine = _engine(micro_base, six, device_slots=3)
    engine.start()
    jobs = [(name, p) for name in six for p in serving_prompts(name, 1)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda j: engine.submit(j[0], j[1], params=SamplingParams(max_tokens=MAX))
                              .result().text, jobs))
    assert texts == [reference(n, p, MAX) for n, p in jobs]
    engine.close()
    assert not engine.is_running

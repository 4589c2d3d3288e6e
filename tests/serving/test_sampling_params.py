"""The engine's per-request sampling parameters (penalties, ``logit_bias``, ``min_tokens``, log-probabilities of
generated and prompt tokens) against an independent reference built on ``DeltaModel`` (``sampling_reference``),
with delta and ``__base__`` rows in the same steps."""

from __future__ import annotations

import pytest
import torch
from sampling_reference import adjusted, greedy, prompt_logprobs, reference_model

from hf_delta.serving.engine import Engine, EngineConfig, SamplingParams
from hf_delta.serving.engine.logits import adjust_logits

DELTA = "arith-x10"
MAX = 6
TOP = 3


@pytest.fixture(scope="module")
def model(micro_base, serving_deltas):
    return reference_model(micro_base, {DELTA: serving_deltas[DELTA]})


@pytest.fixture(scope="module")
def tokenizer(micro_base):
    from hf_delta.utils.loading import load_tokenizer

    return load_tokenizer(micro_base)


@pytest.fixture(scope="module")
def eos(micro_base, tokenizer) -> frozenset[int]:
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(micro_base).eos_token_id
    ids = {tokenizer.eos_token_id, *(generation if isinstance(generation, list) else [generation])}
    return frozenset(i for i in ids if i is not None)


def _engine(micro_base, serving_deltas, **sizes) -> Engine:
    config = EngineConfig(kv_cache_tokens=4096, block_size=8, **{"max_batch_tokens": 512, "max_running": 64, **sizes})
    return Engine(micro_base, deltas={DELTA: serving_deltas[DELTA]}, config=config)


def _run(engine: Engine, jobs: list[tuple[str, list[int], SamplingParams]]):
    """Submit every job before the first step (so that they share steps) and step until all are done."""
    handles = [engine.submit(name, ids, params=params) for name, ids, params in jobs]
    while not all(h.done for h in handles):
        engine.step()
    return [h.result() for h in handles]


def test_adjusted_logits_equal_the_token_by_token_reference(eos):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=gen) * 4
    prompts = [[1, 2, 3, 3], [4, 5], [7], [1, 1, 9], [2, 8, 8]]
    outputs = [[3, 3, 4], [], [7, 7, 7, 1], [9, 0], [8]]
    kinds = [{"repetition_penalty": 1.7, "frequency_penalty": 0.6},
             {"logit_bias": {5: -100.0, 6: 2.5}, "min_tokens": 2},
             {"presence_penalty": -1.1, "frequency_penalty": 1.9, "repetition_penalty": 0.6},
             {},  # this row is left alone while the others change
             {"min_tokens": 1, "logit_bias": {0: 3.0}, "presence_penalty": 0.4}]
    params = [SamplingParams(**kind) for kind in kinds]
    eos_ids = [eos | {0}] * len(kinds)
    got = adjust_logits(logits, params, prompts, outputs, eos_ids)
    for row, kind in enumerate(kinds):
        want = adjusted(logits[row], prompts[row], outputs[row], eos_ids[row], **kind).float()
        torch.testing.assert_close(got[row], want, rtol=0, atol=1e-5)
    assert not torch.equal(got[0], logits[0]) and torch.equal(got[3], logits[3])


def test_each_parameter_equals_the_reference_with_delta_and_base_rows_in_one_batch(
        micro_base, serving_deltas, serving_prompts, model, eos, tokenizer):
    end = min(eos)
    cases = {
        "plain": {},
        "logit_bias": {"logit_bias": {224: -100.0, 17: 3.0}},
        "frequency_penalty": {"frequency_penalty": 1.5},
        "presence_penalty": {"presence_penalty": 1.5},
        "repetition_penalty": {"repetition_penalty": 2.0},
        "min_tokens": {"min_tokens": 3, "logit_bias": {end: 100.0}},  # EOS at once, but not before 3 tokens
        "together": {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.3,
                     "logit_bias": {224: -5.0}},
    }
    ids = tokenizer(serving_prompts(DELTA, 1)[0])["input_ids"]
    jobs = [(name, ids, SamplingParams(max_tokens=MAX, logprobs=TOP, **kind))
            for kind in cases.values() for name in (DELTA, "base")]
    engine = _engine(micro_base, serving_deltas)
    try:
        results = _run(engine, jobs)
        assert engine.counters["peak_deltas_per_step"] == 2  # delta and base rows ran in the same passes
    finally:
        engine.close()
    refs = {}
    for (case, kind), pair in zip(cases.items(), zip(results[::2], results[1::2], strict=True), strict=True):
        for name, got in zip((DELTA, "__base__"), pair, strict=True):
            want = greedy(model, name, ids, MAX, eos, top=TOP, **kind)
            refs[case, name] = want
            assert got.token_ids == want.tokens, (case, name)
            assert got.finish_reason == want.finish, (case, name)
            assert [e.token for e in got.logprobs] == want.tokens
            torch.testing.assert_close([e.logprob for e in got.logprobs], want.logprobs, rtol=0, atol=1e-4)
            for entry, top in zip(got.logprobs, want.top, strict=True):
                assert [t for t, _ in entry.top] == [t for t, _ in top]
                torch.testing.assert_close([v for _, v in entry.top], [v for _, v in top], rtol=0, atol=1e-4)
    for case in cases:  # every parameter changed what some row generates: none of these checks is vacuous
        if case != "plain":
            assert any(refs[case, n].tokens != refs["plain", n].tokens for n in (DELTA, "__base__")), case
    for name in (DELTA, "__base__"):
        assert len(refs["min_tokens", name].tokens) == 3 and refs["min_tokens", name].finish == "stop"


def test_prompt_logprobs_over_chunked_prefill_and_max_tokens_0(micro_base, serving_deltas, serving_prompts, model,
                                                                tokenizer):
    prompts = [tokenizer(p)["input_ids"] for p in serving_prompts(DELTA, 2)]
    assert min(len(p) for p in prompts) > 8  # longer than a step's budget: prefilled in chunks
    jobs = [(name, ids, SamplingParams(max_tokens=max_tokens, prompt_logprobs=2, logprobs=1 if max_tokens else None))
            for ids in prompts for name in (DELTA, "base") for max_tokens in (0, 2)]
    engine = _engine(micro_base, serving_deltas, max_batch_tokens=8, max_running=8)
    try:
        results = _run(engine, jobs)
    finally:
        engine.close()
    for (name, ids, params), got in zip(jobs, results, strict=True):
        want = prompt_logprobs(model, "__base__" if name == "base" else name, ids, top=2)
        assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(ids)
        assert [e.token for e in got.prompt_logprobs[1:]] == ids[1:]
        torch.testing.assert_close([e.logprob for e in got.prompt_logprobs[1:]], want.logprobs, rtol=0, atol=1e-4)
        assert [[t for t, _ in e.top] for e in got.prompt_logprobs[1:]] == [[t for t, _ in top] for top in want.top]
        if params.max_tokens == 0:
            assert got.token_ids == [] and got.text == "" and got.finish_reason == "length"
        else:
            assert len(got.token_ids) == len(got.logprobs) == 2


def test_max_tokens_0_needs_prompt_logprobs_and_min_tokens_fits():
    from hf_delta.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="max_tokens must be at least 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101})
    with pytest.raises(InvalidRequestError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)

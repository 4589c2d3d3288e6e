"""Incremental detokenization and stop strings (TextStream) against whole-sequence decoding; batched sampling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from hf_delta.serving.engine.sampling import SamplingParams, TextStream, make_generator, sample_rows


@pytest.fixture(scope="module")
def tokenizer(micro_zoo):
    return AutoTokenizer.from_pretrained(micro_zoo["llama-base"].path)


def _ids(tokenizer, texts: list[str]) -> list[int]:
    return [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]


@settings(max_examples=40, deadline=None)
@given(pieces=st.lists(st.sampled_from(["héllo", " wörld", "→", "日本", " 42", "\n", "def f(x):", "😀", " ok"]),
                       min_size=1, max_size=12))
def test_streamed_text_is_the_whole_decode(tokenizer, pieces):
    ids = _ids(tokenizer, pieces)
    stream = TextStream(tokenizer)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True) == "".join(pieces)


def test_stop_string_cuts_the_text_and_is_never_sent(tokenizer):
    ids = _ids(tokenizer, ["answer: 42", " END", " more text"])
    stream = TextStream(tokenizer, stop=["END"])
    sent = []
    for i in ids:
        sent.append(stream.push(i))
        if stream.stopped:
            break
    assert stream.stopped and "".join(sent) + stream.flush() == "answer: 42 "
    assert "E" not in "".join(sent)  # a possible stop prefix is held back, not sent and retracted


def test_a_row_sampled_in_a_batch_gets_the_token_it_gets_alone():
    logits = torch.randn(12, 300, generator=torch.Generator().manual_seed(0)) * 3
    kinds = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=20),
             SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.5, top_k=50, top_p=0.6)]
    params = [kinds[i % len(kinds)] for i in range(len(logits))]
    batched = sample_rows(logits, params, [make_generator(i) for i in range(len(logits))])
    alone = [sample_rows(logits[i : i + 1], [p], [make_generator(i)])[0] for i, p in enumerate(params)]
    assert batched == alone


def test_draws_follow_the_filtered_distribution():
    """Many rows with their own generators: token frequencies match temperature → top-k → top-p computed here
    by hand (sorted lists), and filtered tokens are never drawn."""
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.2, -1.0, 0.9])
    temperature, top_k, top_p = 0.8, 5, 0.85
    scaled = (logits / temperature).tolist()
    kept = sorted(range(len(scaled)), key=lambda t: -scaled[t])[:top_k]
    weights = {t: torch.tensor(scaled[t]).exp().item() for t in kept}
    total = sum(weights.values())
    nucleus, mass = {}, 0.0
    for t in kept:  # most likely first, until the mass before a token reaches top_p
        if mass >= top_p:
            break
        nucleus[t] = weights[t] / total
        mass += weights[t] / total
    want = {t: p / sum(nucleus.values()) for t, p in nucleus.items()}
    rows = 4000
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * rows
    drawn = sample_rows(logits.expand(rows, -1), params, [make_generator(i) for i in range(rows)])
    assert set(drawn) <= set(want)
    for token, p in want.items():
        assert abs(drawn.count(token) / rows - p) < 0.03, (token, drawn.count(token) / rows, p)


def test_no_stop_string_before_min_tokens(tokenizer):
    first = len(_ids(tokenizer, ["END x"]))
    ids = _ids(tokenizer, ["END x", " END", " more"])
    stream = TextStream(tokenizer, stop=["END"])
    sent = []
    for n, i in enumerate(ids, start=1):
        sent.append(stream.push(i, can_stop=n > first))  # min_tokens = the tokens of "END x"
        if stream.stopped:
            break
    assert stream.stopped and "".join(sent) + stream.flush() == "END x "

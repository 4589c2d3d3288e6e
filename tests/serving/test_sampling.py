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

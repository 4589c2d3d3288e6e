"""Incremental detokenization and stop strings (TextStream) against whole-sequence decoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from hf_delta.serving.sampling import TextStream


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

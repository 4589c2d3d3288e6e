"""Evaluation maths against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from hf_delta.evaluation import (
    exact_match,
    kl_divergence,
    perplexity_from_nll,
    retention,
    to_markdown,
    token_nll,
)
from hf_delta.zoo.tasks import Example, Task


def test_kl_matches_hand_computation():
    p, q = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # sum p log p/q
    logits_p, logits_q = torch.tensor([p]).log(), torch.tensor([q]).log()
    assert kl_divergence(logits_p, logits_q) == pytest.approx(expected, abs=1e-9)
    assert kl_divergence(logits_p, logits_p) == pytest.approx(0.0, abs=1e-12)
    # masked positions are ignored: the mean is over the one real position
    both = torch.stack([logits_p[0], logits_q[0]])
    assert kl_divergence(both[None], torch.stack([logits_q[0], logits_q[0]])[None],
                         torch.tensor([[1, 0]])) == pytest.approx(expected, abs=1e-9)


def test_perplexity_and_nll_ignore_padding():
    # vocab of 2, uniform predictions -> NLL = log 2 per real token, perplexity exactly 2
    logits = torch.zeros(1, 4, 2)
    ids = torch.tensor([[0, 1, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    nll = token_nll(logits, ids, mask)
    assert nll.shape == (2,)  # predictions of tokens 1 and 2 only; the padded target is dropped
    assert perplexity_from_nll(nll) == pytest.approx(2.0)
    logits[0, 0] = torch.tensor([0.0, math.log(3)])  # p(next=1) = 3/4
    nll = token_nll(logits, ids, mask)
    assert perplexity_from_nll(nll) == pytest.approx(math.exp((-math.log(0.75) + math.log(2)) / 2))


def test_retention():
    assert retention(80.0, 10.0, 90.0) == pytest.approx(70 / 80)
    assert retention(10.0, 10.0, 90.0) == 0.0
    with pytest.raises(ValueError, match="undefined"):
        retention(1.0, 5.0, 5.0)


class _Echo:
    """A fake LM whose greedy answers are scripted, to test exact_match's bookkeeping."""

    def __init__(self, tokenizer, answers):
        self.tok, self.answers = tokenizer, answers

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for _ in range(len(input_ids)):
            ids = self.tok(self.answers.pop(0), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            rows.append((ids + [self.tok.pad_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_exact_match_counts_only_exact_answers(micro_zoo):
    from hf_delta.utils.loading import load_tokenizer

    tok = load_tokenizer(micro_zoo["llama-base"].path)
    examples = tuple(Example(f"q{i}", f" a{i}") for i in range(4))
    task = Task("t", "", train=(), heldout=examples)
    model = _Echo(tok, [" a0", " a1 extra", " wrong", " a3"])
    assert exact_match(model, tok, task, batch_size=3) == pytest.approx(50.0)


def test_markdown_table():
    md = to_markdown([{"a": 1, "b": 0.12345}, {"a": 2, "b": None}])
    assert md.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| 2 |  |"]

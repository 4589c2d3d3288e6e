"""The ``logprobs`` objects of OpenAI's answers, from the engine's ``TokenLogprob`` entries.

Completions (legacy shape, as OpenAI and vLLM return it; ``echo`` puts the prompt's tokens first, the first of
them with ``null`` log-probabilities)::

    {"tokens": [str], "token_logprobs": [float | null], "top_logprobs": [{str: float} | null],
     "text_offset": [int]}

Chat::

    {"content": [{"token": str, "logprob": float, "bytes": [int],
                  "top_logprobs": [{"token": str, "logprob": float, "bytes": [int]}]}], "refusal": null}

A token's string is what it decodes to alone; ``text_offset`` counts characters from the start of the choice's
``text`` (the echoed prompt included), adding up those strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..engine.logits import TokenLogprob


class TokenStrings:
    """Each token id's text alone (memoised: the same ids come back in every answer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._memo: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self._memo:
            self._memo[token] = self.tokenizer.decode([token])
        return self._memo[token]


def completion_logprobs(strings: TokenStrings, tokens: Sequence[int], entries: Sequence[TokenLogprob | None],
                        offset: int = 0) -> tuple[dict[str, Any], int]:
    """The completions ``logprobs`` object of ``tokens`` (``entries[i]`` is ``tokens[i]``'s, ``None`` when it has
    nothing before it) whose text starts at character ``offset``; and the offset after them."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, entries, strict=True):
        text = strings(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        out["token_logprobs"].append(None if entry is None else entry.logprob)
        out["top_logprobs"].append(None if entry is None else {strings(t): lp for t, lp in entry.top})
    return out, offset


def merge_completion_logprobs(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two completions ``logprobs`` objects one after the other (an echoed prompt, then the completion)."""
    return {key: first[key] + second[key] for key in first}


def chat_logprobs(strings: TokenStrings, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The chat ``logprobs`` object of generated tokens."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = strings(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}

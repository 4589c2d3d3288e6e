"""Sampling parameters, the per-row sampler, and incremental detokenisation with stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ...errors import InvalidRequestError


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Args:
        max_tokens: most tokens to generate.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability adds up to ``top_p``.
        top_k: keep only the ``top_k`` most likely tokens (0 = all).
        seed: seed of this request's own random generator (sampled outputs are then reproducible).
        stop: strings that end the generation; the returned text stops before the first one.
        ignore_eos: keep generating past end-of-sequence tokens (benchmarks with fixed output lengths).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` (``[K, vocab]``): argmax for greedy rows, a draw for the others.

    Rows with the same temperature, top-k and top-p are scaled, filtered and softmaxed together and copied to the
    host at once (not one device round trip per row); each still draws from its own generator, so a row gets the
    token it would get alone.
    """
    out = logits.argmax(dim=-1).tolist()
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, p in enumerate(params):
        if not p.greedy:
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    for (temperature, top_k, top_p), rows in groups.items():
        scaled = logits[rows].float() / temperature
        if top_k and top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, top_k).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if top_p < 1:
            probs = torch.stack([_top_p(row, top_p) for row in probs])
        for i, row in zip(rows, probs.cpu(), strict=True):
            out[i] = int(torch.multinomial(row, 1, generator=generators[i]).item())
    return out


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` (one row) with all but the smallest set of most likely tokens that adds up to ``top_p`` zeroed."""
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
    return torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request (seeded, or from fresh entropy)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


class TextStream:
    """Turn generated token ids into text deltas, holding back what may still become a stop string.

    ``push(token)`` returns the new text that is final, and whether a stop string was hit (the text before
    it has then been returned in full). ``flush()`` returns what was held back when generation ends.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # final text so far (everything returned)
        self._full = ""  # everything decoded so far
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of _full (a window, not the whole output)
        self._read = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        # A fast tokenizer's own decoder gives the same text without transformers' per-call conversions (this
        # runs twice per generated token); space clean-up is transformers' only extra step, so keep it there.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        # Decode a short window: the text of ids[prefix:] minus that of ids[prefix:read] is what the new
        # token adds (a window keeps tokenizers that merge across token boundaries right, at O(1) per token).
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if after.endswith("\ufffd") or len(after) < len(before) or not after.startswith(before):
            return ""  # an incomplete UTF-8 sequence (or a rewrite): wait for the next token
        self._full += after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        full = self._full
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut])
        return self._emit(full[: len(full) - self._held(full)])

    def flush(self) -> str:
        if self.stopped:
            return ""
        full = self._decode(self.ids)  # the whole text, incomplete UTF-8 tails included (as ``decode`` gives it)
        cut = self._first_stop(full)
        return self._emit(full if cut is None else full[:cut])

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""  # a decoder may rewrite earlier text (rare); never send text twice
        new = upto[len(self.text) :]
        self.text = upto
        return new

    def _first_stop(self, full: str) -> int | None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held(self, full: str) -> int:
        """Length of the longest suffix of ``full`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:n]):
                    best = n
                    break
        return best

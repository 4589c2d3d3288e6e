"""Sampling parameters, the per-row sampler, and incremental detokenisation with stop strings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ...errors import InvalidRequestError

MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (OpenAI's limit)


@dataclass
class SamplingParams:
    """How one request picks its tokens, what it reports and when it stops.

    Args:
        max_tokens: most tokens to generate (0 only with ``prompt_logprobs``: score the prompt, generate nothing).
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability adds up to ``top_p``.
        top_k: keep only the ``top_k`` most likely tokens (0 = all).
        seed: seed of this request's own random generator (sampled outputs are then reproducible).
        stop: strings that end the generation; the returned text stops before the first one.
        ignore_eos: keep generating past end-of-sequence tokens (benchmarks with fixed output lengths).
        logprobs: report each generated token's log-probability and its ``logprobs`` most likely alternatives
            (None = report nothing). Log-probabilities are the model's own (log-softmax of the raw logits, before
            penalties, bias and temperature), as vLLM reports them.
        prompt_logprobs: the same for every prompt token after the first (None = not computed).
        presence_penalty: subtracted once from the logit of every token already generated (OpenAI's).
        frequency_penalty: subtracted from a token's logit once per time it was generated (OpenAI's).
        repetition_penalty: logits of tokens in the prompt or the output are divided by it when positive and
            multiplied by it when negative (CTRL / transformers / vLLM; 1 = off).
        logit_bias: ``{token id: bias}`` added to the logits (OpenAI's; -100 bans a token in practice).
        min_tokens: end-of-sequence tokens and stop strings cannot end the output before this many tokens.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
        least = 0 if self.prompt_logprobs is not None else 1
        if self.max_tokens < least:
            why = "." if least == 0 else " (0 only when scoring the prompt: echo with logprobs)."
            raise InvalidRequestError(f"max_tokens must be at least {least}, got {self.max_tokens}{why}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}.")
        if not self.repetition_penalty > 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}.")
        bad = {t: b for t, b in self.logit_bias.items() if t < 0 or not -100 <= b <= 100}
        if bad:
            raise InvalidRequestError(f"logit_bias maps token ids >= 0 to values in [-100, 100]; got {bad}.")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                                      f"got {self.min_tokens}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties, a bias or ``min_tokens`` change this request's logits before a token is picked."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.min_tokens)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` (``[K, vocab]``): argmax for greedy rows, a draw for the others (see
    ``draw_tokens``; this is it with the tokens copied to the host)."""
    return draw_tokens(logits, params, generators).tolist()


def draw_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """``[K]`` tokens on the logits' device, one per row: argmax for greedy rows, a draw for the others.

    Semantics, for each sampled row ``i`` (all rows at once on the logits' device; nothing is read back)::

        p = softmax(top_k(logits[i] / temperature[i]))    # ties with the k-th logit are kept
        p = p · [p is in the smallest set of most likely tokens adding up to top_p[i]]
        token[i] = argmax(p / e),  e ~ Exponential(1) drawn from generators[i]   # a draw from p (renormalised)

    Each row draws its noise from its own generator (on the logits' device), so a row gets the token it
    would get alone, whatever else is in the batch.
    """
    picked = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        device = logits.device
        chosen = [params[i] for i in rows]
        probs = _filtered_probs(
            logits[rows].float(), torch.tensor([p.temperature for p in chosen], device=device),
            torch.tensor([p.top_k for p in chosen], device=device),
            torch.tensor([p.top_p for p in chosen], device=device))
        draws = [(row / torch.empty_like(row).exponential_(generator=generators[i])).argmax()
                 for i, row in zip(rows, probs, strict=True)]
        picked[torch.tensor(rows, device=device)] = torch.stack(draws)
    return picked


def _filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor) -> torch.Tensor:
    """Per-row temperature, top-k and top-p over ``logits`` ``[R, vocab]``: unnormalised probabilities."""
    vocab = logits.shape[-1]
    scaled = logits / temperature[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = sorted_logits.gather(1, (k - 1)[:, None])
    probs = torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1)
    sorted_p = probs.gather(1, order)  # the same order: softmax keeps it, filtered tokens sort last
    drop = (sorted_p.cumsum(-1) - sorted_p >= top_p[:, None]) & (top_p < 1)[:, None]  # keeps the most likely
    return torch.zeros_like(probs).scatter_(1, order, sorted_p.masked_fill(drop, 0.0))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request on ``device`` (seeded, or from fresh entropy)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


class TextStream:
    """Turn generated token ids into text deltas, holding back what may still become a stop string.

    ``push(token)`` returns the new text that is final, and whether a stop string was hit (the text before
    it has then been returned in full); ``push(token, can_stop=False)`` neither looks for stop strings nor holds
    text back (a request still short of its ``min_tokens``): stop strings are then looked for only in the text
    that comes after. ``flush()`` returns what was held back when generation ends.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # final text so far (everything returned)
        self._full = ""  # everything decoded so far
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of _full (a window, not the whole output)
        self._read = 0
        self._searched_from = 0  # stop strings may start here or later (after the text sent while they could not)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        # A fast tokenizer's own decoder gives the same text without transformers' per-call conversions (this
        # runs twice per generated token); space clean-up is transformers' only extra step, so keep it there.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int, *, can_stop: bool = True) -> str:
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
        if not can_stop:
            text = self._emit(full)
            self._searched_from = len(self.text)
            return text
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
        start = max(self._searched_from, len(self.text) - max((len(s) for s in self.stop), default=0))
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

"""From a step's logits to what its requests get: the per-request adjustments that come before sampling
(``logit_bias``, ``min_tokens``, repetition / frequency / presence penalties), the pick itself, and the
log-probabilities reported to clients (of generated tokens, and of prompt tokens for ``echo``). All of it runs
on the logits' device for all rows at once."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from .sampling import SamplingParams, draw_tokens
from .scheduler import Request


@dataclass
class TokenLogprob:
    """A token's log-probability under the model and the ``top`` most likely tokens at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def adjust_logits(logits: torch.Tensor, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]],
                  outputs: Sequence[Sequence[int]], eos_ids: Sequence[Collection[int]]) -> torch.Tensor:
    """The logits each request samples from (float32, a new tensor; rows without adjustments are copies).

    Semantics, for each row ``i`` with ``params[i].adjusts_logits`` (the order of vLLM's sampler)::

        x = logits[i] + logit_bias                                   # OpenAI's bias, token by token
        x[eos_ids[i]] = -inf         if len(outputs[i]) < min_tokens
        x[t] = x[t] / r if x[t] > 0 else x[t] · r    for t in prompts[i] ∪ outputs[i]   (r = repetition_penalty)
        x[t] -= frequency_penalty · count(t in outputs[i]) + presence_penalty · [t in outputs[i]]
    """
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    out = logits.to(torch.float32, copy=True)
    if not rows:
        return out
    device, vocab = logits.device, logits.shape[-1]
    chosen = [params[i] for i in rows]
    x = out[rows]
    added: list[tuple[int, int, float]] = []  # (row, token, value)
    for r, (i, p) in enumerate(zip(rows, chosen, strict=True)):
        added.extend((r, token, bias) for token, bias in p.logit_bias.items())
        if len(outputs[i]) < p.min_tokens:
            added.extend((r, token, float("-inf")) for token in eos_ids[i])
    if added:
        where_r, where_t, values = zip(*added, strict=True)
        x.index_put_((torch.tensor(where_r, device=device), torch.tensor(where_t, device=device)),
                     torch.tensor(values, device=device), accumulate=True)
    if any(p.repetition_penalty != 1 for p in chosen):
        seen = _occurrences(x.shape[0], vocab, [list(prompts[i]) + list(outputs[i]) for i in rows], device) > 0
        penalty = torch.tensor([p.repetition_penalty for p in chosen], device=device)[:, None]
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    if any(p.frequency_penalty or p.presence_penalty for p in chosen):
        counts = _occurrences(x.shape[0], vocab, [outputs[i] for i in rows], device)
        frequency = torch.tensor([p.frequency_penalty for p in chosen], device=device)[:, None]
        presence = torch.tensor([p.presence_penalty for p in chosen], device=device)[:, None]
        x = x - frequency * counts - presence * (counts > 0)
    out[rows] = x
    return out


def _occurrences(num_rows: int, vocab: int, ids: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """``[num_rows, vocab]`` float counts of each token in ``ids[r]`` (ids outside the vocabulary are not counted)."""
    width = max((len(row) for row in ids), default=0)
    padded = torch.full((num_rows, max(width, 1)), vocab, dtype=torch.long)
    for r, row in enumerate(ids):
        padded[r, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    padded = padded.clamp_(0, vocab).to(device)
    counts = torch.zeros(num_rows, vocab + 1, device=device)
    return counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))[:, :vocab]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int] | torch.Tensor,
                   top: Sequence[int]) -> list[TokenLogprob]:
    """Log-probability of ``tokens[r]`` under row ``r`` of ``logits`` (``[R, vocab]``, raw: log-softmax in float32)
    and the row's ``top[r]`` most likely tokens, most likely first (one copy to the host for all rows)."""
    if not len(tokens):
        return []
    tokens = torch.as_tensor(tokens, dtype=torch.long).to(logits.device)
    _, found = _read_back(tokens, logits, top)
    return found


def _read_back(tokens: torch.Tensor, logits: torch.Tensor, top: Sequence[int]
               ) -> tuple[list[int], list[TokenLogprob]]:
    """``tokens`` (``[R]``, on the logits' device) and the ``TokenLogprob`` of each under its row of ``logits``
    with ``top[r]`` alternatives, read back in one copy: token, log-probability, top ids and top values share one
    float64 tensor (token ids and float32 values are exact in float64)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    k = max(top)
    values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    host = torch.cat([tokens[:, None].double(), logprobs.gather(1, tokens[:, None]).double(), ids.double(),
                      values.double()], dim=1).tolist()
    found = [TokenLogprob(int(row[0]), row[1], [(int(i), v) for i, v in zip(row[2 : 2 + n], row[2 + k : 2 + k + n],
                                                                            strict=True)])
             for row, n in zip(host, top, strict=True)]
    return [entry.token for entry in found], found


def pick_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token of each request (row ``i`` of ``logits`` is ``requests[i]``'s last position) and, for those
    that asked for ``logprobs``, its log-probability and the top alternatives.

    The tokens are drawn on the logits' device and come back to the host with the log-probabilities in one copy:
    the step's only wait for the device after its forward pass.
    """
    params = [r.params for r in requests]
    adjusted = (adjust_logits(logits, params, [r.prompt_ids for r in requests], [r.output_ids for r in requests],
                              [r.eos_ids for r in requests])
                if any(p.adjusts_logits for p in params) else logits)
    tokens = draw_tokens(adjusted, params, [r.state["generator"] for r in requests])
    report = [i for i, p in enumerate(params) if p.logprobs is not None]
    entries: list[TokenLogprob | None] = [None] * len(requests)
    if not report:
        return tokens.tolist(), entries
    picked, found = _read_back(tokens, logits, [p.logprobs or 0 for p in params])
    for i in report:
        entries[i] = found[i]
    return picked, entries


def score_prompt(request: Request, start: int, logits: torch.Tensor) -> None:
    """Record in ``request.state["prompt_logprobs"]`` what the logits of positions ``start, start+1, ...`` say
    about the prompt tokens that follow them; marks the prompt scored once its last token is."""
    scored = request.state["prompt_logprobs"]
    end = min(start + logits.shape[0], len(request.prompt_ids) - 1)  # position end-1 scores the last token
    if end <= start:
        return
    targets = request.prompt_ids[start + 1 : end + 1]
    entries = token_logprobs(logits[: end - start], targets, [request.params.prompt_logprobs] * len(targets))
    scored[start + 1 : end + 1] = entries
    if end == len(request.prompt_ids) - 1:
        request.state["prompt_scored"] = True

"""An independent reference for the serving engine's sampling parameters.

Logits come from ``DeltaModel`` itself (a plain full forward over the whole sequence for every token, no
KV cache, no packing); log-probabilities are a float64 log-softmax of them; penalties, ``logit_bias`` and
``min_tokens`` are applied token by token in Python, in the documented order (bias and ``min_tokens``, then
repetition, frequency and presence penalties, as vLLM's sampler does).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


def reference_model(base: Path, deltas: Mapping[str, Path]):
    """A ``DeltaModel`` over ``base`` with ``deltas`` (``{name: folder}``) added, in eval mode."""
    from hf_delta import DeltaModel
    from hf_delta.storage import Delta
    from hf_delta.utils.loading import load_model

    model = DeltaModel(load_model(base))
    for name, folder in deltas.items():
        model.add_delta(name, Delta.from_folder(folder))
    return model.eval()


def adjusted(logits: torch.Tensor, prompt: Sequence[int], output: Sequence[int], eos: Collection[int], *,
             logit_bias: Mapping[int, float] | None = None, min_tokens: int = 0, repetition_penalty: float = 1.0,
             frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> torch.Tensor:
    """One row of logits after the request's adjustments (float64)."""
    x = logits.double().clone()
    for token, bias in (logit_bias or {}).items():
        x[int(token)] += bias
    if len(output) < min_tokens:
        for token in eos:
            x[token] = float("-inf")
    for token in set(prompt) | set(output):
        x[token] = x[token] / repetition_penalty if x[token] > 0 else x[token] * repetition_penalty
    for token in set(output):
        x[token] -= frequency_penalty * list(output).count(token) + presence_penalty
    return x


@dataclass
class Generated:
    """Greedy tokens, each one's log-probability under the model and its top alternatives, and why it ended."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: str = "length"


def _logits(model, name: str, ids: Sequence[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([list(ids)]), delta_names=[name]).logits[0]


def greedy(model, name: str, prompt: Sequence[int], max_tokens: int, eos: Collection[int], *, top: int = 0,
           **adjustments) -> Generated:
    """``model``'s greedy continuation of ``prompt`` with delta ``name`` (``"__base__"``: the base) under
    ``adjustments`` (``adjusted``'s keywords); stops before an end-of-sequence token."""
    out = Generated()
    for _ in range(max_tokens):
        logits = _logits(model, name, list(prompt) + out.tokens)[-1]
        token = int(adjusted(logits, prompt, out.tokens, eos, **adjustments).argmax())
        if token in eos:
            out.finish = "stop"
            break
        raw = torch.log_softmax(logits.double(), dim=-1)
        values, ids = raw.topk(top)
        out.tokens.append(token)
        out.logprobs.append(float(raw[token]))
        out.top.append(list(zip(ids.tolist(), values.tolist(), strict=True)))
    return out


def prompt_logprobs(model, name: str, prompt: Sequence[int], *, top: int = 0) -> Generated:
    """The log-probability of every prompt token after the first given the ones before it, and the top
    alternatives at each of those positions."""
    raw = torch.log_softmax(_logits(model, name, prompt)[:-1].double(), dim=-1)
    out = Generated(tokens=list(prompt[1:]))
    for position, token in enumerate(prompt[1:]):
        values, ids = raw[position].topk(top)
        out.logprobs.append(float(raw[position, token]))
        out.top.append(list(zip(ids.tolist(), values.tolist(), strict=True)))
    return out

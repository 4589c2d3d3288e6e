"""How much of a fine-tune survives: task exact-match, perplexity, KL to the fine-tune, retention, size.

All functions take ordinary causal LMs (or a ``DeltaModel``) and their tokenizer, so the same numbers are
computed for a base, a fine-tune, and a compressed delta applied to the base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .utils.padding import left_pad
from .zoo.build import encode_example, task_prompt
from .zoo.tasks import Task, fresh_examples


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), cut at the first end-of-sequence token.

    Extra keyword arguments go to ``model.generate`` (e.g. ``delta_names=[...]`` for a ``DeltaModel``; a
    list-valued keyword with one entry per prompt is sliced per batch).
    """
    eos = tokenizer.eos_token_id
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        ids, mask = left_pad(rows, tokenizer.pad_token_id)
        kwargs = {k: (v[start : start + batch_size] if isinstance(v, list) and len(v) == len(prompts) else v)
                  for k, v in generate_kwargs.items()}
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **kwargs)
        for row in out[:, ids.shape[1] :].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outputs


def exact_match(model, tokenizer, task: Task, *, split: str = "heldout", batch_size: int = 64,
                **generate_kwargs: Any) -> float:
    """Percentage (0-100) of ``task``'s examples whose greedy answer equals the reference exactly."""
    examples = task.heldout if split == "heldout" else task.train
    prompts = [task_prompt(tokenizer, task, ex) for ex in examples]
    longest = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
    answers = greedy_generate(model, tokenizer, prompts, max_new_tokens=longest + 1, batch_size=batch_size,
                              **generate_kwargs)
    hits = sum(a.strip() == ex.answer.strip() for a, ex in zip(answers, examples, strict=True))
    return 100.0 * hits / len(examples)


def _task_batch(tokenizer, task: Task, examples) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[*p, *a] for p, a in (encode_example(tokenizer, task, ex) for ex in examples)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of every real next token (padding excluded), as a flat tensor."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return nll[keep]


def perplexity_from_nll(nll: torch.Tensor) -> float:
    """exp(mean NLL)."""
    return math.exp(nll.double().mean().item())


@torch.no_grad()
def perplexity(model, tokenizer, task: Task, *, batch_size: int = 64, **forward_kwargs: Any) -> float:
    """Perplexity of the model on ``task``'s held-out texts (prompt, answer and end token)."""
    nlls = []
    for start in range(0, len(task.heldout), batch_size):
        ids, mask = _task_batch(tokenizer, task, task.heldout[start : start + batch_size])
        logits = model(input_ids=ids, attention_mask=mask, **forward_kwargs).logits
        nlls.append(token_nll(logits, ids, mask))
    return perplexity_from_nll(torch.cat(nlls))


def kl_divergence(reference_logits: torch.Tensor, candidate_logits: torch.Tensor,
                  mask: torch.Tensor | None = None) -> float:
    """Mean over (unmasked) positions of KL(p_reference ‖ p_candidate) in nats."""
    ref = F.log_softmax(reference_logits.double(), dim=-1)
    cand = F.log_softmax(candidate_logits.double(), dim=-1)
    kl = (ref.exp() * (ref - cand)).sum(-1)
    if mask is not None:
        kl = kl[mask.bool()]
    return kl.mean().item()


@torch.no_grad()
def mean_kl(reference, candidate, tokenizer, task: Task, *, batch_size: int = 64,
            candidate_kwargs: dict | None = None) -> float:
    """Mean next-token KL(reference ‖ candidate) over the real tokens of ``task``'s held-out texts."""
    total, count = 0.0, 0
    for start in range(0, len(task.heldout), batch_size):
        ids, mask = _task_batch(tokenizer, task, task.heldout[start : start + batch_size])
        ref = reference(input_ids=ids, attention_mask=mask).logits
        cand = candidate(input_ids=ids, attention_mask=mask, **(candidate_kwargs or {})).logits
        n = int(mask.sum())
        total += kl_divergence(ref, cand[..., : ref.shape[-1]], mask) * n
        count += n
    return total / count


def retention(candidate: float, base: float, finetune: float) -> float:
    """(candidate − base) / (fine-tune − base): 1.0 keeps all the fine-tune's gain, 0.0 none of it."""
    if finetune == base:
        raise ValueError("retention is undefined when the fine-tune scores the same as its base")
    return (candidate - base) / (finetune - base)


@dataclass
class EvalRow:
    """One line of an evaluation table."""

    model: str
    task: str
    exact_match: float
    perplexity: float
    base_exact_match: float | None = None
    finetune_exact_match: float | None = None
    retention: float | None = None
    kl: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def to_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render dict rows as a Markdown table (floats with 3 significant decimals)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def task_calibration(tokenizer, task: Task, n: int = 64) -> list[str]:
    """Calibration texts from the fine-tune's own training split (never the held-out split)."""
    return [task_prompt(tokenizer, task, ex) + ex.answer + tokenizer.eos_token for ex in task.train[:n]]


def task_verification(tokenizer, task: Task, n: int = 256) -> list[str]:
    """Prompts to verify a compression on (``AutoConfig.heldout_samples``), without answers: the fine-tune's own
    continuations are the reference. For most tasks, prompts of ``n`` new examples, neither trained on nor
    scored, so that lost generalisation shows. A memorisation task has nothing to generalise to: its prompts are
    the facts' own (at most ``len(task.train)``; its scored split is among them, as it is among its calibration
    texts), so that lost recall shows, not changed guesses about countries it never learned (keeping those took
    llama-facts' auto-0.99 delta to 1.4 MB)."""
    examples = task.train[:n] if task.memorisation else fresh_examples(task, n)
    return [task_prompt(tokenizer, task, ex) for ex in examples]


def __getattr__(name: str):
    from ._deprecated import moved_attribute

    return moved_attribute(__name__, name)

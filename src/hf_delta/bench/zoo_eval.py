"""The zoo's evaluation table: every fine-tune against its base on its own held-out task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..evaluation import exact_match, perplexity
from ..utils.loading import load_model_and_tokenizer
from ..zoo.build import Zoo, build_zoo, load_zoo


def linear_layers_changed(base: torch.nn.Module, finetuned: torch.nn.Module) -> tuple[int, int]:
    """(changed, total) linear layers: a real full fine-tune changes every one of them."""
    fstate = finetuned.state_dict()
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    changed = 0
    for n in names:
        b, f = base.get_submodule(n).weight, fstate[f"{n}.weight"]
        changed += int(not torch.equal(b, f[: b.shape[0]]))
    return changed, len(names)


def evaluate_zoo(size: str = "small", directory: str | Path | None = None, *, build: bool = False) -> list[dict]:
    """Base vs fine-tune exact match and perplexity on each fine-tune's held-out task."""
    zoo: Zoo = build_zoo(size, directory) if build else load_zoo(size, directory)
    rows: list[dict[str, Any]] = []
    for entry in zoo.finetunes:
        task = zoo.task(entry.name)
        base, _ = load_model_and_tokenizer(zoo[entry.base].path)
        ft, tok = load_model_and_tokenizer(entry.path)
        if len(tok) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tok), mean_resizing=False)  # base never saw the new tokens
        changed, total = linear_layers_changed(base, ft)
        base_em, ft_em = exact_match(base, tok, task), exact_match(ft, tok, task)
        rows.append({
            "fine-tune": entry.name, "base": entry.base, "task": task.name, "heldout": len(task.heldout),
            "base_exact_match": base_em, "finetune_exact_match": ft_em, "gain": ft_em - base_em,
            "base_ppl": perplexity(base, tok, task), "finetune_ppl": perplexity(ft, tok, task),
            "linear_layers_changed": f"{changed}/{total}",
        })
    return rows

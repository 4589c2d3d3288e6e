"""Calibration data for compression: the user's texts, or text sampled from the fine-tune itself."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import CalibrationError

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask), right-padded


def _batches(rows: list[list[int]], batch_size: int, pad_id: int) -> list[Batch]:
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        out.append((ids, mask))
    return out


def tokenize_calibration(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *, seq_len: int = 128,
                         batch_size: int = 8) -> list[Batch]:
    """Tokenize user calibration ``texts`` (each cut to ``seq_len`` tokens) into padded batches."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:seq_len] for t in texts]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise CalibrationError(
            "The calibration set is empty (or every text is shorter than 2 tokens). Pass a list of texts "
            "like the fine-tune's training data, or calibration=None to sample text from the fine-tune."
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _batches(rows, batch_size, pad)


@torch.no_grad()
def sample_calibration(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, n: int = 64,
                       seq_len: int = 128, batch_size: int = 8, seed: int = 0) -> list[Batch]:
    """Data-free calibration: ``n`` sequences sampled from the fine-tune, started from its BOS/EOS token."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    rows: list[list[int]] = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while len(rows) < n:
            b = min(batch_size, n - len(rows))
            ids = torch.full((b, 1), start, dtype=torch.long, device=model.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 top_p=1.0, max_new_tokens=seq_len - 1, pad_token_id=pad, eos_token_id=eos)
            for row in out.tolist():
                # Keep the first EOS (the model should learn where text ends), drop the padding after it.
                rows.append(row[: row.index(eos, 1) + 1] if eos in row[1:] else row)
    model.train(was_training)
    return _batches(rows, batch_size, pad)

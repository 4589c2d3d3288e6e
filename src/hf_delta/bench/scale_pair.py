"""Synthetic Llama-shaped base / fine-tune checkpoints of real sizes, written shard by shard (``bench scale``).

Compression cost (memory, time) depends on shapes, and its error on the delta's structure, not on what the
weights mean. So a base of Llama-init-like random weights and a fine-tune = base + a structured perturbation
measure hf_delta at 0.85B or 7B parameters without downloading a model:

- base: every matrix ``N(0, 0.02²)``, every norm ``1 + N(0, 0.05²)``;
- fine-tune, per matrix ``W``: ``W + L + E`` with ``L`` of rank 8 and ``E`` Gaussian noise, scaled so that
  ``‖L‖ = 0.95 ρ‖W‖`` and ``‖E‖ = 0.3 ρ‖W‖`` (``ρ = 0.75 %``, so ``‖L + E‖ ≈ ρ‖W‖``); per norm vector
  ``w · (1 + N(0, 0.01²))``.

Both checkpoints are bf16 safetensors shards with a ``model.safetensors.index.json`` and the ``config.json`` of a
``LlamaForCausalLM`` (untied head), as ``save_pretrained`` writes them. Each tensor is generated from
``(seed, name)`` alone, so a pair is reproducible and at most one shard of each checkpoint is held in memory.
Like a real bf16 fine-tune, the delta the library sees is ``bf16(W + L + E) − bf16(W)``: rounding adds noise of
about 0.4 % of ``|W|`` per value, comparable to the perturbation itself.
"""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from ..errors import ZooError

logger = logging.getLogger(__name__)

# name -> (hidden, layers, intermediate, vocab, heads)
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 176, 512, 4),
    "0.1b": (768, 4, 3072, 32000, 12),  # the CI real-shape test: vocabulary tables of 24.6M values (> 2^24)
    "0.85b": (2048, 16, 5632, 32000, 16),
    "7b": (4096, 32, 11008, 32000, 32),  # Llama-2-7B
}
RANK = 8
RELATIVE_NORM = 0.0075
INDEX_NAME = "model.safetensors.index.json"


def llama_config(size: str) -> LlamaConfig:
    """The ``LlamaConfig`` of a synthetic size (bf16, untied head)."""
    if size not in SHAPES:
        raise ZooError(f"Unknown synthetic size {size!r}; choose one of {sorted(SHAPES)}.")
    hidden, layers, intermediate, vocab, heads = SHAPES[size]
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                       vocab_size=vocab, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                       eos_token_id=1, dtype="bfloat16", architectures=["LlamaForCausalLM"])


def parameter_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes, as a meta-device ``LlamaForCausalLM`` of this size has them (no memory)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@dataclass
class PairPlan:
    """What ``write_pair`` writes for one size: shapes, shard of each tensor, bytes."""

    size: str
    shapes: dict[str, tuple[int, ...]]
    shard_of: dict[str, str]

    @property
    def parameters(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.parameters

    @property
    def largest_matrix(self) -> int:
        return max(_numel(s) for s in self.shapes.values())

    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.shard_of.values()))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_pair(size: str, *, shard_bytes: int = 10**9) -> PairPlan:
    """Assign each parameter (in state-dict order) to a shard of at most ``shard_bytes`` bf16 bytes."""
    shapes = parameter_shapes(size)
    groups: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if groups[-1] and used + nbytes > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    n = len(groups)
    shard_of = {name: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, g in enumerate(groups) for name in g}
    return PairPlan(size, shapes, shard_of)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + seed)


def tensor_pair(name: str, shape: tuple[int, ...], *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 base and fine-tune tensors of ``name`` (a function of ``seed`` and ``name`` only)."""
    gen = _generator(seed, name)
    if len(shape) == 1:
        base = 1 + 0.05 * torch.randn(shape, generator=gen)
        return base.bfloat16(), (base * (1 + 0.01 * torch.randn(shape, generator=gen))).bfloat16()
    base = 0.02 * torch.randn(shape, generator=gen)
    target = RELATIVE_NORM * float(base.norm())
    low = torch.randn(shape[0], RANK, generator=gen) @ torch.randn(RANK, shape[1], generator=gen)
    low *= 0.95 * target / float(low.norm())
    noise = torch.randn(shape, generator=gen)
    noise *= 0.3 * target / float(noise.norm())
    finetuned = (base + low + noise).bfloat16()
    return base.bfloat16(), finetuned


def pair_folders(work_dir: str | Path, size: str, *, seed: int = 0) -> tuple[Path, Path]:
    """Where the base and fine-tune checkpoints of ``size`` live under ``work_dir``."""
    root = Path(work_dir) / f"llama-{size}-seed{seed}"
    return root / "base", root / "finetuned"


def _shards(plan: PairPlan, seed: int) -> Iterator[tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    for shard in plan.shards():
        base, finetuned = {}, {}
        for name in (n for n, s in plan.shard_of.items() if s == shard):
            base[name], finetuned[name] = tensor_pair(name, plan.shapes[name], seed=seed)
        yield shard, base, finetuned


def write_pair(work_dir: str | Path, size: str, *, seed: int = 0, shard_bytes: int = 10**9) -> tuple[Path, Path]:
    """Write (once: kept when already complete) the base and fine-tune checkpoints of ``size``; returns them.

    Tensors are generated and written one shard at a time; a folder is renamed into place only when complete.
    """
    base_dir, ft_dir = pair_folders(work_dir, size, seed=seed)
    if all((d / INDEX_NAME).is_file() for d in (base_dir, ft_dir)):
        return base_dir, ft_dir
    plan = plan_pair(size, shard_bytes=shard_bytes)
    partial = {d: d.with_name(d.name + ".partial") for d in (base_dir, ft_dir)}
    for tmp in partial.values():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        llama_config(size).save_pretrained(tmp)
    logger.info("Writing the synthetic %s pair (%.2fB parameters, %d shards) under %s", size, plan.parameters / 1e9,
                len(plan.shards()), base_dir.parent)
    for shard, base, finetuned in _shards(plan, seed):
        save_file(base, str(partial[base_dir] / shard), metadata={"format": "pt"})
        save_file(finetuned, str(partial[ft_dir] / shard), metadata={"format": "pt"})
        logger.info("Wrote %s", shard)
    index = {"metadata": {"total_size": plan.bf16_bytes}, "weight_map": plan.shard_of}
    for final, tmp in partial.items():
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    return base_dir, ft_dir

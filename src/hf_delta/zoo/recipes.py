"""What the zoo contains at each size: architectures, dimensions, training budgets.

Changing anything here changes the recipe hash, which makes a cached zoo rebuild itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..errors import ZooError

# Bump when the builder's code changes what it produces for the same recipe.
BUILDER_VERSION = 2


@dataclass(frozen=True)
class ModelDims:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class TrainBudget:
    steps: int
    batch_size: int
    lr: float
    seq_len: int = 128


@dataclass(frozen=True)
class SizeRecipe:
    size: str
    vocab_size: int
    corpus_chars: int
    dims: ModelDims
    pretrain: TrainBudget
    finetune: TrainBudget
    task_examples: int
    task_heldout: int
    facts: int
    # Tasks that need more fine-tuning steps than ``finetune.steps`` (the chat task learns new tokens).
    extra_steps: tuple[tuple[str, int], ...] = ()
    # (fine-tune name, base name, task); every base is "<arch>-base".
    finetunes: tuple[tuple[str, str, str], ...] = field(
        default=(
            ("llama-arith", "llama-base", "arith"),
            ("llama-cipher", "llama-base", "cipher"),
            ("llama-facts", "llama-base", "facts"),
            ("llama-chat", "llama-base", "chat"),
            ("qwen2-arith", "qwen2-base", "arith"),
            ("qwen2-cipher", "qwen2-base", "cipher"),
        )
    )

    def finetune_budget(self, task: str) -> TrainBudget:
        """The fine-tuning budget of ``task``."""
        extra = dict(self.extra_steps).get(task, 0)
        b = self.finetune
        return TrainBudget(steps=b.steps + extra, batch_size=b.batch_size, lr=b.lr, seq_len=b.seq_len)

    def hash(self) -> str:
        """Short digest of the recipe and builder version: the cache key of a built zoo."""
        blob = json.dumps({"recipe": asdict(self), "builder": BUILDER_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


RECIPES: dict[str, SizeRecipe] = {
    "micro": SizeRecipe(
        size="micro",
        vocab_size=384,
        corpus_chars=200_000,
        dims=ModelDims(32, 2, 4, 2, 64),
        pretrain=TrainBudget(steps=30, batch_size=8, lr=3e-3, seq_len=64),
        finetune=TrainBudget(steps=30, batch_size=16, lr=3e-3),
        task_examples=300,
        task_heldout=32,
        facts=24,
    ),
    "small": SizeRecipe(
        size="small",
        vocab_size=2048,
        corpus_chars=2_000_000,
        dims=ModelDims(192, 4, 6, 2, 512),
        pretrain=TrainBudget(steps=400, batch_size=16, lr=2e-3),
        finetune=TrainBudget(steps=400, batch_size=32, lr=1e-3),
        task_examples=4000,
        task_heldout=200,
        facts=60,
        extra_steps=(("chat", 500),),
    ),
}


def get_recipe(size: str) -> SizeRecipe:
    """The recipe for ``size`` ('micro' or 'small')."""
    if size not in RECIPES:
        raise ZooError(f"Unknown zoo size {size!r}; choose one of {sorted(RECIPES)} (e.g. --size micro).")
    return RECIPES[size]

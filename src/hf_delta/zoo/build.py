"""Build the zoo: a tokenizer, two pretrained bases and full-parameter fine-tunes of them, all offline."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from ..errors import ZooError
from ..utils.io import atomic_directory, atomic_write_text
from ..utils.progress import progress_range
from .corpus import stdlib_corpus
from .recipes import SizeRecipe, TrainBudget, get_recipe
from .tasks import Example, Task, make_task
from .tokenizer import add_chat_tokens, train_tokenizer

logger = logging.getLogger(__name__)

MANIFEST = "zoo.json"
_ARCH = {"llama-base": "llama", "qwen2-base": "qwen2"}


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo. ``task`` is None for a base."""

    name: str
    path: Path
    arch: str
    base: str | None = None
    task: str | None = None


@dataclass(frozen=True)
class Zoo:
    """A built zoo on disk: its size, recipe and models."""

    root: Path
    size: str
    recipe_hash: str
    entries: dict[str, ZooEntry]

    @property
    def finetunes(self) -> list[ZooEntry]:
        return [e for e in self.entries.values() if e.task is not None]

    def __getitem__(self, name: str) -> ZooEntry:
        if name not in self.entries:
            raise ZooError(f"The {self.size} zoo has no model {name!r}; it has {sorted(self.entries)}.")
        return self.entries[name]

    def task(self, name: str) -> Task:
        """The task (with its held-out split) that fine-tune ``name`` was trained on."""
        recipe = get_recipe(self.size)
        return _task(recipe, self[name].task)


def default_zoo_dir() -> Path:
    """``$HF_DELTA_ZOO`` or ``~/.cache/hf_delta/zoo``."""
    return Path(os.environ.get("HF_DELTA_ZOO", Path.home() / ".cache" / "hf_delta" / "zoo"))


def _task(recipe: SizeRecipe, name: str) -> Task:
    n = recipe.facts if name == "facts" else recipe.task_examples
    return make_task(name, n=n, n_heldout=min(recipe.task_heldout, n), seed=0)


def _new_model(arch: str, recipe: SizeRecipe, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    d = recipe.dims
    common = dict(
        vocab_size=len(tokenizer), hidden_size=d.hidden_size, num_hidden_layers=d.num_hidden_layers,
        num_attention_heads=d.num_attention_heads, num_key_value_heads=d.num_key_value_heads,
        intermediate_size=d.intermediate_size, max_position_embeddings=256, rms_norm_eps=1e-5,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    else:  # Qwen2: biases on q/k/v and tied input/output embeddings, so nothing downstream assumes Llama
        config = Qwen2Config(**common, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _lr(step: int, budget: TrainBudget) -> float:
    warmup = max(1, budget.steps // 10)
    if step < warmup:
        return budget.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, budget.steps - warmup)
    return budget.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(model, batches, budget: TrainBudget, desc: str) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    losses = []
    for step in progress_range(budget.steps, desc=desc, leave=False, mininterval=2):
        input_ids, labels = batches(step)
        for group in opt.param_groups:
            group["lr"] = _lr(step, budget)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _pretrain_batches(ids: torch.Tensor, budget: TrainBudget, seed: int):
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - budget.seq_len - 1, (budget.steps, budget.batch_size), generator=gen)

    def batch(step: int):
        x = torch.stack([ids[s : s + budget.seq_len] for s in starts[step].tolist()])
        return x, x.clone()

    return batch


def encode_example(tokenizer, task: Task, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of the rendered prompt and of the answer followed by the end-of-turn token."""
    prompt = task_prompt(tokenizer, task, example)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p, a


def task_prompt(tokenizer, task: Task, example: Example) -> str:
    """The prompt as the model sees it: through the chat template for chat tasks, raw otherwise."""
    if task.chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=False
        )
    return example.prompt


def _task_batches(tokenizer, task: Task, budget: TrainBudget, seed: int):
    encoded = [encode_example(tokenizer, task, ex) for ex in task.train]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(encoded), (budget.steps, budget.batch_size), generator=gen)
    pad = tokenizer.pad_token_id

    def batch(step: int):
        rows = [encoded[i] for i in picks[step].tolist()]
        width = max(len(p) + len(a) for p, a in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (p, a) in enumerate(rows):
            x[r, : len(p) + len(a)] = torch.tensor(p + a)
            y[r, len(p) : len(p) + len(a)] = torch.tensor(a)  # loss on the answer only
        return x, y

    return batch


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dest: Path, meta: dict) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "zoo_model.json", json.dumps(meta, indent=2))


def load_zoo(size: str = "micro", directory: str | Path | None = None, *,
             models: Iterable[str] | None = None) -> Zoo:
    """Open a zoo built earlier; raise ``ZooError`` if it is missing or built from another recipe.

    Args:
        size, directory: as for ``build_zoo``.
        models: the models that must be there (default: every model of the recipe). A zoo built for some
            models only (``build_zoo(models=...)``) opens with those; its other models are left out.
    """
    recipe = get_recipe(size)
    root = Path(directory or default_zoo_dir()) / size
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise ZooError(f"No {size} zoo at {root}. Build it with `hf-delta zoo build --size {size}`.")
    data = json.loads(manifest.read_text())
    if data.get("recipe_hash") != recipe.hash():
        raise ZooError(f"The {size} zoo at {root} was built from another recipe; rebuild it with "
                       f"`hf-delta zoo build --size {size}`.")
    entries = {n: ZooEntry(name=n, path=root / n, **{k: v for k, v in e.items() if k != "path"})
               for n, e in data["models"].items()}
    wanted = _with_bases(recipe, models)
    missing = [n for n in wanted if n not in entries or not (entries[n].path / "config.json").is_file()]
    if missing:
        raise ZooError(f"The {size} zoo at {root} lacks {missing}; rebuild it with `hf-delta zoo build`.")
    return Zoo(root=root, size=size, recipe_hash=recipe.hash(), entries=entries)


def _with_bases(recipe: SizeRecipe, models: Iterable[str] | None) -> list[str]:
    """``models`` (default: all of the recipe) and the bases they were fine-tuned from, in build order."""
    names = list(_ARCH) + [name for name, _, _ in recipe.finetunes]
    if models is None:
        return names
    models = set(models)
    unknown = sorted(models - set(names))
    if unknown:
        raise ZooError(f"The {recipe.size} zoo has no models {unknown}; it has {names}.")
    models |= {base for name, base, _ in recipe.finetunes if name in models}
    return [n for n in names if n in models]


def build_zoo(size: str = "micro", directory: str | Path | None = None, *, force: bool = False,
              models: Iterable[str] | None = None) -> Zoo:
    """Build (or reuse the cached) zoo of ``size`` under ``directory`` and return it.

    The build is deterministic: fixed seeds, one thread count, no data from outside the Python install. Every
    model has its own seed, so building some models now and the rest later gives the same weights as one build.

    Args:
        size: ``"micro"`` or ``"small"``.
        directory: zoo root (default ``default_zoo_dir()``); the zoo goes to ``<directory>/<size>``.
        force: rebuild even what is cached.
        models: build only these fine-tunes (and their bases), e.g. the demo's Llama ones; default: all.

    >>> zoo = build_zoo("micro")
    >>> [e.name for e in zoo.finetunes][:2]
    ['llama-arith', 'llama-cipher']
    """
    recipe = get_recipe(size)
    root = Path(directory or default_zoo_dir()) / size
    wanted = _with_bases(recipe, models)
    built: dict[str, dict] = {}
    if not force:
        try:
            return load_zoo(size, directory, models=wanted)
        except ZooError:
            built = _built_models(root, recipe)
    todo = [n for n in wanted if n not in built]
    logger.info("Building the %s zoo in %s: %s", size, root, ", ".join(todo))
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))  # same thread count everywhere, so the weights are bit-identical
    try:
        built.update(_build(recipe, root, todo))
    finally:
        torch.set_num_threads(threads)
    ordered = {n: built[n] for n in _with_bases(recipe, None) if n in built}
    atomic_write_text(root / MANIFEST, json.dumps({"size": size, "recipe_hash": recipe.hash(),
                                                   "models": ordered}, indent=2))
    return load_zoo(size, directory, models=wanted)


def missing_models(size: str = "micro", directory: str | Path | None = None, *,
                   models: Iterable[str] | None = None) -> list[str]:
    """The models (``models`` and their bases; default all) that ``build_zoo`` would have to build, in order."""
    recipe = get_recipe(size)
    built = _built_models(Path(directory or default_zoo_dir()) / size, recipe)
    return [n for n in _with_bases(recipe, models) if n not in built]


def _built_models(root: Path, recipe: SizeRecipe) -> dict[str, dict]:
    """The manifest entries of models already built from this recipe (none if the zoo is from another one)."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        return {}
    data = json.loads(manifest.read_text())
    if data.get("recipe_hash") != recipe.hash():
        return {}
    return {n: e for n, e in data["models"].items() if (root / n / "config.json").is_file()}


def _build(recipe: SizeRecipe, root: Path, names: list[str]) -> dict[str, dict]:
    text = stdlib_corpus(recipe.corpus_chars)
    tokenizer = train_tokenizer(text, recipe.vocab_size)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    models: dict[str, dict] = {}
    for seed, (base_name, arch) in enumerate(_ARCH.items()):
        if base_name not in names:
            continue
        torch.manual_seed(seed)
        model = _new_model(arch, recipe, tokenizer)
        _train(model, _pretrain_batches(ids, recipe.pretrain, seed), recipe.pretrain, f"pretrain {base_name}")
        meta = {"arch": arch}
        _save(model, tokenizer, root / base_name, meta)
        models[base_name] = meta
    for seed, (name, base_name, task_name) in enumerate(recipe.finetunes, start=100):
        if name not in names:
            continue
        task = _task(recipe, task_name)
        model = AutoModelForCausalLM.from_pretrained(root / base_name, dtype=torch.float32)
        tok = add_chat_tokens(tokenizer) if task.chat else tokenizer
        torch.manual_seed(seed)
        if len(tok) != len(tokenizer):
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        budget = recipe.finetune_budget(task_name)
        _train(model, _task_batches(tok, task, budget, seed), budget, f"fine-tune {name}")
        meta = {"arch": _ARCH[base_name], "base": base_name, "task": task_name}
        _save(model, tok, root / name, meta)
        models[name] = meta
    return models

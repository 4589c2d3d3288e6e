"""The demo's default models: one zoo base and its fine-tunes compressed into delta repos, cached on disk.

The first start builds the zoo (if it is not cached) and compresses each fine-tune with BitDelta and scale
distillation on texts from the fine-tune's own training split; every later start finds the delta folders
under ``<cache>/<size>-<recipe hash>-<setting hash>/<fine-tune>`` and is instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import CONFIG_NAME, DeltaConfig
from ..errors import ZooError
from ..utils.progress import listen_progress
from .startup import Stage, StartupProgress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooDemo:
    """What the demo serves from the zoo.

    Attributes:
        base: folder of the base model.
        deltas: fine-tune name → its compressed delta folder.
        finetunes: fine-tune name → the full fine-tune's folder (for size ratios).
        examples: model name → example prompts (from the fine-tune's held-out split).
    """

    base: Path
    deltas: dict[str, Path]
    finetunes: dict[str, Path]
    examples: dict[str, list[str]] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """``$HF_DELTA_DEMO_CACHE`` or ``~/.cache/hf_delta/demo``."""
    return Path(os.environ.get("HF_DELTA_DEMO_CACHE", Path.home() / ".cache" / "hf_delta" / "demo"))


def setting_hash(config: DeltaConfig) -> str:
    """Short digest of a compression setting (what compression records about the base is left out)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]


# A task example (prompt and answer) is about this many tokens: a fine-tuning step does batch x this much work.
_TASK_TOKENS = 32


def _zoo_stages(size: str, names: list[str]) -> list[Stage]:
    from ..zoo import get_recipe

    recipe = get_recipe(size)
    tasks = {name: task for name, _, task in recipe.finetunes}
    stages = []
    for name in names:
        if name in tasks:
            budget = recipe.finetune_budget(tasks[name])
            stages.append(Stage(f"fine-tune {name}", "fine-tune", budget.steps, budget.batch_size * _TASK_TOKENS))
        else:
            budget = recipe.pretrain
            stages.append(Stage(f"pretrain {name}", "pretrain", budget.steps, budget.batch_size * budget.seq_len))
    return stages


def _compress_stage(name: str, config: DeltaConfig) -> Stage:
    steps = getattr(config, "distill_steps", 0) or 1
    work = getattr(config, "distill_batch_size", 1) * getattr(config, "distill_seq_len", 1)
    return Stage(f"compress {name}", "compress", steps, work)


def prepare_zoo_demo(size: str = "small", *, zoo_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                     base: str = "llama-base", config: DeltaConfig | None = None,
                     calibration_examples: int = 64, progress: StartupProgress | None = None) -> ZooDemo:
    """Build the zoo models of ``base`` if needed and compress its fine-tunes that are not cached yet.

    Only what is served is built: ``base`` and its fine-tunes (the other zoo base and its fine-tunes are not).

    Args:
        size: zoo size, ``"small"`` (the demo's default) or ``"micro"`` (seconds; for tests).
        zoo_dir: zoo root (default ``$HF_DELTA_ZOO`` or ``~/.cache/hf_delta/zoo``).
        cache_dir: where compressed deltas are kept (default ``default_cache_dir()``).
        base: which zoo base to serve (``"llama-base"`` or ``"qwen2-base"``); its fine-tunes become the deltas.
        config: the compression setting (default ``BitDeltaConfig()``: 1 bit per weight + scale distillation).
        calibration_examples: training examples of each fine-tune's task used as distillation texts.
        progress: told the stages still to run (training, compression) and each of their steps.

    Returns:
        A ``ZooDemo`` with the base folder, the delta folders and example prompts.

    Raises:
        ZooError: unknown size or base.

    >>> demo = prepare_zoo_demo("micro")  # doctest: +SKIP
    >>> sorted(demo.deltas)  # doctest: +SKIP
    ['llama-arith', 'llama-chat', 'llama-cipher', 'llama-facts']
    """
    from ..compression import compress
    from ..evaluation import task_calibration
    from ..methods import BitDeltaConfig
    from ..utils.loading import load_tokenizer
    from ..zoo import build_zoo, get_recipe, missing_models

    recipe = get_recipe(size)
    bases = sorted({b for _, b, _ in recipe.finetunes})
    if base not in bases:
        raise ZooError(f"{base!r} is not a base of the {size} zoo; choose one of {bases}.")
    served = [name for name, b, _ in recipe.finetunes if b == base]
    config = config or BitDeltaConfig()
    to_build = missing_models(size, zoo_dir, models=served)
    if progress is not None:
        progress.plan(_zoo_stages(size, to_build))
    if to_build:
        logger.info("First start: building %s of the %s zoo (cached for later starts)...", ", ".join(to_build), size)
    with listen_progress(progress.update if progress is not None else None):
        zoo = build_zoo(size, zoo_dir, models=served)
    folder = Path(cache_dir or default_cache_dir()) / f"{size}-{zoo.recipe_hash}-{config.method}-{setting_hash(config)}"
    finetunes = [zoo[name] for name in served]
    todo = [e for e in finetunes if not (folder / e.name / CONFIG_NAME).is_file()]
    if progress is not None:
        progress.plan([_compress_stage(e.name, config) for e in todo])
    deltas: dict[str, Path] = {}
    for entry in finetunes:
        dest = folder / entry.name
        if entry in todo:
            logger.info("Compressing %s with %s (%d/%d, first start only)...", entry.name, config.method,
                        todo.index(entry) + 1, len(todo))
            stage = f"compress {entry.name}"
            if progress is not None:
                progress.begin(stage)
            start = time.perf_counter()
            tokenizer = load_tokenizer(entry.path)
            texts = task_calibration(tokenizer, zoo.task(entry.name), n=calibration_examples)
            with listen_progress(None if progress is None else
                                 lambda _desc, done, total, stage=stage: progress.update(stage, done, total)):
                model = compress(zoo[base].path, entry.path, config, texts, progress=False)
            model.save_pretrained(dest)  # atomic: a crash leaves no half-written delta behind
            if progress is not None:
                progress.update(stage, _compress_stage(entry.name, config).steps, 0)
            logger.info("Compressed %s in %.0f s -> %s", entry.name, time.perf_counter() - start, dest)
        deltas[entry.name] = dest
    examples = {e.name: [ex.prompt for ex in zoo.task(e.name).heldout[:3]] for e in finetunes}
    return ZooDemo(base=zoo[base].path, deltas=deltas, finetunes={e.name: e.path for e in finetunes},
                   examples=examples)

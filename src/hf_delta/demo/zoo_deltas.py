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


def prepare_zoo_demo(size: str = "small", *, zoo_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                     base: str = "llama-base", config: DeltaConfig | None = None,
                     calibration_examples: int = 64) -> ZooDemo:
    """Build the zoo of ``size`` if needed and compress the fine-tunes of ``base`` that are not cached yet.

    Args:
        size: zoo size, ``"small"`` (the demo's default) or ``"micro"`` (seconds; for tests).
        zoo_dir: zoo root (default ``$HF_DELTA_ZOO`` or ``~/.cache/hf_delta/zoo``).
        cache_dir: where compressed deltas are kept (default ``default_cache_dir()``).
        base: which zoo base to serve (``"llama-base"`` or ``"qwen2-base"``); its fine-tunes become the deltas.
        config: the compression setting (default ``BitDeltaConfig()``: 1 bit per weight + scale distillation).
        calibration_examples: training examples of each fine-tune's task used as distillation texts.

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
    from ..zoo import build_zoo, load_zoo

    try:
        zoo = load_zoo(size, zoo_dir)
    except ZooError as err:
        if "Unknown zoo size" in str(err):
            raise
        logger.info("First start: building the %s zoo (cached for later starts; the small one takes ~12 min on "
                    "2 CPU cores)...", size)
        zoo = build_zoo(size, zoo_dir)
    if base not in zoo.entries or zoo[base].task is not None:
        bases = sorted(e.name for e in zoo.entries.values() if e.task is None)
        raise ZooError(f"{base!r} is not a base of the {size} zoo; choose one of {bases}.")
    config = config or BitDeltaConfig()
    folder = Path(cache_dir or default_cache_dir()) / f"{size}-{zoo.recipe_hash}-{config.method}-{setting_hash(config)}"
    finetunes = [e for e in zoo.finetunes if e.base == base]
    deltas: dict[str, Path] = {}
    for i, entry in enumerate(finetunes, start=1):
        dest = folder / entry.name
        if not (dest / CONFIG_NAME).is_file():
            logger.info("Compressing %s with %s (%d/%d, first start only)...", entry.name, config.method, i,
                        len(finetunes))
            start = time.perf_counter()
            tokenizer = load_tokenizer(entry.path)
            texts = task_calibration(tokenizer, zoo.task(entry.name), n=calibration_examples)
            model = compress(zoo[base].path, entry.path, config, texts, progress=False)
            model.save_pretrained(dest)  # atomic: a crash leaves no half-written delta behind
            logger.info("Compressed %s in %.0f s -> %s", entry.name, time.perf_counter() - start, dest)
        deltas[entry.name] = dest
    examples = {e.name: [ex.prompt for ex in zoo.task(e.name).heldout[:3]] for e in finetunes}
    return ZooDemo(base=zoo[base].path, deltas=deltas, finetunes={e.name: e.path for e in finetunes},
                   examples=examples)

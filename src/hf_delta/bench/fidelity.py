"""The fidelity/size table: every zoo fine-tune compressed by every method setting, side by side.

``hf-delta bench fidelity`` runs it and writes ``benchmarks/results/fidelity-<size>.{json,md,png}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..compression import compress
from ..config import DeltaConfig
from ..evaluation import exact_match, mean_kl, perplexity, retention, task_calibration, task_verification
from ..methods import AutoConfig, BitDeltaConfig, DeltaZipConfig, LowRankConfig, MixedSVDConfig
from ..utils.loading import load_model_and_tokenizer
from ..utils.sizes import bf16_weight_bytes, folder_bytes
from ..zoo.build import load_zoo
from .report import write_results

logger = logging.getLogger(__name__)

# Held-out prompts of an auto setting: the search checks 1024 of them, the other 1024 confirm its choice.
VERIFY_SAMPLES = 2048

# Name -> config factory. Methods registered later add their settings with ``add_setting``.
SETTINGS: dict[str, Callable[[], DeltaConfig]] = {
    "bitdelta-initial": lambda: BitDeltaConfig(distill_steps=0),
    "bitdelta": lambda: BitDeltaConfig(),
    "bitdelta-residual": lambda: BitDeltaConfig(residual_passes=1),
    # The output head's matrix (tied to the embedding or not) is pruned/quantised like the other linear layers
    # (GPTQ on the head's inputs), at the same bits; embedding rows by round-to-nearest at the same bits.
    "deltazip-4bit": lambda: DeltaZipConfig(bits=4, sparsity=None, embedding_method="gptq", embedding_bits=None),
    # The calibrated head at 2 bits: what brings the tied Qwen2 vocabulary matrix (a fifth of its weights) to 6x.
    "deltazip-4bit-2:4": lambda: DeltaZipConfig(bits=4, sparsity="2:4", embedding_method="gptq",
                                                embedding_bits=None, head_bits=2),
    # Vocabulary matrices at 4 bits: 2-bit round-to-nearest embedding rows cost llama-cipher 6 points of retention.
    "deltazip-2bit-2:4": lambda: DeltaZipConfig(bits=2, sparsity="2:4", embedding_method="gptq", embedding_bits=4),
    "lowrank-r8": lambda: LowRankConfig(rank=8),
    "lowrank-r32": lambda: LowRankConfig(rank=32),
    # BitDelta's size, model by model: one bits-per-weight rate for all matrices, searched to fill the bytes of
    # BitDelta's signs and per-row scales (a fixed rate left low-rank deltas, e.g. llama-arith's, 8 % smaller).
    "mixed-svd": lambda: MixedSVDConfig(budget_bytes="bitdelta"),
    # Each matrix's method and setting chosen for a retention target on the calibration texts, then verified
    # (and tightened) on new task prompts that are neither trained on nor scored (``task_verification``).
    "auto-0.99": lambda: AutoConfig(target_retention=0.99, heldout_samples=VERIFY_SAMPLES),
    "auto-0.97": lambda: AutoConfig(target_retention=0.97, heldout_samples=VERIFY_SAMPLES),
}


def add_setting(name: str, factory: Callable[[], DeltaConfig]) -> None:
    """Make ``name`` available to ``hf-delta bench fidelity --settings``."""
    SETTINGS[name] = factory


def run_fidelity(
    size: str = "small",
    directory: str | Path | None = None,
    *,
    settings: Sequence[str] = ("bitdelta-initial", "bitdelta"),
    finetunes: Sequence[str] | None = None,
    calibration: str = "task",
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_include: Sequence[str | Path] = (),
    lm_eval_limit: float | None = None,
) -> list[dict[str, Any]]:
    """Compress every (or the named) zoo fine-tune with each setting and measure it.

    ``calibration`` is ``"task"`` (texts from the fine-tune's training split) or ``"sampled"`` (data-free).
    With ``lm_eval_tasks`` every row also gets lm-evaluation-harness scores of the compressed model, the fine-tune
    and the base (columns ``task:metric``, ``... ft``, ``... base``); the name ``zoo`` stands for the fine-tune's
    own task as local lm-eval tasks (``write_zoo_tasks``), ``lm_eval_include`` adds task folders, and
    ``lm_eval_limit`` caps the documents per task.
    """
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"Unknown fidelity settings {unknown}; known: {sorted(SETTINGS)}.")
    zoo = load_zoo(size, directory, models=list(finetunes) if finetunes else None)  # a subset needs only its own
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tasks_dir:
        for entry in zoo.finetunes:
            if finetunes and entry.name not in finetunes:
                continue
            lm_eval = None
            if lm_eval_tasks:
                lm_eval = _LmEvalScorer(lm_eval_tasks, lm_eval_include, lm_eval_limit, Path(tasks_dir) / entry.name)
            rows += _measure_finetune(zoo, entry, settings, calibration, lm_eval)
    return rows


class _LmEvalScorer:
    """lm-eval scores of one fine-tune's compressed versions, beside the fine-tune's and the base's."""

    def __init__(self, tasks: Sequence[str], include: Sequence[str | Path], limit: float | None, folder: Path):
        self.tasks, self.include, self.limit, self.folder = list(tasks), list(include), limit, folder
        self.tokenizer = None
        self.zoo_prefix = ""
        self.references: dict[str, float] = {}

    def prepare(self, task, tokenizer, base, finetune) -> None:
        """Write the zoo task's lm-eval files (for ``zoo``) and score the base and the fine-tune."""
        from ..integrations.lm_eval_tasks import write_zoo_tasks

        self.tokenizer = tokenizer
        if "zoo" in self.tasks:
            write_zoo_tasks(task, tokenizer, self.folder)
            self.tasks = [f"zoo_{task.name}" if t == "zoo" else t for t in self.tasks]
            self.include.append(self.folder)
            self.zoo_prefix = f"zoo_{task.name}_"
        self.references = {**{f"{k} ft": v for k, v in self.scores(finetune).items()},
                           **{f"{k} base": v for k, v in self.scores(base).items()}}

    def scores(self, model) -> dict[str, float]:
        from ..integrations.lm_eval import lm_eval_scores

        scores = lm_eval_scores(model, self.tokenizer, self.tasks, include_path=self.include, limit=self.limit)
        # Every fine-tune's own zoo task under one name (zoo_choice:acc, ...), so they share columns.
        return {k.replace(self.zoo_prefix, "zoo_", 1) if self.zoo_prefix else k: v for k, v in scores.items()}


def _measure_finetune(zoo, entry, settings: Sequence[str], calibration: str,
                      lm_eval: _LmEvalScorer | None) -> list[dict[str, Any]]:
    """One row per setting for one zoo fine-tune."""
    task = zoo.task(entry.name)
    base_path = zoo[entry.base].path
    base, _ = load_model_and_tokenizer(base_path)
    ft, tok = load_model_and_tokenizer(entry.path)
    if len(tok) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tok), mean_resizing=False)
    base_em, ft_em = exact_match(base, tok, task), exact_match(ft, tok, task)
    ft_bytes = bf16_weight_bytes(ft)
    texts = task_calibration(tok, task) if calibration == "task" else None
    autos = any(isinstance(SETTINGS[name](), AutoConfig) for name in settings)
    verify = task_verification(tok, task, VERIFY_SAMPLES) if calibration == "task" and autos else None
    if lm_eval is not None:
        lm_eval.prepare(task, tok, base, ft)
    rows: list[dict[str, Any]] = []
    for name in settings:
        start = time.perf_counter()
        config = SETTINGS[name]()
        # An auto setting's held-out prompts come last: it verifies on them and chooses on the others.
        held = verify if isinstance(config, AutoConfig) and texts is not None else []
        if held:  # a memorisation task's held-out prompts are its facts, all of which are scored: exhaustive
            config = dataclasses.replace(config, heldout_samples=len(held), heldout_exhaustive=task.memorisation)
        model = compress(base_path, entry.path, config, texts + held if held else texts, progress=False)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            sizes = folder_bytes(tmp)
        em = exact_match(model, tok, task)
        # Undefined when the fine-tune does no better than its base (the micro zoo's): left empty.
        kept = retention(em, base_em, ft_em) if ft_em != base_em else None
        rows.append({
            "fine-tune": entry.name, "setting": name, "base_em": base_em, "finetune_em": ft_em,
            "em": em, "retention": kept, "kl": mean_kl(ft, model, tok, task),
            "ppl": perplexity(model, tok, task), "finetune_ppl": perplexity(ft, tok, task),
            "delta_weight_bytes": sizes["weights"], "delta_other_bytes": sizes["other"],
            "finetune_bf16_bytes": ft_bytes, "ratio": ft_bytes / sizes["weights"],
            "compress_s": seconds,
        })
        chosen = [w.setting for w in model.get_delta("default").weights.values() if w.setting]
        if chosen:  # a setting that chooses per matrix (auto): how many matrices got each choice
            rows[-1]["choices"] = {c: chosen.count(c) for c in sorted(set(chosen))}
        if lm_eval is not None:
            rows[-1].update({**lm_eval.scores(model), **lm_eval.references})
        logger.info("%s %s: em %.1f (ft %.1f) ratio %.1fx", entry.name, name, em, ft_em, rows[-1]["ratio"])
    return rows


def plot_fidelity(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Retention vs size ratio, one point per (setting, fine-tune)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setting in dict.fromkeys(r["setting"] for r in rows):
        pts = [r for r in rows if r["setting"] == setting]
        ax.scatter([r["ratio"] for r in pts], [r["retention"] for r in pts], label=setting, s=30)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    # Ratios span less than a decade: label the 2x and 5x minor ticks (20x, 50x) too, not only the decades.
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlabel("size ratio (bf16 fine-tune / delta weight files)")
    ax.set_ylabel("task retention")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_fidelity(size: str, directory: str | Path | None, out: str | Path, *, settings: Sequence[str],
                   command: str, calibration: str = "task", finetunes: Sequence[str] | None = None,
                   merge: bool = False, lm_eval_tasks: Sequence[str] = (), lm_eval_include: Sequence[str] = (),
                   lm_eval_limit: float | None = None) -> str:
    """Run, write JSON + Markdown + plot under ``out``; return the Markdown.

    With ``merge``, rows already in ``fidelity-<size>.json`` for other (fine-tune, setting) pairs are kept,
    so a long grid can be run in parts; the commands of every part are recorded. With ``lm_eval_tasks`` the
    results go to ``fidelity-<size>-lm-eval.*`` instead, their lm-eval columns after the usual ones.
    """
    rows = run_fidelity(size, directory, settings=settings, calibration=calibration, finetunes=finetunes,
                        lm_eval_tasks=lm_eval_tasks, lm_eval_include=lm_eval_include, lm_eval_limit=lm_eval_limit)
    name = f"fidelity-{size}" + ("-lm-eval" if lm_eval_tasks else "")
    previous = Path(out) / f"{name}.json"
    if merge and previous.is_file():
        old = json.loads(previous.read_text())
        done = {(r["fine-tune"], r["setting"]) for r in rows}
        rows = [r for r in old["rows"] if (r["fine-tune"], r["setting"]) not in done] + rows
        order = {s: i for i, s in enumerate(SETTINGS)}
        rows.sort(key=lambda r: (r["fine-tune"], order.get(r["setting"], len(order))))
        command = f"{old['meta']['command']} && {command}"
    columns = list(dict.fromkeys(key for row in rows for key in row))  # rows of several parts may differ
    if lm_eval_tasks:  # the table shows the task scores beside the lm-eval ones; the JSON keeps every column
        columns = ["fine-tune", "setting", "base_em", "finetune_em", "em", "ratio",
                   *(c for c in columns if ":" in c)]
    measured = [r for r in rows if r["retention"] is not None]
    return write_results(rows, out, name=name, command=command, columns=columns,
                         extra={"calibration": calibration, "lm_eval_limit": lm_eval_limit},
                         plot=(lambda path: plot_fidelity(measured, path)) if measured else None)

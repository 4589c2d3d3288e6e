"""A zoo task as lm-evaluation-harness tasks: YAML files over one local JSONL file, so nothing is downloaded.

``write_zoo_tasks`` writes, for a task named ``arith``:

* ``zoo_arith.jsonl``: one document per example (``prompt``, ``answer``, ``choices``, ``label``);
* ``zoo_arith_choice.yaml``: multiple choice (loglikelihood of each choice): ``acc``, ``acc_norm``;
* ``zoo_arith_generate.yaml``: greedy generation until the end of sequence: ``exact_match``;
* ``zoo_arith_perplexity.yaml``: ``loglikelihood_rolling`` over prompt + answer: ``word_perplexity``, ...

all tagged ``zoo_arith``. Run them with ``--include_path FOLDER --tasks zoo_arith`` (or one task's name).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedTokenizerBase

from ..utils.io import atomic_write_text
from ..zoo.build import task_prompt
from ..zoo.tasks import Task

KINDS = ("choice", "generate", "perplexity")


def _documents(
    task: Task, tokenizer: PreTrainedTokenizerBase, *, split: str, n_choices: int, seed: int
) -> list[dict[str, Any]]:
    examples = task.heldout if split == "heldout" else task.train
    answers = list(dict.fromkeys(ex.answer for ex in examples))
    if len(answers) < n_choices:
        raise ValueError(
            f"Task {task.name!r} has {len(answers)} distinct answers in its {split} split; "
            f"{n_choices} choices need at least as many. Pass a smaller n_choices."
        )
    rng = random.Random(seed)
    docs = []
    for ex in examples:
        # Wrong choices are other examples' answers: the same form and length, so only the content tells.
        choices = [ex.answer, *rng.sample([a for a in answers if a != ex.answer], n_choices - 1)]
        rng.shuffle(choices)
        docs.append(
            {
                "prompt": task_prompt(tokenizer, task, ex),
                "answer": ex.answer,
                "choices": choices,
                "label": choices.index(ex.answer),
            }
        )
    return docs


def write_zoo_tasks(
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    *,
    split: str = "heldout",
    n_choices: int = 4,
    seed: int = 0,
) -> list[str]:
    """Write ``task`` as lm-eval tasks under ``folder``; returns their names (``zoo_<task>_<kind>``).

    Args:
        task: a zoo task (``Zoo.task(name)``).
        tokenizer: renders chat prompts and counts the longest answer (the generation budget, plus its EOS).
        folder: created if needed; pass it to lm-eval as ``include_path``.
        split: ``"heldout"`` (default) or ``"train"``.
        n_choices: choices per multiple-choice question (the answer and answers of other examples).
        seed: picks and orders the wrong choices.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"zoo_{task.name}"
    docs = _documents(task, tokenizer, split=split, n_choices=n_choices, seed=seed)
    data = folder / f"{tag}.jsonl"
    atomic_write_text(data, "".join(json.dumps(d) + "\n" for d in docs))
    longest = max(len(tokenizer(d["answer"], add_special_tokens=False)["input_ids"]) for d in docs)
    common = {
        "tag": [tag],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "metadata": {"version": 1.0},
    }
    mean = {"aggregation": "mean", "higher_is_better": True}
    configs = {
        "choice": {
            "output_type": "multiple_choice",
            "doc_to_text": "{{prompt}}",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", **mean}, {"metric": "acc_norm", **mean}],
        },
        # The answer is scored like hf_delta.evaluation.exact_match: generation stops at the end of sequence,
        # surrounding whitespace is ignored, one token more than the longest answer is allowed.
        "generate": {
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer | trim}}",
            "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": longest + 1},
            "filter_list": [
                {"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}
            ],
            "metric_list": [{"metric": "exact_match", **mean}],
        },
        "perplexity": {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{prompt}}{{answer}}",
            "metric_list": [
                {"metric": m, "aggregation": agg, "higher_is_better": False}
                for m, agg in (
                    ("word_perplexity", "weighted_perplexity"),
                    ("byte_perplexity", "weighted_perplexity"),
                    ("bits_per_byte", "bits_per_byte"),
                )
            ],
        },
    }
    names = []
    for kind in KINDS:
        name = f"{tag}_{kind}"
        atomic_write_text(
            folder / f"{name}.yaml", yaml.safe_dump({"task": name, **common, **configs[kind]}, sort_keys=False)
        )
        names.append(name)
    return names

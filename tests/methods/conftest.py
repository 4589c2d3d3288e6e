"""Fixtures for the compression-method tests.

Sections (give new fixtures a section of their own):

* Micro-zoo models and calibration texts: ``zoo_models``, ``zoo_texts``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

# ===================================================================================================
# Micro-zoo models and calibration texts
# ===================================================================================================


@pytest.fixture(scope="session")
def zoo_models(micro_zoo) -> Callable[[str], tuple[Any, Any, Any]]:
    """``zoo_models("llama-arith")`` → (base model, fine-tuned model, fine-tune tokenizer), loaded once.

    Tests must not modify the returned models.
    """
    from hf_delta.utils.loading import load_model, load_tokenizer

    loaded: dict[str, tuple[Any, Any, Any]] = {}

    def get(name: str) -> tuple[Any, Any, Any]:
        if name not in loaded:
            entry = micro_zoo[name]
            loaded[name] = (load_model(micro_zoo[entry.base].path).eval(), load_model(entry.path).eval(),
                            load_tokenizer(entry.path))
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def zoo_texts(micro_zoo, zoo_models) -> Callable[[str, int], list[str]]:
    """``zoo_texts("llama-arith", 32)`` → the first training examples of its task, rendered as the model sees them
    (cheap calibration text; sampling from the fine-tune is much slower on a busy CPU)."""
    from hf_delta.zoo.build import task_prompt

    def get(name: str, n: int) -> list[str]:
        task = micro_zoo.task(name)
        tok = zoo_models(name)[2]
        return [task_prompt(tok, task, ex) + ex.answer for ex in task.train[:n]]

    return get

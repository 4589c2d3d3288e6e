"""Fixtures of the serving tests: 16 distinct micro deltas, a broken one, prompts and reference outputs.

The micro zoo's fine-tunes are barely trained, so their greedy outputs mostly agree. Scaled copies of their
BitDelta deltas (scales x1, x3, x6, x10) behave differently from each other, which makes "every request got
its own delta's output" a test that can fail.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

FAMILY = ("llama-arith", "llama-cipher", "llama-facts", "llama-chat")
SCALES = (1.0, 3.0, 6.0, 10.0)


@pytest.fixture(scope="session")
def micro_base(micro_zoo) -> Path:
    return micro_zoo["llama-base"].path


@pytest.fixture(scope="session")
def serving_deltas(micro_delta, tmp_path_factory) -> dict[str, Path]:
    """``{name: folder}`` of 16 deltas: each Llama fine-tune's delta with its scales multiplied by 1, 3, 6, 10."""
    from hf_delta.storage import Delta

    root = tmp_path_factory.mktemp("serving-deltas")
    out: dict[str, Path] = {}
    for finetune in FAMILY:
        source = micro_delta(finetune)
        for scale in SCALES:
            delta = Delta.from_folder(source)
            for weight in delta.weights.values():
                weight.scales.mul_(scale)
            name = f"{finetune.removeprefix('llama-')}-x{scale:g}"
            delta.save_pretrained(root / name)
            out[name] = root / name
    return out


@pytest.fixture(scope="session")
def broken_delta(micro_delta, tmp_path_factory) -> Path:
    """A copy of a delta repo whose safetensors file is cut in half (config and tokenizer still fine)."""
    folder = tmp_path_factory.mktemp("broken") / "delta"
    shutil.copytree(micro_delta("llama-arith"), folder)
    weights = folder / "delta_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture(scope="session")
def serving_prompts(micro_zoo, serving_deltas) -> Callable[[str, int], list[str]]:
    """``serving_prompts(name, n)``: ``n`` held-out prompts of the delta's task, rendered with its own template."""
    from hf_delta.utils.loading import load_tokenizer
    from hf_delta.zoo.build import task_prompt

    cache: dict[str, list[str]] = {}

    def prompts(name: str, n: int) -> list[str]:
        if name not in cache:
            finetune = "llama-" + name.split("-x")[0] if name != "base" else "llama-arith"
            folder = serving_deltas.get(name)
            has_own = folder is not None and (folder / "tokenizer_config.json").is_file()
            tokenizer = load_tokenizer(folder if has_own else micro_zoo["llama-base"].path)
            task = micro_zoo.task(finetune)
            cache[name] = [task_prompt(tokenizer, task, ex) for ex in task.heldout[:8]]
        return cache[name][:n]

    return prompts


@pytest.fixture(scope="session")
def reference(micro_base, serving_deltas) -> Callable[[str, str, int], str]:
    """``reference(name, prompt, max_tokens)``: the library's single-request greedy output for that delta
    (``DeltaModel.generate`` with the delta's own tokenizer and end-of-sequence token)."""
    from hf_delta import DeltaModel
    from hf_delta.evaluation import greedy_generate
    from hf_delta.storage import Delta
    from hf_delta.utils.loading import load_model, load_tokenizer

    model = DeltaModel(load_model(micro_base))
    tokenizers = {"base": load_tokenizer(micro_base)}
    for name, folder in serving_deltas.items():
        model.add_delta(name, Delta.from_folder(folder))
        own = (folder / "tokenizer_config.json").is_file()
        tokenizers[name] = load_tokenizer(folder) if own else tokenizers["base"]
    memo: dict[tuple[str, str, int], str] = {}

    def ref(name: str, prompt: str, max_tokens: int) -> str:
        key = (name, prompt, max_tokens)
        if key not in memo:
            with torch.inference_mode():
                names = ["__base__" if name == "base" else name]
                memo[key] = greedy_generate(model, tokenizers[name], [prompt], max_new_tokens=max_tokens,
                                            delta_names=names)[0]
        return memo[key]

    return ref


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A byte-level tokenizer larger than the tiny architectures' vocabularies (``tests/_support/architectures``):
    their prompts are token ids, and every id they generate decodes."""
    from hf_delta.zoo.tokenizer import train_tokenizer

    return train_tokenizer("a tiny corpus for a tiny tokenizer, 0123456789. " * 20, 300)

"""The demo app on the micro zoo, launched once per session (headless, on a free local port)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from demo_constants import DELTAS, MAX_TOKENS

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a test run


@dataclass
class RunningDemo:
    url: str
    engine: object
    base: Path
    deltas: dict[str, Path]
    examples: dict[str, list[str]]


@pytest.fixture(scope="session")
def demo_models(micro_zoo, micro_delta):
    """Base folder, ``{name: delta folder}`` (BitDelta, no distillation) and example prompts of the micro zoo."""
    deltas = {name: micro_delta(name) for name in DELTAS}
    examples = {name: [ex.prompt for ex in micro_zoo.task(name).heldout[:2]] for name in DELTAS}
    return micro_zoo["llama-base"].path, deltas, examples


@pytest.fixture(scope="session")
def running_demo(demo_models, micro_zoo) -> Iterator[RunningDemo]:
    """The app serving the micro zoo's Llama fine-tunes, launched with ``prevent_thread_lock=True``."""
    import torch

    from hf_delta.demo.app import build_demo
    from hf_delta.demo.launch import DemoModels, start_engine
    from hf_delta.serving.engine import EngineConfig

    base, deltas, examples = demo_models
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # micro matmuls: extra threads only wait for each other on a busy machine
    engine = start_engine(DemoModels(base=base, deltas=deltas), config=EngineConfig(kv_cache_tokens=4096))
    demo = build_demo(engine, finetunes={n: micro_zoo[n].path for n in DELTAS}, examples=examples,
                      max_tokens=MAX_TOKENS, refresh_every=0)
    try:
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
        yield RunningDemo(url=url, engine=engine, base=base, deltas=deltas, examples=examples)
    finally:
        demo.close()
        engine.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def client(running_demo):
    from gradio_client import Client

    return Client(running_demo.url, verbose=False)


@pytest.fixture(scope="session")
def greedy(demo_models):
    """``greedy(model, prompt)`` → the library's greedy answer (``DeltaModel`` + ``greedy_generate``), with the
    prompt rendered the way the demo renders it (chat template for llama-chat, raw for the task fine-tunes)."""
    from hf_delta import DeltaModel
    from hf_delta.evaluation import greedy_generate
    from hf_delta.utils.loading import load_tokenizer

    base, deltas, _ = demo_models
    model = DeltaModel.from_pretrained(base, deltas[DELTAS[0]], DELTAS[0])
    for name in DELTAS[1:]:
        model.load_delta(deltas[name], name)
    cache: dict[tuple[str, str], str] = {}

    def answer(name: str, prompt: str) -> str:
        if (name, prompt) not in cache:
            tok = load_tokenizer(deltas[name] if name == "llama-chat" else base)
            if name == "llama-chat":
                prompt_text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                      tokenize=False)
            else:
                prompt_text = prompt
            cache[name, prompt] = greedy_generate(model, tok, [prompt_text], max_new_tokens=MAX_TOKENS,
                                                  delta_names=[name])[0]
        return cache[name, prompt]

    return answer

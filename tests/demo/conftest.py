"""The demo app on the micro zoo, launched once per session (headless, on a free local port), and the same demo
as a built Space folder, installed into a fresh virtual environment and started from its ``app.py``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
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


@dataclass
class SpaceApp:
    url: str
    folder: Path  # the Space folder (hf-delta space build)
    venv: Path  # the fresh virtual environment its requirements went into
    wheel_cache: Path  # where its app.py unpacked the bundled hf_delta wheel
    log: Path


@pytest.fixture(scope="session")
def space_folder(demo_models, tmp_path_factory) -> Path:
    """``build_space`` output serving the micro zoo's Llama deltas (base and deltas chosen at build time)."""
    from hf_delta.demo.space import build_space
    from hf_delta.utils.specs import DeltaSpec

    base, deltas, _ = demo_models
    return build_space(tmp_path_factory.mktemp("space") / "space", base=str(base),
                       deltas={name: DeltaSpec(str(folder)) for name, folder in deltas.items()})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what points Python at this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


@pytest.fixture(scope="session")
def space_app(space_folder, tmp_path_factory) -> Iterator[SpaceApp]:
    """The Space installed as the Spaces builder installs it and started headless from its ``app.py``.

    The builder runs ``pip install -r requirements.txt`` on the requirements file alone (the Space's other files
    are not there yet), so it is copied to a folder of its own first. Then ``python app.py`` runs in the Space
    folder with the fresh environment's Python, nothing of this checkout on its path.
    """
    from hf_delta.demo.start_page import START_PAGE_ID

    work = tmp_path_factory.mktemp("space-run")
    builder = work / "builder"
    builder.mkdir()
    shutil.copy2(space_folder / "requirements.txt", builder / "requirements.txt")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_clean_env())
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", "requirements.txt"], cwd=builder,
                          env=_clean_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"pip install -r requirements.txt failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    port = _free_port()
    log = work / "app.log"
    env = _clean_env(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf_home"),
                     HF_DELTA_SPACE_CACHE=str(work / "wheel-cache"), OMP_NUM_THREADS="1")
    with log.open("w") as out:
        app = subprocess.Popen([str(python), "app.py", "--host", "127.0.0.1", "--port", str(port), "--max-tokens",
                                str(MAX_TOKENS)], cwd=space_folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert app.poll() is None, f"app.py exited with {app.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"app.py did not serve the demo in time:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(url + "config", timeout=5) as response:
                    if START_PAGE_ID not in response.read().decode():
                        break  # the app itself answers, not the start page
            except OSError:
                pass
            time.sleep(1)
        yield SpaceApp(url=url, folder=space_folder, venv=venv, wheel_cache=work / "wheel-cache", log=log)
    finally:
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()


@dataclass
class StartingDemo:
    url: str
    release: threading.Event  # set it to let the first start finish
    thread: threading.Thread  # runs run_demo(block=False)
    launched: list  # the LaunchedDemo, once run_demo returned


@pytest.fixture
def starting_demo(demo_models, monkeypatch) -> Iterator[StartingDemo]:
    """``run_demo`` in a thread, held in its first start (one stage, 1 of 4 steps done) until ``release`` is set;
    then it serves the micro zoo's Llama deltas on the same address."""
    from hf_delta.demo import DemoSettings
    from hf_delta.demo import launch as launch_module
    from hf_delta.demo.launch import DemoModels
    from hf_delta.demo.startup import Stage
    from hf_delta.serving.engine import EngineConfig

    base, deltas, _ = demo_models
    release = threading.Event()
    real_start_engine = launch_module.start_engine

    def held_models(settings, *, progress=None):
        progress.plan([Stage("fine-tune llama-facts", "fine-tune", 4)])
        progress.update("fine-tune llama-facts", 0, 4)
        progress.update("fine-tune llama-facts", 1, 4)
        release.wait(timeout=300)
        return DemoModels(base=base, deltas=dict(deltas))

    monkeypatch.setattr(launch_module, "resolve_models", held_models)
    monkeypatch.setattr(launch_module, "start_engine", lambda models, **kw: real_start_engine(
        models, config=EngineConfig(kv_cache_tokens=4096), **kw))
    port = _free_port()
    settings = DemoSettings(base=str(base), host="127.0.0.1", port=port, max_tokens=MAX_TOKENS)
    launched: list = []
    thread = threading.Thread(target=lambda: launched.append(launch_module.run_demo(settings, block=False)))
    thread.start()
    try:
        yield StartingDemo(url=f"http://127.0.0.1:{port}/", release=release, thread=thread, launched=launched)
    finally:
        release.set()
        thread.join(timeout=300)
        for demo in launched:
            demo.close()

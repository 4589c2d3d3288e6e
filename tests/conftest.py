"""Shared pytest fixtures.

Sections (give new fixtures a section of their own):

* Local Hugging Face Hub: ``hub``, ``hub_errors_fail``, ``repo_id``, ``hub_cache``, ``hf_offline``.
* Micro zoo and its compressed deltas: ``micro_zoo``, ``micro_delta``, ``torch_one_thread``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hub_server import LocalHub

# Without a GPU the Triton kernels run under Triton's interpreter. The flag must be set before anything imports
# triton (transformers and hf_delta.methods do, through hf_delta.kernels), hence here and not in tests/kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The versions CI resolved (it installs the newest our ranges allow), first in the log: when an upstream
# release breaks a test, the header says which one arrived.
_REPORTED_DISTRIBUTIONS = ("torch", "transformers", "huggingface_hub", "peft", "gradio", "triton", "ray", "kernels")


def pytest_sessionstart(session: pytest.Session) -> None:
    from importlib.metadata import PackageNotFoundError, version

    def _version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # printed under -q too, unlike pytest_report_header
        line = ", ".join(f"{name} {_version(name)}" for name in _REPORTED_DISTRIBUTIONS)
        reporter.write_line(f"versions: python {sys.version.split()[0]}, {line}")


# ===================================================================================================
# Local Hugging Face Hub
# ===================================================================================================

# Environment variables that would leak a real token, force offline mode or redirect the client elsewhere.
_HF_ENV_TO_CLEAR = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_OIDC_RESOURCE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_CO_STAGING",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
)


def _patch_hf_constants(mp: pytest.MonkeyPatch, values: dict[str, Any]) -> None:
    """Set ``huggingface_hub.constants`` values, and the copies other modules made of them.

    The client reads its configuration into module constants at import time, and a few modules
    ``from ..constants import X``, so setting environment variables alone is not enough.
    Names this client version does not have are skipped.
    """
    from huggingface_hub import constants

    old = {name: getattr(constants, name) for name in values if hasattr(constants, name)}
    for name in old:
        mp.setattr(constants, name, values[name])
    for module_name, module in list(sys.modules.items()):
        if module is None or module is constants or not module_name.startswith("huggingface_hub"):
            continue
        namespace = vars(module)
        for name, old_value in old.items():
            if name in namespace and namespace[name] == old_value:
                mp.setattr(module, name, values[name])


def _close_hf_session() -> None:
    """Drop the client's cached HTTP session: its pooled connections point at a server that comes and
    goes, and clients before 1.0 bake offline mode into the session when they create it."""
    import huggingface_hub
    import huggingface_hub.utils

    close = getattr(huggingface_hub, "close_session", None) or huggingface_hub.utils.reset_sessions
    close()


def _point_hf_hub_at(mp: pytest.MonkeyPatch, url: str, home: Path) -> None:
    """Send every huggingface_hub request to ``url``, with caches and token files under ``home``."""
    from huggingface_hub import constants, hf_api

    old_home = constants.HF_HOME
    for name in _HF_ENV_TO_CLEAR:
        mp.delenv(name, raising=False)
    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
    }
    for name, value in env.items():
        mp.setenv(name, value)  # for subprocesses, which import huggingface_hub afresh

    # Every path constant derived from the old HF_HOME (token, stored tokens, update-check markers...).
    values: dict[str, Any] = {
        name: str(home) + value[len(old_home) :]
        for name, value in vars(constants).items()
        if name.isupper() and isinstance(value, str) and (value + os.sep).startswith(old_home + os.sep)
    }
    values.update(
        ENDPOINT=url,
        HUGGINGFACE_CO_URL_TEMPLATE=url + "/{repo_id}/resolve/{revision}/{filename}",
        HF_HOME=str(home),
        default_cache_path=env["HF_HUB_CACHE"],
        HUGGINGFACE_HUB_CACHE=env["HF_HUB_CACHE"],
        HF_HUB_CACHE=env["HF_HUB_CACHE"],
        default_assets_cache_path=env["HF_ASSETS_CACHE"],
        HUGGINGFACE_ASSETS_CACHE=env["HF_ASSETS_CACHE"],
        HF_ASSETS_CACHE=env["HF_ASSETS_CACHE"],
        HF_XET_CACHE=env["HF_XET_CACHE"],
        HF_TOKEN_PATH=env["HF_TOKEN_PATH"],
        HF_STORED_TOKENS_PATH=str(home / "stored_tokens"),
        HF_HUB_OFFLINE=False,
        HF_HUB_DISABLE_TELEMETRY=True,
        HF_HUB_DISABLE_XET=True,
    )
    _patch_hf_constants(mp, values)
    # The module-level HfApi behind `huggingface_hub.upload_folder` & co. froze its endpoint at import.
    if isinstance(getattr(hf_api, "api", None), hf_api.HfApi):
        mp.setattr(hf_api.api, "endpoint", url)
    _close_hf_session()


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """A LocalHub that huggingface_hub talks to for the rest of the session (state persists across tests).

    Use a repo id unique to the test. Example: ``HfApi().create_repo("org/my-test")``.
    """
    home = tmp_path_factory.mktemp("hf_home")
    with LocalHub() as server, pytest.MonkeyPatch.context() as mp:
        _point_hf_hub_at(mp, server.url, home)
        try:
            yield server
        finally:
            _close_hf_session()


@pytest.fixture
def hub_errors_fail(hub: LocalHub) -> Iterator[None]:
    """Fail a test whose requests hit a LocalHub bug (answered as HTTP 500, recorded in ``hub.errors``)."""
    yield
    assert not hub.errors, hub.errors[-1]


@pytest.fixture
def repo_id(request: pytest.FixtureRequest) -> str:
    """A repo id unique to the test (module and test name), since the session-wide hub keeps every repo."""
    name = f"{request.node.module.__name__}-{request.node.name}"
    return "org/" + re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:90]


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty hub cache dir, made huggingface_hub's default cache for this test."""
    cache = tmp_path / "hf_hub_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _patch_hf_constants(
        monkeypatch,
        {"HF_HUB_CACHE": str(cache), "HUGGINGFACE_HUB_CACHE": str(cache), "default_cache_path": str(cache)},
    )
    return cache


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """Call ``hf_offline()`` to put huggingface_hub offline (cache only, no HTTP) for the rest of the test."""

    def go_offline() -> None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        _patch_hf_constants(monkeypatch, {"HF_HUB_OFFLINE": True})
        _close_hf_session()

    yield go_offline
    _close_hf_session()


# ===================================================================================================
# Micro zoo and its compressed deltas
# ===================================================================================================


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One torch thread: micro-model matmuls are tiny, and on a busy 2-core machine OpenMP threads that wait
    for each other make them 10-30x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory: pytest.TempPathFactory):
    """The micro zoo (tiny Llama + Qwen2 bases and their fine-tunes), built once per session.

    Set ``HF_DELTA_TEST_ZOO=/some/dir`` to reuse a zoo across sessions (it is rebuilt when the recipe changes).
    """
    from hf_delta.zoo.build import build_zoo

    directory = os.environ.get("HF_DELTA_TEST_ZOO") or tmp_path_factory.mktemp("zoo")
    with _one_torch_thread():
        return build_zoo("micro", directory)


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """Run the test with one torch thread (see ``_one_torch_thread``)."""
    with _one_torch_thread():
        yield


@pytest.fixture(scope="session")
def micro_delta(micro_zoo, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``micro_delta("llama-arith", **bitdelta_config)`` → a saved delta repo folder (made once per arguments).

    Defaults to BitDelta without scale distillation (fast); tests must not modify the returned folder.
    """
    from hf_delta import BitDeltaConfig, compress

    made: dict[tuple[str, str], Path] = {}

    def make(name: str, **config: Any) -> Path:
        key = (name, repr(sorted(config.items())))
        if key not in made:
            entry = micro_zoo[name]
            with _one_torch_thread():
                model = compress(micro_zoo[entry.base].path, entry.path,
                                 BitDeltaConfig(**{"distill_steps": 0, **config}), progress=False)
            folder = tmp_path_factory.mktemp("delta-" + name)
            model.save_pretrained(folder)
            made[key] = folder
        return made[key]

    return make

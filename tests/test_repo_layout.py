"""The checkout must not shadow installed packages, and every script in it must start from the repo root.

Python puts the working directory (``python -c``, ``python -m pytest``) or the script's folder
(``python benchmarks/x.py``) first on ``sys.path``, and pytest adds each test folder. A module or package
there named like an installed distribution's top-level module wins over it: a root ``kernels/`` package
once hid Hugging Face's ``kernels``, and transformers could not be imported from the root.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_DIRS = ("benchmarks", "examples", "space")


def _sys_path_dirs(root: Path) -> list[Path]:
    """The folders of a checkout that land on ``sys.path``: the root, script folders, test folders."""
    tests = root / "tests"
    test_dirs = [tests, *(p for p in tests.rglob("*") if p.is_dir() and p.name != "__pycache__")]
    return [root, *(root / d for d in SCRIPT_DIRS if (root / d).is_dir()), *test_dirs]


def _importable_names(folder: Path) -> set[str]:
    """Top-level names a folder on ``sys.path`` provides that beat an installed package of that name.

    Modules and regular packages do; a folder without ``__init__.py`` is only a namespace portion, which
    the import system uses only when no regular package or module of that name exists anywhere on the path.
    """
    names = set()
    for entry in folder.iterdir():
        if entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
    return names


def shadowed_distributions(root: Path) -> dict[str, list[str]]:
    """``{"folder/name": [distributions]}`` for every name in the checkout that hides an installed module."""
    installed = importlib.metadata.packages_distributions()
    found = {}
    for folder in _sys_path_dirs(root):
        for name in sorted(_importable_names(folder)):
            owners = [d for d in installed.get(name, []) if d.replace("-", "_").lower() != "hf_delta"]
            if owners:
                found[str((folder / name).relative_to(root))] = owners
    return found


def test_nothing_in_the_checkout_shadows_an_installed_distribution():
    assert shadowed_distributions(ROOT) == {}


def test_the_shadow_check_finds_a_root_package_named_like_a_distribution(tmp_path):
    # pytest is installed here, so a checkout with a `pytest` package at its root (or a `pytest.py`
    # script in benchmarks/) must be reported; a folder without __init__.py must not.
    (tmp_path / "pytest").mkdir()
    (tmp_path / "pytest" / "__init__.py").write_text("")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "pytest.py").write_text("")
    (tmp_path / "torch").mkdir()
    (tmp_path / "tests").mkdir()
    assert set(shadowed_distributions(tmp_path)) == {"pytest", "benchmarks/pytest"}


def _start_in_root(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _run_in_root(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = _start_in_root(*args)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_transformers_imports_from_the_repo_root():
    done = _run_in_root("-c", "import transformers.modeling_utils, hf_delta.kernels.bitdelta; print('ok')")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_kernels_from_the_repo_root_is_the_installed_package():
    try:  # transformers 5.25 depends on it; older ones do not
        installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed")
    done = _run_in_root("-c", "import kernels; print(kernels.__file__)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve() == Path(installed).resolve()


SCRIPTS = sorted(str(p.relative_to(ROOT)) for d in SCRIPT_DIRS for p in (ROOT / d).glob("*.py"))


@pytest.fixture(scope="module")
def script_runs() -> Iterator[dict[str, Future]]:
    """Every script run with ``--help``, a few at a time: each spends seconds and ~0.4 GB importing torch, and
    starting all of them at once on a 2-core CI machine makes each one wait for all the others."""
    pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
    yield {script: pool.submit(_run_in_root, script, "--help", timeout=300) for script in SCRIPTS}
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_starts_from_the_repo_root(script, script_runs):
    done = script_runs[script].result()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]


def test_pyproject_ships_every_package_of_the_source_tree():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src").rglob("__init__.py")}
    assert listed == found | {"hf_delta.kernels"}

"""Write a self-contained Hugging Face Space folder for the demo, and push it as a Space repo.

The folder holds ``app.py`` (``space_app.py``), a README with the Spaces metadata header, ``requirements.txt``
(packages from the registry only: hf_delta's own requirements and its ``demo`` extra, torch and gradio pinned to
the versions this machine runs), the hf_delta wheel built from the current checkout, ``space.json`` (the base
and deltas chosen at build time) and the screenshot.

Why the wheel is not a line of ``requirements.txt``: the Spaces builder installs the requirements file alone,
before the Space's other files are in place, so a path to a file of the Space would not resolve there.
``app.py`` puts the wheel on ``sys.path`` when it starts.

>>> folder = build_space("my-space", base="org/base", deltas={"math": DeltaSpec("org/math-delta")})  # doctest: +SKIP
>>> push_space(folder, "me/hf-delta-demo")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from importlib.metadata import version
from pathlib import Path

from ..errors import SpaceBuildError
from ..utils.specs import DeltaSpec
from .settings import ENV_BASE, ENV_DELTAS, ENV_SIZE

logger = logging.getLogger(__name__)

SCREENSHOT = "screenshot.png"
DEFAULT_TITLE = "hf_delta: many fine-tunes, one base"
# What a wheel is built from: the project files setuptools reads (pyproject.toml's package-dir and readme).
_CHECKOUT_PARTS = ("pyproject.toml", "README.md", "src", "kernels")


def find_checkout(start: str | Path | None = None) -> Path:
    """The hf_delta source checkout this package runs from (the folder with its ``pyproject.toml``).

    Raises:
        SpaceBuildError: hf_delta is installed from a wheel, so there is no checkout to build one from.
    """
    here = Path(start) if start is not None else Path(__file__).resolve()
    for folder in here.parents:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and 'name = "hf_delta"' in pyproject.read_text():
            return folder
    raise SpaceBuildError(
        f"hf_delta runs from {here.parent}, which is not inside an hf_delta checkout, so there is "
        "no source to build the Space's wheel from: run from a checkout (pip install -e .) or "
        "pass a wheel with --wheel."
    )


def build_wheel(checkout: str | Path, dest: str | Path) -> Path:
    """Build the hf_delta wheel of ``checkout`` into ``dest`` (from a clean copy: no stale ``build/`` files)."""
    checkout, dest = Path(checkout), Path(dest)
    with tempfile.TemporaryDirectory(prefix="hf_delta-wheel-") as tmp:
        source = Path(tmp) / "source"
        source.mkdir()
        for part in _CHECKOUT_PARTS:
            path = checkout / part
            if path.is_dir():
                shutil.copytree(path, source / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            elif path.is_file():
                shutil.copy2(path, source / part)
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(Path(tmp) / "dist")]
        try:
            import setuptools  # noqa: F401  (built in this environment: no registry needed)

            command.append("--no-build-isolation")
        except ImportError:
            pass  # pip fetches the build backend into an isolated environment
        done = subprocess.run([*command, str(source)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SpaceBuildError(f"Building the hf_delta wheel from {checkout} failed:\n{done.stderr[-2000:]}")
        (wheel,) = (Path(tmp) / "dist").glob("hf_delta-*.whl")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheel, dest / wheel.name))


def space_requirements(wheel: str | Path) -> list[str]:
    """``requirements.txt`` lines for ``wheel``: its requirements and those of its ``demo`` extra, from the
    registry; torch and gradio pinned to the versions running here (torch as its public version, so a CPU
    machine's ``+cpu`` build and a GPU machine's default build both match)."""
    import zipfile

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    pins = {"torch": version("torch").split("+")[0], "gradio": version("gradio")}
    lines: dict[str, str] = {}
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": "demo"}):
            continue
        if req.name == "hf_delta":
            continue  # the extras of itself (dev) are not the demo's
        req.marker = None
        lines.setdefault(req.name, f"{req.name}=={pins[req.name]}" if req.name in pins else str(req))
    for pinned, pin in pins.items():
        lines.setdefault(pinned, f"{pinned}=={pin}")
    return [lines[n] for n in sorted(lines, key=str.lower)]


def _readme(title: str, variables: Mapping[str, str], wheel: str) -> str:
    import gradio

    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in variables.items()) or "| – | – |"
    header = {
        "title": title,
        "emoji": "🧮",
        "colorFrom": "indigo",
        "colorTo": "green",
        "sdk": "gradio",
        "sdk_version": gradio.__version__,
        "app_file": "app.py",
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        "pinned": False,
        "license": "apache-2.0",
        "short_description": "Chat with and compare compressed fine-tunes on one base",
    }
    yaml = "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in header.items())
    return f"""---
{yaml}
---

# {title}

One base model in memory, every fine-tune beside it as a compressed *delta* (BitDelta: one bit per weight
plus scales), all served by one engine that batches requests for different fine-tunes into the same forward
pass.

![The demo's chat tab]({SCREENSHOT})

* **Chat**: pick a fine-tune (or the base); replies stream, greedy, through the fine-tune's own chat template
  when it has one; the others continue your latest message as a raw prompt.
* **Compare**: one prompt, several fine-tunes, answered together as one mixed batch, side by side.
* **Models**: each delta's method, size on disk and ratio to its full fine-tune, whether it is resident.

Chosen when this Space was built (`space.json`); the Space's variables of the same names win:

| variable | value |
|---|---|
{rows}

Without `{ENV_BASE}`, the Space serves hf_delta's offline zoo (`{ENV_SIZE}`: `small` by default, or `micro`):
on its first start it trains a tiny Llama base and four fine-tunes and compresses them, showing the progress
on the page, and caches them for later starts. On ZeroGPU hardware the model work runs inside `@spaces.GPU`.

hf_delta itself is `{wheel}` in this folder (built from the source checkout); `requirements.txt` installs the
rest from the package registry.
"""


def build_space(
    out: str | Path,
    *,
    base: str | None = None,
    deltas: Mapping[str, DeltaSpec] | None = None,
    size: str | None = None,
    title: str = DEFAULT_TITLE,
    wheel: str | Path | None = None,
    screenshot: str | Path | None = None,
) -> Path:
    """Write the Space folder ``out`` (replaced as a whole, atomically) and return it.

    Args:
        out: the folder to write.
        base: the base model the Space serves (Hub id); default: the zoo.
        deltas: ``{name: DeltaSpec(repo, revision)}`` served beside ``base``.
        size: the zoo size served when no base is given (``small`` or ``micro``).
        title: the Space's title (README header and heading).
        wheel: an hf_delta wheel to ship (default: built from the checkout hf_delta runs from).
        screenshot: the PNG shown in the README (default: the checkout's ``docs/images/space.png``).

    Raises:
        SpaceBuildError: no checkout to build from (and no ``wheel``), no screenshot, or the wheel build failed.
    """
    from . import space_app

    out = Path(out)
    deltas = dict(deltas or {})
    if deltas and not base:
        raise SpaceBuildError(
            f"Deltas {sorted(deltas)} were given without a base: pass --base with the base model "
            "they were compressed from."
        )
    variables = {}
    if base:
        variables[ENV_BASE] = base
    if deltas:
        variables[ENV_DELTAS] = ",".join(
            f"{n}={s.repo}" + (f"@{s.revision}" if s.revision else "") for n, s in deltas.items()
        )
    if size:
        variables[ENV_SIZE] = size
    checkout = None if wheel is not None and screenshot is not None else find_checkout()
    screenshot = Path(screenshot) if screenshot is not None else checkout / "docs" / "images" / "space.png"
    if not screenshot.is_file():
        raise SpaceBuildError(f"No screenshot at {screenshot}: pass --screenshot with a PNG of the demo.")
    with _new_folder(out) as tmp:
        shipped = Path(shutil.copy2(wheel, tmp)) if wheel is not None else build_wheel(checkout, tmp)
        (tmp / "app.py").write_text(Path(space_app.__file__).read_text())
        (tmp / "space.json").write_text(json.dumps({"variables": variables}, indent=2) + "\n")
        (tmp / "requirements.txt").write_text("\n".join(space_requirements(shipped)) + "\n")
        (tmp / "README.md").write_text(_readme(title, variables, shipped.name))
        shutil.copy2(screenshot, tmp / SCREENSHOT)
    logger.info("Space folder written to %s (%s)", out, ", ".join(sorted(p.name for p in out.iterdir())))
    return out


@contextlib.contextmanager
def _new_folder(dest: Path) -> Iterator[Path]:
    """A temporary folder beside ``dest`` that replaces it whole on success (nothing of the old one is kept:
    a Space folder is uploaded as it is) and is removed on error."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def push_space(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str = "Update the hf_delta demo Space",
) -> str:
    """Create (or reuse) the Gradio Space ``repo_id`` and upload ``folder`` to it; returns the commit URL.

    Wheels the folder no longer holds are deleted from the Space, so it never carries two. The token comes
    from ``token`` or else the usual places (``HF_TOKEN``, ``hf auth login``).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="space",
        commit_message=commit_message,
        delete_patterns=["hf_delta-*.whl"],
    )
    logger.info("Pushed %s to the Space %s: %s", folder, repo_id, commit.commit_url)
    return commit.commit_url

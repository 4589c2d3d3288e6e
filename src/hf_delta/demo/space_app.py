"""Hugging Face Space entry point: the hf_delta demo (chat, side-by-side compare, models panel).

``hf-delta space build`` copies this file into a Space folder as ``app.py``, beside the hf_delta wheel built
from the checkout and ``space.json`` (the base and deltas chosen at build time). The Space's requirements come
from the package registry only, so this file puts the bundled wheel on ``sys.path`` before importing hf_delta.

The Space's variables (Settings → Variables) win over the build-time choice:

    HF_DELTA_DEMO_BASE=org/base-model
    HF_DELTA_DEMO_DELTAS=math=org/math-delta,chat=org/chat-delta@v1
    HF_DELTA_DEMO_SIZE=micro        # the zoo served when no base is given (small by default)

On ZeroGPU hardware (the ``spaces`` package is importable) the model work runs inside ``@spaces.GPU``; on CPU
hardware the engine steps in its own thread. Locally: ``python app.py [hf-delta demo flags]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import MutableMapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPACE_CONFIG = "space.json"


def wheel_cache() -> Path:
    """Where bundled wheels are unpacked: ``$HF_DELTA_SPACE_CACHE`` or ``~/.cache/hf_delta/space``."""
    return Path(os.environ.get("HF_DELTA_SPACE_CACHE", Path.home() / ".cache" / "hf_delta" / "space"))


def use_bundled_wheel(folder: Path = HERE) -> Path | None:
    """Put the hf_delta wheel shipped in ``folder`` first on ``sys.path``; returns where it was unpacked.

    A pure-Python wheel unpacked is an installed package (its ``.dist-info`` included). It is unpacked once per
    wheel content (a rebuilt wheel keeps its name), through a temporary folder and a rename.
    """
    wheels = sorted(folder.glob("hf_delta-*.whl"))
    if not wheels:
        return None  # hf_delta comes from the environment (a checkout, pip install)
    wheel = wheels[-1]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:16]
    target = wheel_cache() / f"{wheel.stem}-{digest}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{wheel.stem}.", dir=target.parent))
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.path.insert(0, str(target))
    return target


def apply_build_defaults(folder: Path = HERE, env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the variables recorded in ``space.json`` that the Space's own variables do not set; returns them."""
    path = folder / SPACE_CONFIG
    variables = json.loads(path.read_text())["variables"] if path.is_file() else {}
    for name, value in variables.items():
        env.setdefault(name, value)
    return variables


def main(argv: list[str] | None = None) -> int:
    use_bundled_wheel()
    apply_build_defaults()
    from hf_delta.demo import add_demo_arguments, demo_main

    parser = add_demo_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    if args.host is None:
        args.host = os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0")  # a Space (or a container) is reached from outside
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("hf_delta").setLevel(logging.INFO)  # first-start progress: zoo build, compression
    return demo_main(args)


if __name__ == "__main__":
    raise SystemExit(main())

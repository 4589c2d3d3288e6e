"""Settings of the demo: command-line flags, environment variables, and ``demo_main`` that runs it.

Flags win over environment variables, which win over the defaults (the small zoo). This module imports
neither torch nor gradio, so building the ``hf-delta`` parser stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EngineConfigError

logger = logging.getLogger(__name__)

ENV_BASE = "HF_DELTA_DEMO_BASE"
ENV_DELTAS = "HF_DELTA_DEMO_DELTAS"
ENV_SIZE = "HF_DELTA_DEMO_SIZE"


@dataclass
class DemoSettings:
    """What the demo serves and how it is launched.

    Args:
        size: zoo size served when no ``base`` is given: ``"small"`` (default) or ``"micro"``.
        zoo_dir: zoo root (default ``$HF_DELTA_ZOO`` or ``~/.cache/hf_delta/zoo``).
        zoo_base: the zoo base whose fine-tunes are served (``"llama-base"`` or ``"qwen2-base"``).
        cache_dir: where the zoo's compressed deltas are cached (default ``$HF_DELTA_DEMO_CACHE`` or
            ``~/.cache/hf_delta/demo``).
        base: a real base model (Hub id or folder) instead of the zoo.
        deltas: ``{name: delta repo (Hub id or folder)}`` served beside ``base``.
        max_tokens: most tokens per reply (greedy decoding, so replies are reproducible).
        host, port: where to serve (Gradio's defaults, or ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``).
        launch: start the web app (``False``: only prepare the models, e.g. to warm a cache).
    """

    size: str = "small"
    zoo_dir: Path | None = None
    zoo_base: str = "llama-base"
    cache_dir: Path | None = None
    base: str | None = None
    deltas: dict[str, str] = field(default_factory=dict)
    max_tokens: int = 64
    host: str | None = None
    port: int | None = None
    launch: bool = True


def parse_deltas(spec: str | list[str] | None) -> dict[str, str]:
    """``"name=repo,name=repo"`` (or a list of ``name=repo``) → ``{name: repo}``.

    Raises:
        EngineConfigError: an item is not ``name=repo`` or a name repeats.

    >>> parse_deltas("math=org/math-delta, chat=./chat-delta")
    {'math': 'org/math-delta', 'chat': './chat-delta'}
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    out: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, repo = (p.strip() for p in item.partition("="))
        if not sep or not name or not repo:
            raise EngineConfigError(f"A delta must be given as NAME=REPO (e.g. math=org/math-delta), got {item!r}.")
        if name in out:
            raise EngineConfigError(f"The delta name {name!r} is given twice ({out[name]} and {repo}).")
        out[name] = repo
    return out


def settings_from_env(env: Mapping[str, str] | None = None) -> DemoSettings:
    """Settings from ``HF_DELTA_DEMO_BASE``, ``HF_DELTA_DEMO_DELTAS`` and ``HF_DELTA_DEMO_SIZE``."""
    env = os.environ if env is None else env
    settings = DemoSettings()
    if env.get(ENV_SIZE):
        settings.size = env[ENV_SIZE]
    if env.get(ENV_BASE):
        settings.base = env[ENV_BASE]
    settings.deltas = parse_deltas(env.get(ENV_DELTAS))
    return settings


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``hf-delta demo`` flags to ``parser`` (defaults come from the environment; see ``demo_main``)."""
    parser.add_argument("--size", default=None, choices=["small", "micro"],
                        help=f"zoo served by default (${ENV_SIZE}, else small; micro starts in seconds)")
    parser.add_argument("--dir", dest="zoo_dir", default=None, help="zoo root (default $HF_DELTA_ZOO or "
                        "~/.cache/hf_delta/zoo)")
    parser.add_argument("--zoo-base", default="llama-base", help="zoo base whose fine-tunes are served")
    parser.add_argument("--cache-dir", default=None, help="where compressed zoo deltas are cached")
    parser.add_argument("--base", default=None, help=f"a real base model, Hub id or folder (${ENV_BASE})")
    parser.add_argument("--delta", action="append", default=None, metavar="NAME=REPO",
                        help=f"a delta repo to serve beside --base; repeat it (${ENV_DELTAS}='a=org/a,b=org/b')")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens per reply (default 64)")
    parser.add_argument("--host", default=None, help="interface to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or $GRADIO_SERVER_PORT)")
    parser.add_argument("--no-launch", dest="launch", action="store_false",
                        help="prepare the models (build and compress the zoo) and exit")
    return parser


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> DemoSettings:
    """Merge parsed flags over ``settings_from_env(env)``."""
    settings = settings_from_env(env)
    if args.size:
        settings.size = args.size
    if args.base:
        settings.base = args.base
    if args.delta:
        settings.deltas = parse_deltas(args.delta)
    settings.zoo_dir = Path(args.zoo_dir) if args.zoo_dir else None
    settings.cache_dir = Path(args.cache_dir) if args.cache_dir else None
    settings.zoo_base = args.zoo_base
    settings.max_tokens = args.max_tokens
    settings.host, settings.port, settings.launch = args.host, args.port, args.launch
    if settings.deltas and not settings.base:
        raise EngineConfigError(f"Deltas {sorted(settings.deltas)} were given without a base: pass --base "
                                f"(or ${ENV_BASE}) with the base model they were compressed from.")
    return settings


def demo_main(args: argparse.Namespace) -> int:
    """Run ``hf-delta demo``: prepare the models, start the engine and serve the app until interrupted."""
    from .launch import run_demo

    logging.getLogger("hf_delta.demo").setLevel(logging.INFO)  # first-start progress is worth showing
    run_demo(settings_from_args(args))
    return 0

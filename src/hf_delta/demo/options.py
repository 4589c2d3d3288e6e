"""The demo's command line: its flags, settings from them (over ``settings.settings_from_env``), ``demo_main``.

Flags win over environment variables, which win over the defaults (the small zoo). This module imports
neither torch nor gradio, so building the ``hf-delta`` parser stays fast.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path

from ..errors import EngineConfigError
from ..utils.specs import parse_delta_specs
from .settings import ENV_BASE, ENV_DELTAS, ENV_SIZE, DemoSettings, settings_from_env

logger = logging.getLogger(__name__)

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
        settings.deltas = parse_delta_specs(args.delta)
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

"""``hf-delta demo``: the Gradio demo (chat, side-by-side compare, models panel)."""

from __future__ import annotations

import argparse
import sys


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from ..demo import add_demo_arguments
    except ImportError as err:  # gradio is an extra: say how to get it when the demo is asked for
        parser.set_defaults(demo_import_error=err)
        return
    add_demo_arguments(parser)


def _demo(args: argparse.Namespace) -> int:
    if getattr(args, "demo_import_error", None):
        print(f"error: the demo needs gradio ({args.demo_import_error}): pip install 'hf_delta[demo]'",
              file=sys.stderr)
        return 2
    from ..demo import demo_main

    return demo_main(args)


def register(sub) -> None:
    """Add ``demo`` to the ``hf-delta`` subcommands."""
    demo = sub.add_parser("demo", help="Gradio demo: chat, side-by-side compare, models panel (the main job)")
    _add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

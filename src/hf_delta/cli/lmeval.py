"""``hf-delta lm-eval ...``: lm-evaluation-harness's own command line, with the ``hf-delta`` model type registered."""

from __future__ import annotations

import argparse


def _lm_eval(args: argparse.Namespace) -> int:
    from ..integrations.lm_eval import main

    return main(args.lm_eval_args)


def register(sub) -> None:
    """Add ``lm-eval`` to the ``hf-delta`` subcommands; every argument after it goes to lm-eval unchanged."""
    # No options of its own ('+' marks none): '--model', '--tasks', '--help'... all belong to lm-eval.
    parser = sub.add_parser(
        "lm-eval",
        add_help=False,
        prefix_chars="+",
        help="lm-evaluation-harness with --model hf-delta (base=...,delta=...,delta_name=...)",
    )
    parser.add_argument(
        "lm_eval_args",
        nargs=argparse.REMAINDER,
        help="lm-eval's arguments, e.g. --model hf-delta --model_args base=B,delta=D --tasks T",
    )
    parser.set_defaults(func=_lm_eval)

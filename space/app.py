"""Hugging Face Space entry point: the hf_delta demo (chat, compare, models panel).

Serves the small offline zoo by default (built and compressed on the first start, cached afterwards). Point it
at a real base and Hub delta repos with the Space's variables:

    HF_DELTA_DEMO_BASE=org/base-model
    HF_DELTA_DEMO_DELTAS=math=org/math-delta,chat=org/chat-delta
    HF_DELTA_DEMO_SIZE=micro        # the zoo served when no base is given (small by default)

Run it from a checkout too, with hf_delta installed: ``python space/app.py [hf-delta demo flags]``.
"""

from __future__ import annotations

import argparse
import logging

from hf_delta.demo import add_demo_arguments, demo_main


def main(argv: list[str] | None = None) -> int:
    parser = add_demo_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    if args.host is None:
        args.host = "0.0.0.0"  # a Space (or a container) is reached from outside
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("hf_delta").setLevel(logging.INFO)  # first-start progress: zoo build, compression
    return demo_main(args)


if __name__ == "__main__":
    raise SystemExit(main())

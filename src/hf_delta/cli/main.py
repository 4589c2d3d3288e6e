"""The ``hf-delta`` command line: zoo, eval, compress, bench, serve, demo, space, lm-eval."""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys

# Each command group registers its subcommands from its own module; a command's implementation is imported
# only when that command runs, so building the parser (``hf-delta --help``) imports neither torch nor FastAPI.
COMMAND_MODULES = ("zoo", "compress", "bench", "serve", "demo", "space", "lmeval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-delta", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["hf-delta", *argv])  # recorded beside every result it writes
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..errors import HfDeltaError

    try:
        return args.func(args)
    except HfDeltaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""``hf-delta zoo build|list`` and ``hf-delta eval``: the offline reference zoo and its evaluation table."""

from __future__ import annotations

import argparse


def _zoo_build(args: argparse.Namespace) -> int:
    from ..zoo import build_zoo

    zoo = build_zoo(args.size, args.dir, force=args.force)
    print(f"{args.size} zoo ready at {zoo.root}")
    for e in zoo.entries.values():
        print(f"  {e.name:14s} {e.arch:6s} {'task=' + e.task if e.task else 'base'}")
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    from ..errors import ZooError
    from ..zoo import load_zoo
    from ..zoo.recipes import RECIPES

    for size in RECIPES:
        try:
            zoo = load_zoo(size, args.dir)
        except ZooError as err:
            print(f"{size}: not built ({err})")
            continue
        print(f"{size}: {zoo.root}")
        for e in zoo.entries.values():
            print(f"  {e.name:14s} {e.arch:6s} {'task=' + e.task if e.task else 'base'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..bench.report import write_results
    from ..bench.zoo_eval import evaluate_zoo

    rows = evaluate_zoo(args.size, args.dir, build=args.build)
    md = write_results(rows, args.out, name=f"zoo-eval-{args.size}", command=args.command_line)
    print(md)
    return 0


def register(sub) -> None:
    """Add ``zoo`` and ``eval`` to the ``hf-delta`` subcommands."""
    zoo = sub.add_parser("zoo", help="build or list the offline reference zoo").add_subparsers(
        dest="zoo_command", required=True)
    build = zoo.add_parser("build", help="build (or reuse) a zoo")
    build.add_argument("--size", default="micro", help="micro (seconds) or small (minutes)")
    build.add_argument("--dir", default=None, help="zoo root (default $HF_DELTA_ZOO or ~/.cache/hf_delta/zoo)")
    build.add_argument("--force", action="store_true", help="rebuild even if a matching zoo is cached")
    build.set_defaults(func=_zoo_build)
    lst = zoo.add_parser("list", help="list built zoos")
    lst.add_argument("--dir", default=None)
    lst.set_defaults(func=_zoo_list)

    ev = sub.add_parser("eval", help="base vs fine-tune scores for every zoo fine-tune")
    ev.add_argument("--size", default="small")
    ev.add_argument("--dir", default=None)
    ev.add_argument("--build", action="store_true", help="build the zoo first if needed")
    ev.add_argument("--out", default="benchmarks/results", help="folder for the JSON and Markdown table")
    ev.set_defaults(func=_eval)

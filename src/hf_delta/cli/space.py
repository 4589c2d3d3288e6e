"""``hf-delta space build OUT [--push REPO_ID]``: the demo as a self-contained Hugging Face Space folder."""

from __future__ import annotations

import argparse


def _space_build(args: argparse.Namespace) -> int:
    from ..demo.space import DEFAULT_TITLE, build_space, push_space
    from ..utils.specs import parse_delta_specs

    folder = build_space(
        args.out,
        base=args.base,
        deltas=parse_delta_specs(args.delta),
        size=args.size,
        title=args.title or DEFAULT_TITLE,
        wheel=args.wheel,
        screenshot=args.screenshot,
    )
    print(f"Space folder ready at {folder}:")
    for path in sorted(folder.iterdir()):
        print(f"  {path.name:40s} {path.stat().st_size:>10,d} bytes")
    if args.push:
        url = push_space(folder, args.push, private=args.private, token=args.token)
        print(f"Pushed to the Space {args.push}: {url}")
    return 0


def register(sub) -> None:
    """Add ``space build`` to the ``hf-delta`` subcommands."""
    space = sub.add_parser("space", help="the demo as a Hugging Face Space: build the folder, push it")
    space_sub = space.add_subparsers(dest="space_command", required=True)
    build = space_sub.add_parser(
        "build",
        help="write a self-contained Space folder (app, README, requirements, "
        "the hf_delta wheel, screenshot); --push uploads it",
    )
    build.add_argument("out", help="folder to write (replaced whole)")
    build.add_argument("--base", default=None, help="base model the Space serves (Hub id); default: the zoo")
    build.add_argument(
        "--delta",
        action="append",
        default=None,
        metavar="NAME=REPO[@REV]",
        help="a delta repo served beside --base; repeat it",
    )
    build.add_argument(
        "--size",
        default=None,
        choices=["small", "micro"],
        help="zoo size served when no --base is given (default small)",
    )
    build.add_argument("--title", default=None, help="the Space's title")
    build.add_argument("--wheel", default=None, help="ship this hf_delta wheel (default: built from the checkout)")
    build.add_argument("--screenshot", default=None, help="PNG for the README (default docs/images/space.png)")
    build.add_argument(
        "--push",
        default=None,
        metavar="REPO_ID",
        help="upload the folder to this Space repo (created as a Gradio Space if missing; pushing again updates it)",
    )
    build.add_argument("--private", action="store_true", help="create the Space private")
    build.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    build.set_defaults(func=_space_build)

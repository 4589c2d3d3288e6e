"""The ``hf-delta`` command line: zoo, eval, compress, bench, serve, demo."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

logger = logging.getLogger("hf_delta")


def _zoo_build(args: argparse.Namespace) -> int:
    from .zoo import build_zoo

    zoo = build_zoo(args.size, args.dir, force=args.force)
    print(f"{args.size} zoo ready at {zoo.root}")
    for e in zoo.entries.values():
        print(f"  {e.name:14s} {e.arch:6s} {'task=' + e.task if e.task else 'base'}")
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    from .errors import ZooError
    from .zoo import load_zoo
    from .zoo.recipes import RECIPES

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
    from .zoo.report import evaluate_zoo, write_results

    rows = evaluate_zoo(args.size, args.dir, build=args.build)
    md = write_results(rows, args.out, name=f"zoo-eval-{args.size}", command=args.command_line)
    print(md)
    return 0


def _compress(args: argparse.Namespace) -> int:
    from .compression import compress
    from .methods import get_method

    method = get_method(args.method)
    options = json.loads(args.options) if args.options else {}
    for key in ("bits", "sparsity", "rank"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    config = method.config_class(**options)
    calibration = Path(args.calibration).read_text().splitlines() if args.calibration else None
    model = compress(args.base, args.finetuned, config, calibration)
    model.save_pretrained(args.out)
    print(f"Saved {args.method} delta to {args.out}")
    if args.push_to_hub:
        sha = model.push_to_hub(args.push_to_hub, private=args.private)
        print(f"Pushed to {args.push_to_hub} (commit {sha})")
    return 0


def _sparsity(value: str) -> str | float:
    return value if ":" in value else float(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-delta", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

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

    comp = sub.add_parser("compress", help="compress FINETUNED - BASE into a delta repo at OUT")
    comp.add_argument("base")
    comp.add_argument("finetuned")
    comp.add_argument("out")
    comp.add_argument("--method", default="bitdelta")
    comp.add_argument("--bits", type=int, default=None, help="deltazip: 2, 3, 4 or 8")
    comp.add_argument("--sparsity", type=_sparsity, default=None, help="deltazip: '2:4' or a fraction")
    comp.add_argument("--rank", type=int, default=None, help="lowrank: rank of the delta")
    comp.add_argument("--options", default=None, help="extra config fields as JSON, e.g. '{\"scale\": \"row\"}'")
    comp.add_argument("--calibration", default=None, help="text file, one calibration text per line")
    comp.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload to this Hub repo")
    comp.add_argument("--private", action="store_true", help="create the Hub repo private")
    comp.set_defaults(func=_compress)

    bench = sub.add_parser("bench", help="benchmarks that write JSON + Markdown under benchmarks/results")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    fid = bench_sub.add_parser("fidelity", help="every zoo fine-tune x method settings: retention, KL, size")
    fid.add_argument("--size", default="small")
    fid.add_argument("--dir", default=None)
    fid.add_argument("--out", default="benchmarks/results")
    fid.add_argument("--settings", default="bitdelta-initial,bitdelta",
                     help="comma-separated setting names (see hf_delta.fidelity.SETTINGS)")
    fid.add_argument("--finetunes", default=None, help="comma-separated zoo fine-tunes (default: all)")
    fid.add_argument("--calibration", choices=["task", "sampled"], default="task",
                     help="calibration texts: the fine-tune's training split, or sampled from it (data-free)")
    from .serving.cli import add_serve_arguments

    serve = sub.add_parser("serve", help="OpenAI-compatible server: one base, many deltas, continuous batching")
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)
    from .serving import cli as serving_cli
    from .serving import coserve_bench, ray_bench

    for name, module, suffix, help_text in (
        ("serve", serving_cli, "serve", "serving throughput/latency vs naive swapping, merged, PEFT loop"),
        ("ray", ray_bench, "ray", "engine replicas on Ray Serve: 1 vs 2 replicas, delta affinity on/off"),
        ("coserve", coserve_bench, "coserve", "LoRA fine-tuning co-served with inference vs alone / turn-taking"),
    ):
        bench = bench_sub.add_parser(name, help=help_text)
        getattr(module, f"add_bench_{suffix}_arguments")(bench)
        bench.set_defaults(func=_bench_main(getattr(module, f"bench_{suffix}_main")))

    demo = sub.add_parser("demo", help="Gradio demo: chat, side-by-side compare, models panel (the main job)")
    _add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    fid.add_argument("--merge", action="store_true",
                     help="keep rows of other settings already in the results file (run a long grid in parts)")
    fid.set_defaults(func=_bench_fidelity)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .serving.cli import serve_main

    return serve_main(args)


def _bench_main(main):
    """A benchmark's entry point, given the command line to record with its results."""
    return lambda args: main(args, command=args.command_line)


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from .demo import add_demo_arguments
    except ImportError as err:  # gradio is an extra: say how to get it when the demo is asked for
        parser.set_defaults(demo_import_error=err)
        return
    add_demo_arguments(parser)


def _demo(args: argparse.Namespace) -> int:
    if getattr(args, "demo_import_error", None):
        print(f"error: the demo needs gradio ({args.demo_import_error}): pip install 'hf_delta[demo]'",
              file=sys.stderr)
        return 2
    from .demo import demo_main

    return demo_main(args)


def _bench_fidelity(args: argparse.Namespace) -> int:
    from .fidelity import bench_fidelity

    print(bench_fidelity(args.size, args.dir, args.out, settings=args.settings.split(","),
                         finetunes=args.finetunes.split(",") if args.finetunes else None,
                         calibration=args.calibration, command=args.command_line, merge=args.merge))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["hf-delta", *argv])  # recorded beside every result it writes
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .errors import HfDeltaError

    try:
        return args.func(args)
    except HfDeltaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

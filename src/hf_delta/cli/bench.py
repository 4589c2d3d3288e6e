"""``hf-delta bench fidelity|serve|ray|coserve|scale``: benchmarks writing JSON + Markdown under benchmarks/results."""

from __future__ import annotations

import argparse

from ..bench.options import (
    add_bench_coserve_arguments,
    add_bench_fidelity_arguments,
    add_bench_ray_arguments,
    add_bench_scale_arguments,
    add_bench_serve_arguments,
)


def _fidelity(args: argparse.Namespace) -> int:
    from ..bench.fidelity import bench_fidelity

    print(bench_fidelity(args.size, args.dir, args.out, settings=args.settings.split(","),
                         finetunes=args.finetunes.split(",") if args.finetunes else None,
                         calibration=args.calibration, command=args.command_line, merge=args.merge,
                         lm_eval_tasks=args.lm_eval.split(",") if args.lm_eval else (),
                         lm_eval_include=args.lm_eval_include_path, lm_eval_limit=args.lm_eval_limit))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ..bench.serve import bench_serve_main

    return bench_serve_main(args, command=args.command_line)


def _ray(args: argparse.Namespace) -> int:
    from ..bench.ray import bench_ray_main

    return bench_ray_main(args, command=args.command_line)


def _coserve(args: argparse.Namespace) -> int:
    from ..bench.coserve import bench_coserve_main

    return bench_coserve_main(args, command=args.command_line)


def _scale(args: argparse.Namespace) -> int:
    from ..bench.scale import bench_scale_main

    return bench_scale_main(args, command=args.command_line)


def register(sub) -> None:
    """Add ``bench`` and its subcommands to the ``hf-delta`` subcommands."""
    bench = sub.add_parser("bench", help="benchmarks that write JSON + Markdown under benchmarks/results")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, add_arguments, run, help_text in (
        ("fidelity", add_bench_fidelity_arguments, _fidelity,
         "every zoo fine-tune x method settings: retention, KL, size"),
        ("serve", add_bench_serve_arguments, _serve,
         "serving throughput/latency vs naive swapping, merged, PEFT loop"),
        ("ray", add_bench_ray_arguments, _ray,
         "engine replicas on Ray Serve: 1 vs 2 replicas, delta affinity on/off"),
        ("coserve", add_bench_coserve_arguments, _coserve,
         "LoRA fine-tuning co-served with inference vs alone / turn-taking"),
        ("scale", add_bench_scale_arguments, _scale,
         "compression and loading at real sizes (synthetic 0.85B / 7B Llama checkpoints): RSS, time, ratio, error"),
    ):
        parser = bench_sub.add_parser(name, help=help_text)
        add_arguments(parser)
        parser.set_defaults(func=run)

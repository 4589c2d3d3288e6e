"""``hf-delta compress``: FINETUNED - BASE into a delta repo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _compress(args: argparse.Namespace) -> int:
    from ..compression import compress_delta
    from ..hub import push_delta_to_hub
    from ..methods import get_method

    options = json.loads(args.options) if args.options else {}
    heldout = Path(args.heldout).read_text().splitlines() if args.heldout else []
    if args.auto:
        from ..methods import AutoConfig

        targets = {"target_retention": args.target_retention, "target_kl": args.target_kl,
                   "budget_bytes": args.budget_bytes}
        if heldout:  # they follow the calibration texts: AutoConfig verifies on its last heldout_samples texts
            options["heldout_samples"] = len(heldout)
        config = AutoConfig(**options, **{k: v for k, v in targets.items() if v is not None})
    elif heldout:
        raise SystemExit("--heldout goes with --auto (the texts its allocation is verified on).")
    else:
        method = get_method(args.method)
        for key in ("bits", "sparsity", "rank"):
            value = getattr(args, key, None)
            if value is not None:
                options[key] = value
        config = method.config_class(**options)
    calibration = Path(args.calibration).read_text().splitlines() if args.calibration else None
    if heldout:
        if calibration is None:
            raise SystemExit("--heldout needs --calibration (the texts the allocation is chosen on).")
        calibration += heldout
    delta = compress_delta(args.base, args.finetuned, config, calibration, device=args.device)
    delta.save_pretrained(args.out)
    print(f"Saved {config.method} delta to {args.out}")
    if args.push_to_hub:
        sha = push_delta_to_hub(delta, args.push_to_hub, private=args.private)
        print(f"Pushed to {args.push_to_hub} (commit {sha})")
    return 0


def _sparsity(value: str) -> str | float:
    return value if ":" in value else float(value)


def register(sub) -> None:
    """Add ``compress`` to the ``hf-delta`` subcommands."""
    comp = sub.add_parser("compress", help="compress FINETUNED - BASE into a delta repo at OUT")
    comp.add_argument("base")
    comp.add_argument("finetuned")
    comp.add_argument("out")
    comp.add_argument("--method", default="bitdelta")
    comp.add_argument("--bits", type=int, default=None, help="deltazip: 2, 3, 4 or 8")
    comp.add_argument("--sparsity", type=_sparsity, default=None, help="deltazip: '2:4' or a fraction")
    comp.add_argument("--rank", type=int, default=None, help="lowrank: rank of the delta")
    comp.add_argument("--auto", action="store_true",
                      help="choose each matrix's method and setting for the target below (needs calibration text, "
                           "or samples it from the fine-tune)")
    comp.add_argument("--target-retention", type=float, default=None, help="--auto: e.g. 0.99")
    comp.add_argument("--target-kl", type=float, default=None, help="--auto: mean next-token KL, e.g. 0.05")
    comp.add_argument("--budget-bytes", type=int, default=None, help="--auto: the largest size of the matrices")
    comp.add_argument("--heldout", default=None,
                      help="--auto: text file, one held-out prompt per line (e.g. new task questions the fine-tune "
                           "was not trained on): the delta must continue them as the fine-tune does")
    comp.add_argument("--options", default=None, help="extra config fields as JSON, e.g. '{\"scale\": \"row\"}'")
    comp.add_argument("--calibration", default=None, help="text file, one calibration text per line")
    comp.add_argument("--device", default=None, help="where deltas are computed: cpu (default) or cuda")
    comp.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload to this Hub repo")
    comp.add_argument("--private", action="store_true", help="create the Hub repo private")
    comp.set_defaults(func=_compress)

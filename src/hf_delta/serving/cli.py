"""Arguments and entry points of ``hf-delta serve`` and ``hf-delta bench serve`` (wired by ``hf_delta.cli``)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from ..errors import EngineConfigError

logger = logging.getLogger(__name__)


def _engine_arguments(parser: argparse.ArgumentParser, *, device_slots: int, cpu_slots: int) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--device-slots", type=int, default=device_slots, help="deltas attached to the model at once")
    g.add_argument("--cpu-slots", type=int, default=cpu_slots, help="further deltas kept in CPU memory")
    g.add_argument("--kv-cache-tokens", type=int, default=16384, help="KV-cache budget in tokens")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per forward pass")
    g.add_argument("--max-running", type=int, default=256, help="requests in the running batch")
    g.add_argument("--fairness-steps", type=int, default=64,
                   help="steps a request may be overtaken before younger requests must wait for it")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")


def _engine_config(args: argparse.Namespace, *, max_model_len: int | None = None):
    from .engine import EngineConfig

    return EngineConfig(device_slots=args.device_slots, cpu_slots=args.cpu_slots,
                        kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size,
                        max_batch_tokens=args.max_batch_tokens, max_running=args.max_running,
                        fairness_steps=args.fairness_steps, max_model_len=max_model_len)


def _device_dtype(args: argparse.Namespace):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, dtype)


# ------------------------------------------------------------------------------------------------- serve
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-delta serve``."""
    parser.add_argument("--base", default=None, help="base model: Hub id or folder (required but with --serve-config)")
    parser.add_argument("--delta", action="append", default=[], metavar="NAME=REPO[@REVISION]",
                        help="serve delta repo REPO (folder or Hub id) as model NAME; repeat for more")
    parser.add_argument("--base-name", default="base", help="model name that selects the base without a delta")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--fine-tuning-dir", default=None,
                        help="where fine-tuning jobs write (default ~/.cache/hf_delta/fine_tuning)")
    parser.add_argument("--api-key", default=os.environ.get("HF_DELTA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $HF_DELTA_API_KEY)")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion")
    parser.add_argument("--local-files-only", action="store_true", help="never download from the Hub")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    _engine_arguments(parser, device_slots=8, cpu_slots=8)
    g = parser.add_argument_group("scale-out on Ray Serve (pip install 'hf_delta[ray]'; see docs/ray.md)")
    g.add_argument("--ray", action="store_true", help="serve with N engine replicas on Ray Serve")
    g.add_argument("--replicas", type=int, default=1, help="engine replicas (--ray)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto' = the one on this machine); default: start a local one")
    g.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs reserved per replica")
    g.add_argument("--replica-gpus", type=float, default=0.0, help="Ray GPUs per replica (1 on GPU nodes)")
    g.add_argument("--serve-config", default=None, metavar="FILE",
                   help="deploy a Serve config file (import_path: hf_delta.serving.ray:app_builder) instead")


def parse_delta_specs(specs: list[str]) -> dict[str, tuple[str, str | None]]:
    """``["name=org/repo@rev", ...]`` → ``{name: (repo, revision)}``; raises ``EngineConfigError`` when malformed."""
    out: dict[str, tuple[str, str | None]] = {}
    for spec in specs:
        name, sep, repo = spec.partition("=")
        if not sep or not name or not repo:
            raise EngineConfigError(f"--delta expects NAME=REPO (e.g. math=org/math-delta), got {spec!r}.")
        if name in out:
            raise EngineConfigError(f"--delta name {name!r} is given twice.")
        revision = None
        if "@" in repo and not Path(repo).exists():
            repo, revision = repo.rsplit("@", 1)
        out[name] = (repo, revision)
    return out


def serve_main(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible server until interrupted."""
    if args.ray or args.serve_config:
        from .ray import serve_ray_main

        return serve_ray_main(args, config=_engine_config(args, max_model_len=args.max_model_len))
    if not args.base:
        raise EngineConfigError("hf-delta serve needs --base (a Hub id or folder).")
    import uvicorn

    from .engine import Engine
    from .server import create_app

    deltas = parse_delta_specs(args.delta)
    device, dtype = _device_dtype(args)
    engine = Engine(args.base, config=_engine_config(args, max_model_len=args.max_model_len), base_name=args.base_name,
                    device=device, dtype=dtype, local_files_only=args.local_files_only)
    for name, (repo, revision) in deltas.items():
        engine.register_delta(name, repo, revision=revision)
    logger.info("Serving %s on http://%s:%d/v1", engine.model_names(), args.host, args.port)
    app = create_app(engine, api_key=args.api_key, fine_tuning_dir=args.fine_tuning_dir)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    engine.close()
    return 0


# -------------------------------------------------------------------------------------------- bench serve
def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


def _floats(value: str) -> list[float]:
    return [float(v) for v in value.split(",") if v]


def _words(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-delta bench serve``."""
    parser.add_argument("--size", default="small", help="zoo size (micro or small)")
    parser.add_argument("--dir", default=None, help="zoo root (default $HF_DELTA_ZOO or ~/.cache/hf_delta/zoo)")
    parser.add_argument("--synthetic", default=None, choices=["llama-7b", "tiny"],
                        help="random weights of this shape instead of the zoo (for GPUs)")
    parser.add_argument("--deltas", type=_ints, default=[1, 4, 16, 64], help="numbers of served deltas")
    parser.add_argument("--popularity", type=_words, default=["uniform", "skewed"], help="uniform and/or skewed")
    parser.add_argument("--systems", type=_words, default=["engine", "naive", "merged", "peft"])
    parser.add_argument("--requests", type=int, default=128, help="requests per workload")
    parser.add_argument("--rate", type=_floats, default=[64.0, math.inf],
                        help="Poisson arrival rates, comma-separated (requests/s; inf = all at once)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="batch size limit of the baselines (default: the engine's --max-running)")
    parser.add_argument("--load-repeats", type=int, default=5, help="repetitions of the load-time measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for every system")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "hf_delta" / "bench-serve"),
                        help="where compressed/synthetic deltas are cached")
    _engine_arguments(parser, device_slots=16, cpu_slots=16)


def bench_serve_main(args: argparse.Namespace, *, command: str | None = None) -> int:
    """Run ``bench serve`` and print its Markdown table (``command`` is recorded with the results)."""
    import torch

    from .bench import BenchSettings
    from .benchmark import bench_serve

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(deltas=args.deltas, popularity=args.popularity, systems=args.systems,
                             requests=args.requests, rates=args.rate, max_tokens=args.max_tokens, seed=args.seed,
                             max_batch=args.max_batch or args.max_running, engine=_engine_config(args))
    print(bench_serve(size=args.size, zoo_dir=args.dir, synthetic=args.synthetic, settings=settings, out=args.out,
                      work_dir=args.work_dir, device=args.device, dtype=args.dtype, load_repeats=args.load_repeats,
                      command=command or " ".join(["hf-delta", *sys.argv[1:]])))
    return 0

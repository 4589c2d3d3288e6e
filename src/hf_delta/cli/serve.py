"""``hf-delta serve``: its flags (the engine's from ``EngineConfig``) and its entry points, in process or on Ray."""

from __future__ import annotations

import argparse
import logging
import os
import time

from ..errors import EngineConfigError
from ..serving.engine.config import add_engine_arguments, engine_config_from_args
from ..utils.specs import parse_delta_specs

logger = logging.getLogger(__name__)


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
    parser.add_argument("--max-body-bytes", type=int, default=None,
                        help="request bodies larger than this get HTTP 413 before they are read whole (default 16 MiB)")
    add_engine_arguments(parser)
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


def serve_main(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible server until interrupted."""
    if args.ray or args.serve_config:
        return serve_ray_main(args, config=engine_config_from_args(args, max_model_len=args.max_model_len))
    if not args.base:
        raise EngineConfigError("hf-delta serve needs --base (a Hub id or folder).")
    import uvicorn

    from ..serving.api.app import create_app
    from ..serving.api.limits import DEFAULT_MAX_BODY_BYTES
    from ..serving.engine.engine import Engine

    deltas = parse_delta_specs(args.delta)
    device, dtype = _device_dtype(args)
    config = engine_config_from_args(args, max_model_len=args.max_model_len)
    engine = Engine(args.base, config=config, base_name=args.base_name,
                    device=device, dtype=dtype, local_files_only=args.local_files_only)
    for name, (repo, revision) in deltas.items():
        engine.register_delta(name, repo, revision=revision)
    logger.info("Serving %s on http://%s:%d/v1", engine.model_names(), args.host, args.port)
    app = create_app(engine, api_key=args.api_key, fine_tuning_dir=args.fine_tuning_dir,
                     max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    engine.close()
    return 0


def serve_ray_main(args: argparse.Namespace, *, config) -> int:
    """``hf-delta serve --ray``: start (or join) Ray, deploy the application, serve until interrupted."""
    import ray
    from ray import serve

    from ..serving.ray import APP_NAME, build_app, start_ray

    if args.serve_config:
        from ray.serve.scripts import cli

        argv = ["run", str(args.serve_config), *(["--address", args.ray_address] if args.ray_address else [])]
        return cli.main(argv, standalone_mode=False) or 0
    if not args.base:
        raise EngineConfigError("hf-delta serve --ray needs --base (or a Serve config file with --serve-config).")
    deltas = parse_delta_specs(args.delta)
    start_ray(address=args.ray_address, num_cpus=args.ray_cpus, host=args.host, port=args.port)
    app = build_app(base=args.base, deltas=deltas, replicas=args.replicas, config=config, base_name=args.base_name,
                    api_key=args.api_key, device=args.device, dtype=args.dtype, replica_cpus=args.replica_cpus,
                    replica_gpus=args.replica_gpus, local_files_only=args.local_files_only,
                    **({"max_body_bytes": args.max_body_bytes} if args.max_body_bytes else {}))
    serve.run(app, name=APP_NAME, route_prefix="/")
    logger.warning("Serving %d deltas with %d replicas on http://%s:%d/v1 (Ctrl-C stops)", len(deltas),
                   args.replicas, args.host, args.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if args.ray_address:
            serve.delete(APP_NAME)  # leave the joined cluster (and its other applications) running
        else:
            serve.shutdown()
            ray.shutdown()
    return 0


def _serve(args: argparse.Namespace) -> int:
    return serve_main(args)


def register(sub) -> None:
    """Add ``serve`` to the ``hf-delta`` subcommands."""
    serve = sub.add_parser("serve", help="OpenAI-compatible server: one base, many deltas, continuous batching")
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

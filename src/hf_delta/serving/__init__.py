"""Serve one base model and many deltas: continuous-batching engine, residency tiers, OpenAI-compatible server.

The HTTP server needs the ``serving`` extra (``pip install 'hf_delta[serving]'``); its names are imported on
first use so the engine works without FastAPI.
"""

from __future__ import annotations

from typing import Any

from .cli import add_bench_serve_arguments, add_serve_arguments, bench_serve_main, serve_main
from .coserve import CoServeScheduler
from .engine import Engine, EngineConfig
from .finetune import FineTuneJob, Hyperparameters
from .handles import GenerationChunk, GenerationResult, RequestHandle
from .kv_cache import PagedKVCache
from .lora_trainer import CoServingTrainer
from .residency import ResidencyManager
from .sampling import SamplingParams
from .step import Segment, StepBatch, StepOutput, forward_step

__all__ = [
    "CoServeScheduler",
    "CoServingTrainer",
    "Engine",
    "EngineConfig",
    "FineTuneJob",
    "GenerationChunk",
    "GenerationResult",
    "Hyperparameters",
    "PagedKVCache",
    "RequestHandle",
    "ResidencyManager",
    "SamplingParams",
    "Segment",
    "ServerThread",
    "StepBatch",
    "StepOutput",
    "add_bench_serve_arguments",
    "add_serve_arguments",
    "bench_serve_main",
    "create_app",
    "forward_step",
    "serve_main",
]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "ServerThread"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

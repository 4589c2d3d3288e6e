"""Serve one base model and many deltas: continuous-batching engine, residency tiers, OpenAI-compatible server.

Four subpackages, each importing only from those below it: ``engine`` (the continuous-batching engine and
its defaults), ``training`` (LoRA fine-tuning co-served in the engine's steps), ``api`` (the FastAPI app)
and ``ray`` (the Ray Serve deployment). Names are imported on first use (huggingface_hub style), so
``import hf_delta.serving`` loads neither torch, the trainer nor FastAPI until one of them is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_LAZY = {
    "Engine": ".engine.engine",
    "EngineConfig": ".engine.config",
    "GenerationChunk": ".engine.handles",
    "GenerationResult": ".engine.handles",
    "RequestHandle": ".engine.handles",
    "PagedKVCache": ".engine.kv_cache",
    "ResidencyManager": ".engine.residency",
    "SamplingParams": ".engine.sampling",
    "Segment": ".engine.step",
    "StepBatch": ".engine.step",
    "StepOutput": ".engine.step",
    "forward_step": ".engine.step",
    "CoServeScheduler": ".training.budget",
    "FineTuneJob": ".training.jobs",
    "Hyperparameters": ".training.jobs",
    "CoServingTrainer": ".training.trainer",
    "ServerThread": ".api.app",
    "create_app": ".api.app",
}

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
    "create_app",
    "forward_step",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .api.app import ServerThread, create_app
    from .engine.config import EngineConfig
    from .engine.engine import Engine
    from .engine.handles import GenerationChunk, GenerationResult, RequestHandle
    from .engine.kv_cache import PagedKVCache
    from .engine.residency import ResidencyManager
    from .engine.sampling import SamplingParams
    from .engine.step import Segment, StepBatch, StepOutput, forward_step
    from .training.budget import CoServeScheduler
    from .training.jobs import FineTuneJob, Hyperparameters
    from .training.trainer import CoServingTrainer


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

"""The continuous-batching engine: its config (the one source of engine defaults), scheduler, packed step,
paged KV cache, delta residency tiers, sampling and request handles; ``hooks`` is the Protocol a co-serving
trainer implements, so the engine never imports training code. Names load on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...utils.lazy import lazy_exports

_LAZY = {
    "Engine": ".engine",
    "EngineConfig": ".config",
    "process_rss": ".config",
    "GenerationChunk": ".handles",
    "GenerationResult": ".handles",
    "RequestHandle": ".handles",
    "StepHook": ".hooks",
    "PagedKVCache": ".kv_cache",
    "ResidencyManager": ".residency",
    "SamplingParams": ".sampling",
    "Scheduler": ".scheduler",
    "Segment": ".step",
    "StepBatch": ".step",
    "StepOutput": ".step",
    "forward_step": ".step",
}

__all__ = [
    "Engine",
    "EngineConfig",
    "GenerationChunk",
    "GenerationResult",
    "PagedKVCache",
    "RequestHandle",
    "ResidencyManager",
    "SamplingParams",
    "Scheduler",
    "Segment",
    "StepBatch",
    "StepHook",
    "StepOutput",
    "forward_step",
    "process_rss",
]

if TYPE_CHECKING:  # pragma: no cover
    from .config import EngineConfig, process_rss
    from .engine import Engine
    from .handles import GenerationChunk, GenerationResult, RequestHandle
    from .hooks import StepHook
    from .kv_cache import PagedKVCache
    from .residency import ResidencyManager
    from .sampling import SamplingParams
    from .scheduler import Scheduler
    from .step import Segment, StepBatch, StepOutput, forward_step


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

"""``EngineConfig``: the sizes and limits of an engine, the one source of their defaults (the ``Scheduler``,
the ``ResidencyManager`` and the command line's engine flags take theirs from here); and the process RSS it
reports beside its own counts."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any

from ...errors import EngineConfigError


def _setting(default: Any, help: str, *, flag: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass
class EngineConfig:
    """Limits and sizes of an ``Engine`` (each field's ``help`` is also its command-line help).

    Args:
        device_slots: deltas attached to the model at once (their requests can run together).
        cpu_slots: further deltas kept in host memory, ready to attach.
        kv_cache_tokens: KV-cache budget in tokens over all running requests (allocated once).
        block_size: tokens per KV block.
        max_batch_tokens: tokens per forward pass (one per decoding request plus prefill chunks).
        max_running: requests in the running batch at once.
        max_model_len: longest prompt + completion (default: the model's ``max_position_embeddings``).
        fairness_steps: steps a request may be overtaken by younger ones before it blocks them.
        loader_threads: background threads loading deltas from disk.
        retry_failed_after: seconds before a delta that failed to load is tried again.
        cuda_graphs: replay decode steps as CUDA graphs, one per batch-size bucket (``DecodeGraphs``); only on
            CUDA, ignored elsewhere. A capture that fails falls back to eager steps with a warning.
    """

    device_slots: int = _setting(8, "deltas attached to the model at once")
    cpu_slots: int = _setting(8, "further deltas kept in CPU memory")
    kv_cache_tokens: int = _setting(16384, "KV-cache budget in tokens")
    block_size: int = _setting(16, "tokens per KV block")
    max_batch_tokens: int = _setting(512, "tokens per forward pass")
    max_running: int = _setting(256, "requests in the running batch")
    max_model_len: int | None = _setting(None, "longest prompt + completion", flag=False)
    fairness_steps: int = _setting(64, "steps a request may be overtaken before younger requests must wait for it")
    loader_threads: int = _setting(1, "background threads loading deltas from disk", flag=False)
    retry_failed_after: float = _setting(30.0, "seconds before a failed delta load is tried again", flag=False)
    cuda_graphs: bool = _setting(True, "replay decode steps as CUDA graphs (CUDA only)")

    def validate(self) -> None:
        if min(self.kv_cache_tokens, self.block_size, self.max_batch_tokens, self.max_running) < 1:
            raise EngineConfigError(f"Engine sizes must be positive: {self}.")
        if self.max_batch_tokens < self.max_running:
            raise EngineConfigError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_running "
                                    f"({self.max_running}) so that every running request decodes each step.")


def add_engine_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> argparse._ArgumentGroup:
    """Add an ``engine`` group with one ``--flag`` per ``EngineConfig`` field marked as a flag, then ``--device``
    and ``--dtype`` (where and how the base is loaded).

    Each flag's default and help come from the field; ``defaults`` overrides defaults by field name (a benchmark
    that records its own sizes). Returns the group.
    """
    unknown = set(defaults) - {f.name for f in fields(EngineConfig)}
    if unknown:
        raise ValueError(f"Not EngineConfig fields: {sorted(unknown)}.")
    group = parser.add_argument_group("engine")
    for f in fields(EngineConfig):
        if f.metadata.get("flag"):
            default = defaults.get(f.name, f.default)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(f.default, bool):  # --cuda-graphs / --no-cuda-graphs
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                   help=f.metadata["help"])
            else:
                group.add_argument(flag, type=type(f.default), default=default, help=f.metadata["help"])
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    return group


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The ``EngineConfig`` of parsed ``add_engine_arguments`` flags (plus ``overrides``, e.g. ``max_model_len``)."""
    values = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if f.metadata.get("flag")}
    return EngineConfig(**values, **overrides)


def process_rss() -> int | None:
    """Resident set size of this process in bytes (None where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None

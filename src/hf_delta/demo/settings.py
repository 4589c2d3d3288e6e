"""What the demo serves and how it is launched (``DemoSettings``), and those settings from environment variables.

Imports neither torch nor gradio (the ``hf-delta`` parser and ``launch`` both use it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.specs import DeltaSpec, parse_delta_specs

ENV_BASE = "HF_DELTA_DEMO_BASE"
ENV_DELTAS = "HF_DELTA_DEMO_DELTAS"
ENV_SIZE = "HF_DELTA_DEMO_SIZE"


@dataclass
class DemoSettings:
    """What the demo serves and how it is launched.

    Args:
        size: zoo size served when no ``base`` is given: ``"small"`` (default) or ``"micro"``.
        zoo_dir: zoo root (default ``$HF_DELTA_ZOO`` or ``~/.cache/hf_delta/zoo``).
        zoo_base: the zoo base whose fine-tunes are served (``"llama-base"`` or ``"qwen2-base"``).
        cache_dir: where the zoo's compressed deltas are cached (default ``$HF_DELTA_DEMO_CACHE`` or
            ``~/.cache/hf_delta/demo``).
        base: a real base model (Hub id or folder) instead of the zoo.
        deltas: ``{name: DeltaSpec(repo, revision)}`` served beside ``base`` (``NAME=REPO[@REVISION]``).
        max_tokens: most tokens per reply (greedy decoding, so replies are reproducible).
        host, port: where to serve (Gradio's defaults, or ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``).
        launch: start the web app (``False``: only prepare the models, e.g. to warm a cache).
    """

    size: str = "small"
    zoo_dir: Path | None = None
    zoo_base: str = "llama-base"
    cache_dir: Path | None = None
    base: str | None = None
    deltas: dict[str, DeltaSpec] = field(default_factory=dict)
    max_tokens: int = 64
    host: str | None = None
    port: int | None = None
    launch: bool = True


def settings_from_env(env: Mapping[str, str] | None = None) -> DemoSettings:
    """Settings from ``HF_DELTA_DEMO_BASE``, ``HF_DELTA_DEMO_DELTAS`` and ``HF_DELTA_DEMO_SIZE``."""
    env = os.environ if env is None else env
    settings = DemoSettings()
    if env.get(ENV_SIZE):
        settings.size = env[ENV_SIZE]
    if env.get(ENV_BASE):
        settings.base = env[ENV_BASE]
    settings.deltas = parse_delta_specs(env.get(ENV_DELTAS))
    return settings

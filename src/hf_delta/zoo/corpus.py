"""Pretraining text that every CPython install carries: standard-library sources and pydoc topics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# A fixed, version-stable selection keeps the corpus small and the build deterministic on one Python.
_MODULES = (
    "argparse", "collections", "dataclasses", "functools", "json", "logging", "pathlib", "random",
    "shutil", "statistics", "string", "textwrap", "typing", "fractions", "heapq", "bisect", "calendar",
    "csv", "difflib", "enum", "glob", "inspect", "ipaddress", "operator", "pprint", "queue", "sched",
    "shlex", "tempfile", "threading", "tokenize", "zipfile",
)


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return ""
    origin = Path(spec.origin)
    if origin.name == "__init__.py" or origin.suffix != ".py":
        files = sorted(origin.parent.glob("*.py")) if origin.suffix == ".py" else []
    else:
        files = [origin]
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def pydoc_topics() -> list[str]:
    """The help texts of ``pydoc`` (``help('topics')``), sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def stdlib_corpus(max_chars: int) -> str:
    """Return up to ``max_chars`` characters of interleaved pydoc topics and stdlib source code."""
    parts: list[str] = []
    topics = pydoc_topics()
    sources = [_module_source(m) for m in _MODULES]
    for i in range(max(len(topics), len(sources))):
        if i < len(topics):
            parts.append(topics[i])
        if i < len(sources) and sources[i]:
            parts.append(sources[i])
    return "\n\n".join(parts)[:max_chars]

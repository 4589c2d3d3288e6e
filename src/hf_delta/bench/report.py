"""The one writer of benchmark results: ``<name>.json`` + ``<name>.md`` (+ ``<name>.png``), recording the command.

Every benchmark (``hf-delta eval``/``bench ...`` and the scripts under ``benchmarks/``) writes through
``write_report``; ``write_results`` is its form for a plain table of rows with the run's environment.
Files are written atomically, so an interrupted run never leaves half a results file.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..evaluation import to_markdown
from ..utils.io import atomic_write_text

logger = logging.getLogger(__name__)


def environment() -> dict[str, str]:
    """Python, torch and machine of this run (recorded in each results file's ``meta``)."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()}


def _records_command(data: dict[str, Any], command: str) -> bool:
    return data.get("command") == command or data.get("meta", {}).get("command") == command


def write_report(out_dir: str | Path, name: str, *, command: str, data: dict[str, Any], markdown: str,
                 plot: Callable[[Path], None] | None = None, json_indent: int = 2, json_default: Any = None,
                 json_newline: bool = False) -> str:
    """Write ``<name>.json`` (``data``), ``<name>.md`` (``markdown``) and, with ``plot``, ``<name>.png``.

    Args:
        out_dir: the results folder (created if needed).
        name: the files' stem, e.g. ``serve-small``.
        command: the command line that produced the results; ``data`` must record it (as ``command`` or
            ``meta.command``); it is added to ``meta`` when it does not.
        data: the JSON document.
        markdown: the Markdown report.
        plot: called with ``<name>.png`` to draw the figure (skipped when matplotlib is missing).
        json_indent, json_default, json_newline: ``json.dumps`` options of this results file's format.

    Returns:
        ``markdown``.
    """
    out = Path(out_dir)
    if not _records_command(data, command):
        data = {**data, "meta": {"command": command, **data.get("meta", {})}}
    text = json.dumps(data, indent=json_indent, default=json_default) + ("\n" if json_newline else "")
    atomic_write_text(out / f"{name}.json", text)
    atomic_write_text(out / f"{name}.md", markdown)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            logger.warning("matplotlib is not installed: no plot (pip install 'hf_delta[bench]')")
            return markdown
        plot(out / f"{name}.png")
    return markdown


def write_results(rows: list[dict], out_dir: str | Path, *, name: str, command: str,
                  extra: dict[str, Any] | None = None, columns: Sequence[str] | None = None,
                  notes: str = "", plot: Callable[[Path], None] | None = None) -> str:
    """A table of ``rows``: ``<name>.json`` as ``{"meta": {command, environment, **extra}, "rows": rows}`` and
    ``<name>.md`` as the command, the table and ``notes``; returns the Markdown."""
    meta = {"command": command, **environment(), **(extra or {})}
    md = f"`{command}`\n\n" + to_markdown(rows, columns) + "\n" + notes
    return write_report(out_dir, name, command=command, data={"meta": meta, "rows": rows}, markdown=md, plot=plot)

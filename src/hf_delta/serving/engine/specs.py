"""The ``NAME=REPO[@REVISION]`` grammar of the deltas an engine serves (``hf-delta serve --delta``, Serve configs)."""

from __future__ import annotations

from pathlib import Path

from ...errors import EngineConfigError


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

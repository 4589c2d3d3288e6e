"""``NAME=REPO[@REVISION]``: how a delta to serve is named on command lines and in environment variables."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from ..errors import EngineConfigError


class DeltaSpec(NamedTuple):
    """Where a served delta comes from: a local folder or Hub repo id, and the Hub revision (if any)."""

    repo: str
    revision: str | None = None


def parse_delta_specs(specs: str | Iterable[str] | None) -> dict[str, DeltaSpec]:
    """``"name=repo[@rev],..."`` (or a list of such items) → ``{name: DeltaSpec(repo, revision)}``.

    ``@rev`` is split off a Hub id only: a local path that exists is kept whole, ``@`` included.

    Raises:
        EngineConfigError: an item is not ``NAME=REPO`` or a name repeats.

    >>> parse_delta_specs("math=org/math-delta@v2, chat=./chat-delta")
    {'math': DeltaSpec(repo='org/math-delta', revision='v2'), 'chat': DeltaSpec(repo='./chat-delta', revision=None)}
    """
    items = specs.split(",") if isinstance(specs, str) else list(specs or [])
    out: dict[str, DeltaSpec] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, repo = (p.strip() for p in item.partition("="))
        if not sep or not name or not repo:
            raise EngineConfigError(
                f"A delta must be given as NAME=REPO[@REVISION] (e.g. math=org/math-delta@main), got {item!r}."
            )
        if name in out:
            raise EngineConfigError(f"The delta name {name!r} is given twice ({out[name].repo} and {repo}).")
        revision = None
        if "@" in repo and not Path(repo).exists():
            repo, revision = repo.rsplit("@", 1)
        out[name] = DeltaSpec(repo, revision or None)
    return out

"""Steps of long loops: a tqdm bar for the terminal, and the same steps reported to a listener.

``progress_range`` replaces ``tqdm(range(n), ...)`` in loops whose progress someone else wants to show (the
demo's start page shows the zoo build and the compression while they run). A listener is set for the current
context with ``listen_progress``; without one, only the bar runs.

>>> seen = []
>>> with listen_progress(lambda desc, done, total: seen.append((desc, done, total))):
...     for _ in progress_range(2, desc="train", disable=True):
...         pass
>>> seen
[('train', 0, 2), ('train', 1, 2), ('train', 2, 2)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from tqdm.auto import tqdm

ProgressListener = Callable[[str, int, int], None]
"""Called with ``(desc, steps done, total steps)``: once with 0 before the first step, then after each step."""

_LISTENER: ContextVar[ProgressListener | None] = ContextVar("hf_delta_progress_listener", default=None)


@contextlib.contextmanager
def listen_progress(listener: ProgressListener | None) -> Iterator[None]:
    """Report every ``progress_range`` step run in this context (this thread) to ``listener``."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def progress_range(total: int, *, desc: str, **tqdm_kwargs: Any) -> Iterator[int]:
    """``range(total)`` behind a tqdm bar (``tqdm_kwargs`` go to it), each finished step told to the listener."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(desc, 0, total)
    for i in tqdm(range(total), desc=desc, **tqdm_kwargs):
        yield i
        if listener is not None:  # the loop body of step i has run
            listener(desc, i + 1, total)

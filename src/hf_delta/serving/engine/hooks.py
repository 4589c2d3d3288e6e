"""What a co-serving trainer implements so that the engine can pack its work into the steps.

The engine only knows these Protocols; ``hf_delta.serving.training.CoServingTrainer`` implements them, so the
engine never imports training code. Per step: ``plan`` after the inference tokens are scheduled (``None``: no
training work this step), the plan's ``segments``/``tokens`` packed after the requests' while ``capture`` is
active, then ``finish`` after the pass; ``forward_failed`` when the packed pass fails (the requests then run
again without the training tokens).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from .step import Segment


class StepWork(Protocol):
    """The training part of one engine step."""

    segments: list[Segment]  # forward segments packed after the inference tokens (they want no logits)
    tokens: list[list[int]]  # their token ids
    backward_layers: int  # decoder layers of backward run this step (counted as work)

    @property
    def num_tokens(self) -> int: ...

    def capture(self, offset: int) -> AbstractContextManager[None]:
        """While active, the training segments' layer inputs are saved (they start at ``offset`` of the pass)."""


@runtime_checkable
class StepHook(Protocol):
    """Adds work to the engine's steps (``Engine.attach_trainer``)."""

    def has_work(self) -> bool:
        """Whether work is running or queued (the engine keeps stepping while so, and plans only then)."""

    def plan(self, *, inference_tokens: int, idle: bool) -> StepWork | None:
        """The work of this step, given the scheduled inference tokens (``idle``: no request is waiting)."""

    def finish(self, work: StepWork) -> None:
        """Called after the packed pass that ran ``work``."""

    def forward_failed(self, work: StepWork, err: BaseException) -> None:
        """The packed pass with ``work``'s tokens failed."""



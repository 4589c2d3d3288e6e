"""The state of a co-served fine-tuning run between engine steps: its sequences (with each decoder layer's saved
input), the optimizer batch being trained, and the training part of one step; and a meter of what autograd saves."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.step import Segment, StepBatch
from .jobs import Example, FineTuneJob


@dataclass(eq=False)
class TrainingSeq:
    key: str
    example: Example
    saved: torch.Tensor  # [layers, tokens, hidden]: each decoder layer's input
    done: int = 0
    cached: bool = False

    @property
    def length(self) -> int:
        return len(self.example.inputs)


@dataclass(eq=False)
class TrainingBatch:
    seqs: list[TrainingSeq]
    packed: StepBatch  # every sequence whole, uncached: the layout of the backward recompute
    targets: torch.Tensor
    n_valid: int
    layer: int
    grad: torch.Tensor | None = None
    loss: float | None = None
    peak_layer_bytes: int = 0

    @property
    def forward_done(self) -> bool:
        return all(s.done == s.length for s in self.seqs)

    @property
    def tokens(self) -> int:
        return self.packed.num_tokens


@dataclass(eq=False)
class TrainingRun:
    job: FineTuneJob
    weights: dict[str, Any]
    optimizer: torch.optim.Optimizer
    slot: int
    lowest: int  # the lowest decoder layer holding a LoRA factor: the backward stops there
    batches: Iterator[list[Example]]
    fingerprint: dict[str, Any]
    batch: TrainingBatch | None = None
    started: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class TrainingStep:
    """The training part of one engine step: forward segments to pack after the inference tokens."""

    inference_tokens: int
    budget_s: float
    started: float
    layers: Sequence[torch.nn.Module]
    segments: list[Segment] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    seqs: list[TrainingSeq] = field(default_factory=list)
    backward_tokens: int = 0
    backward_layers: int = 0
    error: BaseException | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.segments)

    @contextlib.contextmanager
    def capture(self, offset: int) -> Iterator[None]:
        """While active, every decoder layer's input rows of this step's training tokens are copied into
        their sequences' saved inputs (the training tokens start at ``offset`` of the packed step)."""
        spans = []
        for seg, seq in zip(self.segments, self.seqs, strict=True):
            spans.append((seq, seg.start, seg.length, offset))
            offset += seg.length

        def hook(index: int):
            def save(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                tokens = hidden.reshape(-1, hidden.shape[-1])  # the packed step's [N, 1, hidden]: one token a row
                for seq, start, n, at in spans:
                    seq.saved[index, start : start + n].copy_(tokens[at : at + n])
            return save

        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class SavedTensorMeter:
    """Bytes of distinct tensors autograd saves for backward inside ``with meter:`` (parameters excluded)."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()):
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self.bytes = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._skip and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

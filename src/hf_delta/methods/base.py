"""The interface every compression method implements: ``CompressedWeight``, ``DeltaMethod`` and the
``CompressionContext`` a method compresses from."""

from __future__ import annotations

import abc
import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..calibration import Batch, sample_calibration, tokenize_calibration
from ..config import DeltaConfig
from ..errors import DeltaFormatError
from ..extract import ExtractedDelta
from ..utils.sizes import tensor_bytes

logger = logging.getLogger(__name__)


class CompressedWeight(abc.ABC):
    """One compressed delta matrix ``Δ`` of shape ``[out_features, in_features]``.

    Subclasses keep only their packed tensors, registered with ``register_buffer`` (so ``.to(device)``
    moves them and memory stays at the compressed size), and implement ``to_dense`` plus, where it pays, a
    faster ``apply``. Deliberately not an ``nn.Module``: a served model holds thousands of these, and a
    module's bookkeeping (a dozen dicts each) would outweigh a small delta's packed bits.
    """

    method: ClassVar[str] = ""
    # The setting that chose this weight when a delta mixes settings per matrix (``AutoConfig``); saved in the
    # repo's per-module metadata.
    setting: str | None = None

    def __init__(self, shape: tuple[int, int]):
        self.shape = (int(shape[0]), int(shape[1]))
        self._buffers: dict[str, torch.Tensor] = {}

    def register_buffer(self, name: str, tensor: torch.Tensor | None) -> None:
        """Register a tensor that is saved, moved by ``.to`` and counted by ``nbytes`` (``None`` = absent)."""
        if tensor is not None:
            self._buffers[name] = tensor

    def __getattr__(self, name: str) -> Any:
        buffers = self.__dict__.get("_buffers", {})
        if name in buffers:
            return buffers[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_buffers", {}):
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._buffers.items())

    def buffers(self) -> list[torch.Tensor]:
        return list(self._buffers.values())

    def _apply(self, fn) -> CompressedWeight:
        self._buffers = {k: fn(v) for k, v in self._buffers.items()}
        return self

    def to(self, *args: Any, **kwargs: Any) -> CompressedWeight:
        """Move/cast the buffers like ``Tensor.to`` (in place; returns self)."""
        return self._apply(lambda t: t.to(*args, **kwargs))

    def shallow_copy(self) -> CompressedWeight:
        """A new object sharing this one's tensors, whose tensors can be replaced without touching this one."""
        clone = copy.copy(self)
        clone._buffers = dict(self._buffers)
        return clone

    def moved_to(self, device: torch.device | str) -> CompressedWeight:
        """This weight with its buffers on ``device``: ``self`` when they are there already, else a copy
        (``self`` is left where it is)."""
        device = torch.device(device)
        if all(t.device == device for t in self._buffers.values()):
            return self
        clone = copy.copy(self)
        clone._buffers = {k: v.to(device) for k, v in self._buffers.items()}
        return clone

    @abc.abstractmethod
    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decompressed delta, ``[out_features, in_features]``."""

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decompressed rows ``Δ[index]`` (embedding lookups), without materialising the whole matrix."""
        return self.to_dense(dtype)[index]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Δᵀ`` for ``x`` of shape ``[..., in_features]``."""
        return x @ self.to_dense(x.dtype).T

    def add_to_rows(self, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None) -> None:
        """``out[rows] += x[rows] @ Δᵀ`` in place (every row when ``rows`` is None); kernels override this."""
        if rows is None:
            out += self.apply(x).to(out.dtype)
        else:
            out[rows] += self.apply(x[rows]).to(out.dtype)

    @classmethod
    def add_to_rows_many(cls, weights: list[CompressedWeight], x: torch.Tensor, out: torch.Tensor,
                         rows: list[torch.Tensor | None]) -> None:
        """``add_to_rows`` of several deltas of this kind (disjoint ``rows``); kinds that can batch override it."""
        for weight, r in zip(weights, rows, strict=True):
            weight.add_to_rows(x, out, r)

    def slot_format(self) -> tuple[Any, ...] | None:
        """What a layer's resident slot buffer groups this weight by, or ``None`` (the per-delta path).

        Weights of one type and equal format share a buffer holding every registered tensor as a row of a
        ``[slots, ...]`` tensor (``hf_delta.slots``); their mixed-batch product then reads that buffer
        directly (``add_to_rows_resident``) instead of stacking the deltas' tensors per call.
        """
        return None

    @classmethod
    def add_to_rows_resident(cls, resident: dict[str, torch.Tensor], index: list[int],
                             weights: list[CompressedWeight], x: torch.Tensor, out: torch.Tensor,
                             rows: list[torch.Tensor], slot_plan: Callable[[], tuple[torch.Tensor, Any]]) -> bool:
        """``add_to_rows_many`` for weights whose tensors are rows ``index`` of the resident buffer ``resident``.

        Semantics, for each ``d``: ``out[rows[d]] += x[rows[d]] @ Δ_dᵀ`` with ``Δ_d`` read from
        ``resident[...][index[d]]``. ``slot_plan()`` gives the forward pass's slot vector (the buffer slot of
        each row of ``x``, ``-1`` for rows of no delta here) and its kernel tile plan, built once per pass.
        Returns False when this call cannot use the buffer; the caller then takes ``add_to_rows_many``.
        """
        return False

    def meta(self) -> dict[str, Any]:
        """JSON-able facts needed to rebuild this object from its tensors (shape, layout options)."""
        return {"shape": list(self.shape)}

    def saved_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and meta as written to disk; a kind with a more compact disk encoding overrides this."""
        return dict(self.named_buffers()), self.meta()

    @classmethod
    @abc.abstractmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> CompressedWeight:
        """Rebuild from ``saved_tensors()`` (or ``dict(self.named_buffers())`` and ``self.meta()``)."""

    def nbytes(self) -> int:
        return tensor_bytes(self.buffers())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, bytes={self.nbytes()})"


@dataclass(frozen=True)
class DeltaMethod:
    """A registered method: its name, config class, weight class and compression function.

    ``compress(context) -> dict[module_name, CompressedWeight]`` gets everything it may need (the base and
    fine-tuned models, the extracted deltas, calibration batches) through a ``CompressionContext``.
    ``refine`` optionally improves the result once it runs as a model (BitDelta's scale distillation).

    A method that can compress one matrix at a time without calibration data also gives
    ``compress_matrix(delta, kind, config) -> CompressedWeight`` (``kind``: ``"linear"`` or ``"embedding"``)
    and ``data_free(config) -> bool`` (whether that setting needs nothing else): ``compress()`` then streams
    the two checkpoints tensor by tensor instead of loading both models.
    """

    name: str
    config_class: type[DeltaConfig]
    weight_classes: tuple[type[CompressedWeight], ...]
    compress: Any
    refine: Any = None
    compress_matrix: Any = None
    data_free: Any = None

    def streams(self, config: DeltaConfig) -> bool:
        """Whether ``config`` compresses matrix by matrix from the checkpoints alone."""
        return self.compress_matrix is not None and self.data_free is not None and bool(self.data_free(config))

    def weight_class(self, kind: str) -> type[CompressedWeight]:
        for cls in self.weight_classes:
            if cls.method == kind:
                return cls
        raise DeltaFormatError(f"Method {self.name!r} has no weight type {kind!r}.")


@dataclass
class CompressionContext:
    """Everything a method may need while compressing one fine-tune."""

    base: PreTrainedModel | None
    finetuned: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase | None
    extracted: ExtractedDelta
    config: DeltaConfig
    calibration_texts: Sequence[str] | None
    progress: bool = True
    teacher: Callable[[list[Batch]], Callable[[int], torch.Tensor]] | None = None
    _batches: list[Batch] | None = None

    def teacher_logits(self, batches: list[Batch]) -> Callable[[int], torch.Tensor]:
        """``f(i)``: the fine-tune's float32 logits on ``batches[i]`` (no gradient). The fine-tune's own forward
        when it is loaded; when compression streams, its outputs computed layer by layer beforehand."""
        if self.teacher is not None:
            return self.teacher(batches)
        model = self.finetuned.eval()

        @torch.no_grad()
        def logits(i: int) -> torch.Tensor:
            ids, mask = batches[i]
            return model(input_ids=ids, attention_mask=mask).logits.float()

        return logits

    def calibration(self, *, n: int = 64, seq_len: int = 128, batch_size: int = 8) -> list[Batch]:
        """Calibration batches: the user's texts, else ``n`` sequences sampled from the fine-tune."""
        if self._batches is None:
            if self.calibration_texts is not None:
                self._batches = tokenize_calibration(self.calibration_texts, self._need_tokenizer(),
                                                     seq_len=seq_len, batch_size=batch_size)
            else:
                logger.info("No calibration texts given: sampling %d sequences from the fine-tune", n)
                self._batches = sample_calibration(self.finetuned, self._need_tokenizer(), n=n,
                                                   seq_len=seq_len, batch_size=batch_size, seed=self.config.seed)
        return self._batches

    def _need_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError("This method needs calibration text, hence a tokenizer: pass tokenizer=... or load "
                             "the fine-tune from a folder/Hub id that has one.")
        return self.tokenizer

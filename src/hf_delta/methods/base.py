"""The interface every compression method implements, and the one registry that holds them."""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import DeltaConfigError, DeltaFormatError

if TYPE_CHECKING:
    from ..config import DeltaConfig


class CompressedWeight(abc.ABC):
    """One compressed delta matrix ``Δ`` of shape ``[out_features, in_features]``.

    Subclasses keep only their packed tensors, registered with ``register_buffer`` (so ``.to(device)``
    moves them and memory stays at the compressed size), and implement ``to_dense`` plus, where it pays, a
    faster ``apply``. Deliberately not an ``nn.Module``: a served model holds thousands of these, and a
    module's bookkeeping (a dozen dicts each) would outweigh a small delta's packed bits.
    """

    method: ClassVar[str] = ""

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
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, bytes={self.nbytes()})"


@dataclass(frozen=True)
class DeltaMethod:
    """A registered method: its name, config class, weight class and compression function.

    ``compress(context) -> dict[module_name, CompressedWeight]`` gets everything it may need (the base and
    fine-tuned models, the extracted deltas, calibration batches) through a ``CompressionContext``.
    ``refine`` optionally improves the result once it runs as a model (BitDelta's scale distillation).
    """

    name: str
    config_class: type[DeltaConfig]
    weight_classes: tuple[type[CompressedWeight], ...]
    compress: Any
    refine: Any = None

    def weight_class(self, kind: str) -> type[CompressedWeight]:
        for cls in self.weight_classes:
            if cls.method == kind:
                return cls
        raise DeltaFormatError(f"Method {self.name!r} has no weight type {kind!r}.")


_REGISTRY: dict[str, DeltaMethod] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_delta_method(method: DeltaMethod) -> DeltaMethod:
    """Add ``method`` to the registry; names are lowercase identifiers and may not be registered twice."""
    if not _NAME.match(method.name):
        raise DeltaConfigError(f"Method name {method.name!r} must be a lowercase identifier like 'bitdelta'.")
    if method.name in _REGISTRY:
        raise DeltaConfigError(f"A delta method named {method.name!r} is already registered.")
    method.config_class.method = method.name
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> DeltaMethod:
    """The registered method ``name``; the error lists the known ones."""
    if name not in _REGISTRY:
        raise DeltaFormatError(
            f"Unknown delta method {name!r}; this hf_delta knows {sorted(_REGISTRY)}. A newer hf_delta may "
            "know it: pip install -U hf_delta."
        )
    return _REGISTRY[name]


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


def weight_class_for(kind: str) -> type[CompressedWeight]:
    """Find the weight class named ``kind`` across all methods (a delta may mix kinds)."""
    for method in _REGISTRY.values():
        for cls in method.weight_classes:
            if cls.method == kind:
                return cls
    raise DeltaFormatError(f"Unknown compressed weight type {kind!r}; upgrade hf_delta to read this delta.")

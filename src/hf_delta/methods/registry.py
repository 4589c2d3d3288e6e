"""The one registry of compression methods (a leaf: it imports no method, methods import it)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import DeltaConfigError, DeltaFormatError

if TYPE_CHECKING:
    from .base import CompressedWeight, DeltaMethod

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

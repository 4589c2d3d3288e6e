"""Compression methods. Importing this package registers every built-in method."""

from .auto import AutoConfig
from .base import CompressedWeight, CompressionContext, DeltaMethod
from .bitdelta import BitDeltaConfig, BitDeltaWeight
from .deltazip import DeltaZipConfig, DeltaZipWeight
from .lowrank import LowRankConfig, LowRankWeight
from .mixed_svd import MixedSVDConfig, MixedSVDWeight
from .registry import get_method, register_delta_method, registered_methods, weight_class_for

__all__ = [
    "AutoConfig",
    "BitDeltaConfig",
    "BitDeltaWeight",
    "CompressedWeight",
    "CompressionContext",
    "DeltaMethod",
    "DeltaZipConfig",
    "DeltaZipWeight",
    "LowRankConfig",
    "LowRankWeight",
    "MixedSVDConfig",
    "MixedSVDWeight",
    "get_method",
    "register_delta_method",
    "registered_methods",
    "weight_class_for",
]


def __getattr__(name: str):
    from .._deprecated import moved_attribute

    return moved_attribute(__name__, name)

"""Compression methods. Importing this package registers every built-in method."""

from .base import (
    CompressedWeight,
    DeltaMethod,
    get_method,
    register_delta_method,
    registered_methods,
    weight_class_for,
)
from .bitdelta import BitDeltaConfig, BitDeltaWeight
from .deltazip import DeltaZipConfig, DeltaZipWeight
from .lowrank import LowRankConfig, LowRankWeight, export_peft_lora

__all__ = [
    "BitDeltaConfig",
    "BitDeltaWeight",
    "CompressedWeight",
    "DeltaMethod",
    "DeltaZipConfig",
    "DeltaZipWeight",
    "LowRankConfig",
    "LowRankWeight",
    "export_peft_lora",
    "get_method",
    "register_delta_method",
    "registered_methods",
    "weight_class_for",
]

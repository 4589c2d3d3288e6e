"""Triton kernels, each beside a pure-PyTorch reference of the same maths (importable without triton)."""

from ._decode import DecodeConfig
from ._tuning import chosen_configs, warmup
from .bitdelta import (
    BitDeltaKernelConfig,
    BitDeltaPlan,
    bitdelta_matmul,
    bitdelta_matmul_reference,
    plan_bitdelta_batch,
)
from .deltazip import (
    DeltaZipKernelConfig,
    deltazip_kernel_supports,
    deltazip_matmul,
    deltazip_matmul_reference,
)

__all__ = [
    "BitDeltaKernelConfig",
    "BitDeltaPlan",
    "DecodeConfig",
    "DeltaZipKernelConfig",
    "bitdelta_matmul",
    "bitdelta_matmul_reference",
    "chosen_configs",
    "deltazip_kernel_supports",
    "deltazip_matmul",
    "deltazip_matmul_reference",
    "plan_bitdelta_batch",
    "warmup",
]

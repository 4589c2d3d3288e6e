"""Triton kernels, each beside a pure-PyTorch reference of the same maths (importable without triton)."""

from .bitdelta import (
    BitDeltaKernelConfig,
    BitDeltaPlan,
    bitdelta_matmul,
    bitdelta_matmul_reference,
    plan_bitdelta_batch,
)

__all__ = [
    "BitDeltaKernelConfig",
    "BitDeltaPlan",
    "bitdelta_matmul",
    "bitdelta_matmul_reference",
    "plan_bitdelta_batch",
]

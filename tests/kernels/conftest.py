"""Kernel-test setup: run Triton kernels in the interpreter on machines without a GPU.

Sections (give new fixtures a section of their own):

* Triton interpreter switch (module import time, before any kernel is compiled).
"""

from __future__ import annotations

import os

import torch

# ===================================================================================================
# Triton interpreter switch
# ===================================================================================================

# Without a GPU the kernels can still be checked: TRITON_INTERPRET=1 runs them in numpy on CPU tensors.
# With a GPU leave it unset so the compiled kernel is what gets tested (benchmarks/gpu_check.sh).
# hf_delta.kernels decorates its kernels on first launch, so setting this here is early enough even if the
# module was imported before this conftest.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

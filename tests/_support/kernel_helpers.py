"""What the kernel tests share: tolerances, where Triton runs, slot patterns, result checks, bare-package loads.

Each kernel's test file keeps its own case builder and fp64 oracle (they are what differ between formats);
this module holds the rest, so a new kernel's tests start from the same checks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

import hf_delta.kernels._common as common

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # a bare GPU box may lack the dev extras: the deterministic tests must still run there
    given = settings = st = None

__all__ = [
    "DECODE_TILES",
    "DTYPES",
    "KERNELS_DIR",
    "SLOT_MODES",
    "SMALL_TILES",
    "TOLERANCES",
    "TRITON_DEVICES",
    "Batch",
    "assert_bad_input_raises",
    "assert_rejects_backend_plan_and_config",
    "assert_triton_needs_interpreter",
    "bad_input_call",
    "batch_bad_inputs",
    "check_result",
    "compile_for_h100",
    "given",
    "kernels_without_triton",
    "make_slots",
    "rel_err",
    "settings",
    "st",
]

# dtype -> max relative error (max-abs error / max-abs of the oracle) vs. fp64 and vs. the reference.
# fp16/bf16 outputs are rounded once; a different fp32 summation order may flip that rounding by one ulp,
# and the interpreter's fp32 -> bf16 cast truncates where GPUs round to nearest (up to 2**-7 relative).
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}
DTYPES = list(TOLERANCES)
SLOT_MODES = ("random", "one_delta", "no_delta", "gaps")
KERNELS_DIR = Path(common.__file__).parent
# Interpreter cost grows with tile area, so the tiles the kernel tests pass stay small.
SMALL_TILES = [
    {"block_m": 16, "block_n": 16, "block_k": 16, "num_warps": 1, "num_stages": 1},
    {"block_m": 16, "block_n": 16, "block_k": 32, "num_warps": 1, "num_stages": 1},
    {"block_m": 16, "block_n": 32, "block_k": 64, "num_warps": 2, "num_stages": 2},
]

# Split-K decode kernel (DecodeConfig): one split (direct add into out), three splits with two rows per
# group, and the automatic split (2 in the interpreter) with four rows per group.
DECODE_TILES = [
    {"block_r": 1, "block_n": 16, "block_k": 32, "split_k": 1, "num_warps": 1, "num_stages": 1},
    {"block_r": 2, "block_n": 16, "block_k": 32, "split_k": 3, "num_warps": 1, "num_stages": 1},
    {"block_r": 4, "block_n": 32, "block_k": 64, "split_k": None, "num_warps": 2, "num_stages": 2},
]


def _triton_devices() -> list[str]:
    """Devices on which the Triton path can run in this process."""
    if common.triton is None:
        return []
    if common.interpret_enabled():
        return ["cpu"]
    return ["cuda"] if torch.cuda.is_available() else []


TRITON_DEVICES = _triton_devices()


# ===================================================================================================
# Cases and checks
# ===================================================================================================


@dataclass
class Batch:
    """The batch side of a test case; each kernel's ``Case`` adds its packed deltas."""

    x: torch.Tensor
    out: torch.Tensor
    slots: torch.Tensor


def make_slots(slot_mode: str, m: int, d: int, g: torch.Generator) -> torch.Tensor:
    """int64 ``[m]`` delta indices in ``[-1, d)`` following one of :data:`SLOT_MODES`."""
    if slot_mode == "random":
        return torch.randint(-1, d, (m,), generator=g)
    if slot_mode == "one_delta":
        return torch.full((m,), d - 1)
    if slot_mode == "no_delta":
        return torch.full((m,), -1)
    if slot_mode == "gaps":  # deltas 0 .. d-2 get no rows: empty segments between used ones
        return torch.where(torch.rand(m, generator=g) < 0.3, -1, d - 1)
    raise AssertionError(slot_mode)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.numel() == 0:
        return 0.0
    got, want = got.cpu().double(), want.cpu().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def check_result(
    got: torch.Tensor,
    out: torch.Tensor,
    slots: torch.Tensor,
    oracle: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    max_seen: dict[torch.dtype, float] | None = None,
) -> None:
    """``got`` (the op's result from ``out``) against the fp64 ``oracle`` and the ``reference``; rows with
    slot -1 must come back bit for bit. ``max_seen`` records the largest error vs fp64 per dtype."""
    tol_fp64, tol_ref = TOLERANCES[out.dtype]
    assert got.dtype == out.dtype and got.shape == out.shape
    err = rel_err(got, oracle)
    if max_seen is not None:
        max_seen[out.dtype] = max(max_seen.get(out.dtype, 0.0), err)
    assert err <= tol_fp64, f"relative error vs fp64 {err:.2e}"
    if reference is not None:
        assert rel_err(got, reference) <= tol_ref
    untouched = slots < 0  # base-model rows must come back bit for bit
    assert torch.equal(got[untouched], out[untouched])


def bad_input_call(fn: str, op: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor]) -> Callable:
    """What a bad-input test calls for ``fn``: ``"reference"``, ``"triton"`` (the op forced onto the kernel;
    skips the test where the interpreter cannot run it) or ``"auto"`` (the op as users call it)."""
    if fn == "reference":
        return reference
    if fn == "triton":
        if "cpu" not in TRITON_DEVICES:
            pytest.skip("needs the Triton interpreter on CPU tensors")
        return lambda **kw: op(**kw, backend="triton")
    return op


# ===================================================================================================
# kernels/ loaded as a bare package: without triton, and for the ahead-of-time compile
# ===================================================================================================


@contextmanager
def kernels_without_triton(monkeypatch: pytest.MonkeyPatch, name: str) -> Iterator[ModuleType]:
    """``kernels/`` imported afresh as package ``name`` while triton cannot be imported (a CPU-only install)."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    init = KERNELS_DIR / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(KERNELS_DIR)])
    package = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, package)  # dataclasses look their module up while defining
    try:
        spec.loader.exec_module(package)  # imports the submodules under this package name too
        yield package
    finally:
        for sub in [key for key in sys.modules if key.startswith(f"{name}.")]:
            sys.modules.pop(sub, None)


# Runs in a fresh interpreter: once triton is imported with TRITON_INTERPRET=1 its own library functions are
# interpreter objects and the real compiler refuses them. A test appends the loop over its cases.
_AOT_PREAMBLE = """
import importlib.util, inspect, json, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

# kernels/ as a bare package: importing the hf_delta package would pull in transformers for nothing.
folder = sys.argv[2]
spec = importlib.util.spec_from_file_location("_kernels_aot", folder + "/__init__.py",
                                              submodule_search_locations=[folder])
package = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = package
spec.loader.exec_module(package)

if "constexprs" not in inspect.signature(ASTSource).parameters or "nvidia" not in triton.backends.backends:
    print("SKIP: this triton has another ahead-of-time compile API or no NVIDIA backend")
    sys.exit(0)

def compile_sm90(fn, pointers, constexprs, num_warps, num_stages):
    # pointers: element type of each *_ptr argument not int32; every other runtime argument is an int32.
    kernel = JITFunction(fn)
    signature = {
        name: "constexpr" if name in constexprs
        else "*" + pointers.get(name, "i32") if name.endswith("_ptr")
        else "i32"
        for name in kernel.arg_names
    }
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    return compiled.asm["cubin"]

cases = json.loads(sys.argv[1])
"""


def compile_for_h100(loop: str, cases: list) -> None:
    """Run ``loop`` (Python over ``cases``, with ``package`` = kernels/ and ``compile_sm90``) in a fresh
    interpreter without TRITON_INTERPRET; it must print OK. Skips where triton cannot compile ahead of time."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", _AOT_PREAMBLE + loop, json.dumps(cases), str(KERNELS_DIR)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def assert_bad_input_raises(call: Callable, valid: dict[str, object], change: Callable, exc: type, match: str) -> None:
    """``call(**change(valid))`` raises ``exc`` with a message matching ``match`` (a ``BAD_INPUTS`` row)."""
    args = change(valid)
    with pytest.raises(exc, match=match):
        call(**args)


def batch_bad_inputs(op: str, weight: str) -> dict[str, tuple[Callable, type, str]]:
    """The ``BAD_INPUTS`` rows every kernel shares (name: change to the valid arguments, exception, message
    fragment): bad ``x`` / ``out`` / ``slots``, slots out of range, the packed ``weight`` on another device.
    The valid arguments have M=5 rows and D=2 deltas."""
    return {
        "x_not_tensor": (lambda a: {**a, "x": a["x"].tolist()}, TypeError, "torch.Tensor"),
        "x_int": (lambda a: {**a, "x": a["x"].long()}, TypeError, "x must be float16"),
        "out_dtype": (lambda a: {**a, "out": a["out"].half()}, TypeError, "out dtype"),
        "slots_float": (lambda a: {**a, "slots": a["slots"].float()}, TypeError, "slots must be int32"),
        "x_1d": (lambda a: {**a, "x": a["x"][0]}, ValueError, "2-D"),
        "out_rows": (lambda a: {**a, "out": a["out"][:4]}, ValueError, "out must be"),
        "slots_len": (lambda a: {**a, "slots": a["slots"][:4]}, ValueError, "slots must be"),
        "slot_too_big": (lambda a: {**a, "slots": torch.tensor([0, 1, 2, -1, 0])}, ValueError, rf"{op}: .*\[-1, 2"),
        "slot_below_minus_1": (lambda a: {**a, "slots": torch.tensor([0, -2, 1, 1, 0])}, ValueError, r"\[-1, 2"),
        "x_not_contiguous": (
            lambda a: {**a, "x": torch.cat([a["x"], a["x"]], 1)[:, ::2]},
            ValueError,
            "contiguous",
        ),
        "device_mismatch": (lambda a: {**a, weight: a[weight].to("meta")}, ValueError, "one device"),
    }


def assert_rejects_backend_plan_and_config(op: Callable, valid: dict[str, object], config_cls: type) -> None:
    """An unknown backend, a plan built for another batch and non-power-of-two or too small tiles all raise."""
    with pytest.raises(ValueError, match="backend must be"):
        op(**valid, backend="cuda")
    with pytest.raises(ValueError, match="plan was built"):
        op(**valid, plan=common.plan_bitdelta_batch(valid["slots"][:4], 2))
    with pytest.raises(ValueError, match="power of two"):
        config_cls(block_n=24)
    with pytest.raises(ValueError, match=">= 16"):
        config_cls(block_k=8)


def assert_triton_needs_interpreter(monkeypatch: pytest.MonkeyPatch, call: Callable[[], object]) -> None:
    """``backend="triton"`` on CPU tensors without TRITON_INTERPRET=1 is refused, with that hint."""
    if common.triton is None:
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        call()

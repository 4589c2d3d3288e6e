"""A cheap identity check for base models: parameter names and shapes plus a fixed sample of values.

Values are compared with a tolerance, so the same base loaded in fp32, bf16 or fp16 still matches, while a
different checkpoint of the same architecture does not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .errors import BaseModelMismatchError

_SAMPLES_PER_TENSOR = 4
_MAX_TENSORS = 64
# Twice bf16's unit roundoff (2^-8): a base saved or loaded in bf16/fp16 still matches its fp32 fingerprint,
# while a checkpoint whose weights moved by 1% (further training, another seed) does not.
_RTOL = 8e-3
# An absolute floor for tiny values (OPT's k_proj biases are ~1e-5), where a relative tolerance alone is
# stricter than the storage: older fingerprints kept 6 decimals (an error up to 5e-7), and fp16 keeps
# values under 6e-5 with an absolute spacing of 6e-8. Samples are now recorded at full float32 precision, so
# the same base in the same dtype matches exactly.
_ATOL_FLOOR = 1e-6


# A model, or its state dict (a DeltaModel's base under its unwrapped parameter names).
Weights = torch.nn.Module | Mapping[str, torch.Tensor]


def _state(weights: Weights) -> Mapping[str, torch.Tensor]:
    return weights.state_dict() if isinstance(weights, torch.nn.Module) else weights


def _named_tensors(weights: Weights) -> list[tuple[str, torch.Tensor]]:
    return sorted((n, p) for n, p in _state(weights).items() if p.is_floating_point())


def _positions(flat: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` evenly spread positions in ``flat``, on its device."""
    # float32 positions round past the end of tensors over 2**24 values (a 7B model's embedding): clamp.
    idx = torch.linspace(0, flat.numel() - 1, k).long().clamp_(max=flat.numel() - 1)
    return idx.to(flat.device)


def base_fingerprint(model: Weights, *, read: Callable[[str], torch.Tensor] | None = None) -> dict[str, Any]:
    """Fingerprint of ``model`` (or a state dict): a hash of names and shapes, and a few values from evenly
    spread tensors.

    ``read(name)`` supplies a tensor's values when ``model`` holds shapes only (a model on the meta device
    while a checkpoint is streamed): the result is the same as for the loaded model.
    """
    tensors = _named_tensors(model)
    layout = hashlib.sha256("\n".join(f"{n}:{tuple(p.shape)}" for n, p in tensors).encode()).hexdigest()
    step = max(1, len(tensors) // _MAX_TENSORS)
    samples = []
    for name, p in tensors[::step][:_MAX_TENSORS]:
        flat = (p if read is None else read(name)).detach().reshape(-1)
        # Full float32 values (JSON keeps a double exactly): rounding would turn tiny values into mismatches.
        samples.append([name, flat[_positions(flat, _SAMPLES_PER_TENSOR)].float().cpu().tolist()])
    return {"layout": layout, "samples": samples}


def fingerprint_mismatch(expected: dict[str, Any], model: Weights) -> str | None:
    """Why ``model`` does not match ``expected`` (a short reason), or ``None`` when it does."""
    actual = base_fingerprint(model)
    if expected.get("layout") != actual["layout"]:
        return "its parameter names or shapes differ"
    state = _state(model)
    for name, values in expected.get("samples", []):
        flat = state[name].detach().reshape(-1)
        got = flat[_positions(flat, len(values))].float().cpu()  # only the sampled values leave the device
        ref = torch.tensor(values)
        atol = max(1e-3 * ref.abs().max().item(), _ATOL_FLOOR)
        if not torch.allclose(got, ref, rtol=_RTOL, atol=atol, equal_nan=True):
            return f"its weights differ (first at {name})"
    return None


def check_base(expected: dict[str, Any] | None, model: Weights, *, delta: str,
               base_name: str | None, ignore_mismatch: bool = False) -> None:
    """Raise ``BaseModelMismatchError`` if the delta was made against another base (unless overridden)."""
    if not expected or ignore_mismatch:
        return
    reason = fingerprint_mismatch(expected, model)
    if reason:
        raise BaseModelMismatchError(
            f"Delta {delta!r} was compressed against base {base_name!r}, but the model it is being applied "
            f"to does not match that base: {reason}. Load the right base, or pass "
            "ignore_base_mismatch=True if you are sure (the outputs will be wrong otherwise)."
        )

"""Delta-aware layers: the batched mixed-batch paths against a per-delta reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hf_delta.layers import DeltaLinear, DeltaOverride, DeltaParts, DeltaRouting
from hf_delta.methods.bitdelta import BitDeltaWeight


def _routing(slots: list[int], names: list[str]) -> DeltaRouting:
    routing = DeltaRouting()
    for name in names:
        routing.add(name)
    routing.row_slots = torch.tensor(slots)
    return routing


@settings(max_examples=25, deadline=None)
@given(n_deltas=st.integers(2, 5), rows=st.integers(1, 48), out=st.integers(1, 40), k=st.integers(1, 40),
       per_row=st.booleans(), popular=st.sampled_from([1.0, 20.0]), reverse=st.booleans(),
       seed=st.integers(0, 2**16))
def test_bitdelta_batched_rows_equal_one_delta_at_a_time(n_deltas, rows, out, k, per_row, popular, reverse, seed):
    """The CPU serving path: deltas resident in the layer's slot buffer, one batched matmul over their rows
    (read as a view of consecutive slots, or gathered when attached in reverse order)."""
    gen = torch.Generator().manual_seed(seed)
    weights = [BitDeltaWeight.from_delta(torch.randn(out, k, generator=gen), per_row=per_row)
               for _ in range(n_deltas)]
    dense = [w.to_dense() for w in weights]  # before attaching: the reference does not read the buffer
    x = torch.randn(rows, k, generator=gen)
    # slot -1 (base) and deltas 0..n-1; a popular delta 0 gets many rows and runs alone, the rest batched
    odds = torch.tensor([1.0, popular] + [1.0] * (n_deltas - 1))
    slot = torch.multinomial(odds, rows, replacement=True, generator=gen) - 1
    routing = _routing(slot.tolist(), [f"d{d}" for d in range(n_deltas)])
    layer = DeltaLinear(nn.Linear(k, out), routing)
    for d in reversed(range(n_deltas)) if reverse else range(n_deltas):
        layer.attach(f"d{d}", DeltaParts(weight=weights[d]), d)
    assert layer.resident_buffer("d0") is layer.resident_buffer(f"d{n_deltas - 1}") is not None
    with torch.no_grad():
        got = layer(x)
        expected = layer.base_layer(x)
    for d in range(n_deltas):  # independent reference: the dense decompressed delta, row by row
        r = (slot == d).nonzero().squeeze(1)
        expected[r] += x[r] @ dense[d].T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _OnePlusWeightNorm(nn.Module):
    """Gemma-style norm: ``(1 + weight) * f(x)``, not linear in ``weight`` alone."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("module", [nn.RMSNorm(8), _OnePlusWeightNorm(8), nn.LayerNorm(8)])
def test_norm_override_in_a_mixed_batch_equals_per_row_functional_call(module):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.weight.copy_(torch.randn(8, generator=gen))
        if getattr(module, "bias", None) is not None:  # weight * f(x) + bias: not a pure scaling by weight
            module.bias.copy_(torch.randn(8, generator=gen))
    slots = [0, -1, 1, 0, 2, -1]
    routing = _routing(slots, ["a", "b", "c"])
    wrapper = DeltaOverride(module, routing)
    replaced = {name: torch.randn(8, generator=gen) for name in "abc"}
    for name, weight in replaced.items():
        wrapper.deltas[name] = DeltaParts(exact={"weight": weight})
    x = torch.randn(len(slots), 8, generator=gen)
    got = wrapper(x)
    for i, slot in enumerate(slots):
        params = {} if slot == -1 else {"weight": replaced["abc"[slot]]}
        expected = torch.func.functional_call(module, params, (x[i : i + 1],))
        torch.testing.assert_close(got[i : i + 1], expected, rtol=0, atol=0)
    assert wrapper.__dict__["_weight_scaled"] is isinstance(module, nn.RMSNorm)


def test_routes_are_recomputed_when_the_row_slots_change():
    routing = _routing([0, 1, 0], ["a", "b"])
    first = routing.routes(torch.Size([3]), torch.device("cpu"))
    assert [(n, r.tolist()) for n, r in first] == [("a", [0, 2]), ("b", [1])]
    assert routing.routes(torch.Size([3]), torch.device("cpu")) is first  # one plan per forward pass
    routing.row_slots = torch.tensor([1, 1, -1])
    assert [(n, r.tolist()) for n, r in routing.routes(torch.Size([3]), torch.device("cpu"))] == [("b", [0, 1])]
    routing.row_slots = torch.tensor([1, 1, 1])
    assert routing.routes(torch.Size([3]), torch.device("cpu")) == [("b", None)]  # every row: no indexing

"""Mixed-precision SVD deltas: quantiser and packing round trips, the bit allocation against brute force, the
reconstruction against a plain truncated SVD, and a saved delta through every serving path."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from delta_checks import check_delta_serves
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_delta import MixedSVDConfig, compress
from hf_delta.errors import DeltaConfigError
from hf_delta.methods import BitDeltaConfig, BitDeltaWeight, MixedSVDWeight
from hf_delta.methods.mixed_svd import allocate_bits, compress_mixed_svd_matrix, fill_budget, quantize_rows


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 37), bits=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 99))
def test_quantised_factors_round_trip_through_packing(rows, cols, bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 10 ** torch.empty(rows, 1).uniform_(-3, 1, generator=g)
    q, s = quantize_rows(w, bits)
    assert int(q.min()) >= -(1 << (bits - 1)) and int(q.max()) <= (1 << (bits - 1)) - 1
    # The chosen scale is at least as good as plain max scaling (one of the candidates it searched).
    hi = (1 << (bits - 1)) - 1
    plain_s = (w.abs().amax(1, keepdim=True) / hi).half().float()
    plain = ((w / plain_s).round().clamp(-hi - 1, hi) * plain_s - w).pow(2).sum(1)
    assert bool(((q.float() * s.float().unsqueeze(1) - w).pow(2).sum(1) <= plain * (1 + 1e-5) + 1e-30).all())
    # A weight of two bands packs and unpacks to exactly the same matrix.
    uq, us = quantize_rows(torch.randn(rows, cols + 3, generator=g), bits)
    low = (2, q.clamp(-2, 1), s, uq.clamp(-2, 1), us)
    weight = MixedSVDWeight.from_factors((cols + 3, cols), [(bits, q, s, uq, us), low])
    expected = (uq.float() * us.float().unsqueeze(1)).T @ (q.float() * s.float().unsqueeze(1)) + (
        uq.clamp(-2, 1).float() * us.float().unsqueeze(1)
    ).T @ (q.clamp(-2, 1).float() * s.float().unsqueeze(1))
    torch.testing.assert_close(weight.to_dense(), expected, rtol=1e-5, atol=1e-6)
    again = MixedSVDWeight.from_tensors(*weight.saved_tensors())
    assert torch.equal(again.to_dense(), weight.to_dense())
    assert weight.nbytes() == 2 * rows * (math.ceil(cols * bits / 8) + math.ceil((cols + 3) * bits / 8) + 4) - rows * (
        math.ceil(cols * bits / 8) + math.ceil((cols + 3) * bits / 8)
    ) + rows * (math.ceil(cols * 2 / 8) + math.ceil((cols + 3) * 2 / 8))


def test_allocation_is_optimal_for_what_it_spends():
    """Against every assignment of widths to 5 triples: nothing within the spent bits has a lower error."""
    g = torch.Generator().manual_seed(0)
    s = torch.sort(torch.rand(5, generator=g) * 3, descending=True).values
    errors = {b: torch.rand(5, generator=g) * 4.0**-b for b in (2, 4, 8)}
    cost = {0: 0, 2: 2 * 10 + 32, 4: 4 * 10 + 32, 8: 8 * 10 + 32}
    for budget in (60, 150, 300, 500, 900):
        chosen = allocate_bits(s, errors, 10, budget).tolist()
        spent = sum(cost[b] for b in chosen)
        assert spent <= budget

        def err(assign):
            return sum(float(s[i]) ** 2 * (1.0 if b == 0 else float(errors[b][i])) for i, b in enumerate(assign))

        best = min(err(a) for a in itertools.product(cost, repeat=5) if sum(cost[b] for b in a) <= spent)
        assert err(chosen) <= best * (1 + 1e-9) + 1e-12, (budget, chosen)
        if budget >= 900:
            assert 0 not in chosen[:3]  # the larger singular values are kept


def test_reconstruction_beats_bitdelta_and_tracks_a_truncated_svd():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(96, 24, generator=g))
    v, _ = torch.linalg.qr(torch.randn(160, 24, generator=g))
    delta = (u * torch.logspace(0, -1.5, 24)) @ v.T * 0.05 + torch.randn(96, 160, generator=g) * 2e-4
    uu, ss, vv = torch.linalg.svd(delta)
    errors = []
    for bpw in (0.5, 1.0, 2.0, 4.0):
        w = compress_mixed_svd_matrix(delta, "linear", MixedSVDConfig(bits_per_weight=bpw))
        assert w.nbytes() * 8 <= bpw * delta.numel()  # the budget holds, scales included
        errors.append(float((w.to_dense() - delta).norm() / delta.norm()))
        # An independent reference: the best rank-r approximation (Eckart-Young); nothing of rank r beats it,
        # and with enough bits the quantised factors come close to it.
        r = w.rank
        floor = float(((uu[:, :r] * ss[:r]) @ vv[:r] - delta).norm() / delta.norm())
        assert floor <= errors[-1] < floor + (0.03 if bpw >= 2 else 0.2), (bpw, r)
    assert errors == sorted(errors, reverse=True)  # more bits, less error
    bit = BitDeltaWeight.from_delta(delta)
    one_bit = compress_mixed_svd_matrix(delta, "linear", MixedSVDConfig(bits_per_weight=1.0))
    assert one_bit.nbytes() <= bit.nbytes() * 1.05
    assert errors[1] < 0.5 * float((bit.to_dense() - delta).norm() / delta.norm())
    x = torch.randn(4, 160, generator=g)
    torch.testing.assert_close(one_bit.apply(x), x @ one_bit.to_dense().T, rtol=1e-4, atol=1e-6)
    index = torch.tensor([[5, 0], [95, 5]])
    torch.testing.assert_close(one_bit.rows(index), one_bit.to_dense()[index])


def test_bad_configs():
    for bad in (
        {"bits_per_weight": 0},
        {"bits_per_weight": True},
        {"bit_widths": []},
        {"bit_widths": [5]},
        {"budget_bytes": 0},
        {"budget_bytes": "lowrank"},
    ):
        with pytest.raises(DeltaConfigError):
            MixedSVDConfig(**bad).validate()


def test_a_total_budget_is_filled_by_one_rate_for_all_matrices():
    """``budget_bytes='bitdelta'``: the weights take BitDelta's bytes (counted here from BitDelta's own weights)
    to within 3 % (a triple is the unit), and an int budget likewise."""
    g = torch.Generator().manual_seed(0)
    deltas = {
        "a": torch.randn(96, 64, generator=g),
        "low": torch.randn(128, 2, generator=g) @ torch.randn(2, 64, generator=g),
        "c": torch.randn(64, 128, generator=g) * 0.1,
    }
    bitdelta = sum(BitDeltaWeight.from_delta(d, per_row=True).nbytes() for d in deltas.values())

    def total(bpw):
        cfg = MixedSVDConfig(bits_per_weight=bpw)
        return sum(compress_mixed_svd_matrix(d, "linear", cfg).nbytes() for d in deltas.values())

    for budget, config in (
        (bitdelta, MixedSVDConfig(budget_bytes="bitdelta")),
        (2500, MixedSVDConfig(budget_bytes=2500)),
    ):
        rate = fill_budget(deltas, config)
        assert 0.97 * budget <= total(rate) <= budget


@pytest.mark.slow
def test_mixed_svd_delta_serves_everywhere(micro_zoo, tmp_path, monkeypatch, torch_one_thread):
    """A mixed-SVD delta and a BitDelta delta of two fine-tunes: load, mixed batch == solo, kernel path, merge,
    engine."""
    base = micro_zoo["llama-base"].path
    folders = {}
    for name, config in (("svd", MixedSVDConfig(bits_per_weight=2.0)), ("bit", BitDeltaConfig(distill_steps=0))):
        finetune = micro_zoo["llama-arith" if name == "svd" else "llama-cipher"].path
        compress(base, finetune, config, progress=False).save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    check_delta_serves(base, folders, monkeypatch)

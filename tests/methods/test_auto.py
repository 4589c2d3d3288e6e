"""Automatic per-matrix allocation: the knapsack against brute force, targets met when measured independently
through the real delta layers, choices recorded per module, and deltas that mix methods per matrix served
everywhere (load, mixed batch, kernel path, merge, engine)."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from delta_checks import check_delta_serves

from hf_delta import AutoConfig, BitDeltaConfig, DeltaZipConfig, MixedSVDConfig, compress
from hf_delta.calibration import tokenize_calibration
from hf_delta.errors import DeltaConfigError
from hf_delta.evaluation import kl_divergence
from hf_delta.methods import LowRankConfig
from hf_delta.methods.auto import _choose, _Matrix
from hf_delta.storage import Delta


def test_bad_configs():
    for bad in (
        {},
        {"target_kl": 0.1, "target_retention": 0.9},
        {"target_retention": 1.5},
        {"target_kl": 0},
        {"budget_bytes": -1},
        {"target_kl": 0.1, "candidates": ["bitdelta-9"]},
        {"target_kl": 0.1, "candidates": ["mixed-svd-0"]},
        {"target_kl": 0.1, "probe_samples": 0},
        {"target_retention": 0.99, "margin": 1.0},
        {"target_retention": 0.99, "margin": -0.1},
    ):
        with pytest.raises(DeltaConfigError):
            AutoConfig(**bad).validate()
    AutoConfig(target_retention=0.99, candidates=["deltazip-3bit-2:4", "lowrank-r4", "mixed-svd-1.5"]).validate()


def test_knapsack_is_optimal_for_the_kl_it_spends():
    """Against every assignment for 4 matrices x 3 candidates: none with at most the chosen KL is smaller."""
    g = torch.Generator().manual_seed(0)
    matrices = []
    for i in range(4):
        sizes = sorted(torch.randint(10, 200, (3,), generator=g).tolist())
        errors = sorted(torch.rand(3, generator=g).tolist(), reverse=True)  # bigger, more accurate
        names = ["a", "b", "c"]
        matrices.append(
            _Matrix(
                f"m{i}",
                dict.fromkeys(names),
                dict(zip(names, sizes, strict=True)),
                dict(zip(names, errors, strict=True)),
                alpha=float(torch.rand(1, generator=g)) + 0.1,
            )
        )
    everything = list(itertools.product("abc", repeat=4))

    def kl(assign):
        return sum(m.predicted_kl(c) for m, c in zip(matrices, assign, strict=True))

    def size(assign):
        return sum(m.sizes[c] for m, c in zip(matrices, assign, strict=True))

    for budget in (0.2, 0.5, 1.0, 2.0, 5.0):
        chosen = _choose(matrices, budget)
        assign = tuple(chosen[m.name] for m in matrices)
        if min(kl(a) for a in everything) > budget:
            continue
        assert kl(assign) <= budget + 1e-12
        assert size(assign) <= min(size(a) for a in everything if kl(a) <= kl(assign) + 1e-12)


def _calibration_kl(model, finetuned, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in batches:
            ref = finetuned(input_ids=ids, attention_mask=mask).logits
            got = model(input_ids=ids, attention_mask=mask).logits
            real = (mask[:, 1:] * mask[:, :-1]).bool()
            n = int(real.sum())
            total += kl_divergence(ref[:, :-1], got[:, :-1, : ref.shape[-1]], real) * n
            count += n
    return total / count


@pytest.mark.slow
def test_kl_target_is_met_through_the_real_layers_and_choices_are_recorded(
    micro_zoo, zoo_models, zoo_texts, tmp_path, torch_one_thread
):
    entry = micro_zoo["llama-arith"]
    base_path = micro_zoo[entry.base].path
    _, finetuned, tokenizer = zoo_models("llama-arith")
    texts = zoo_texts("llama-arith", 32)
    model = compress(base_path, entry.path, AutoConfig(target_kl=0.002, heldout_samples=8), texts, progress=False)
    batches = tokenize_calibration(texts, tokenizer, seq_len=128, batch_size=8)
    assert _calibration_kl(model, finetuned, batches) <= 0.002
    model.save_pretrained(tmp_path / "auto")
    entries = json.loads((tmp_path / "auto" / "delta_config.json").read_text())["modules"]["weights"]
    assert entries and all(e["setting"] in AutoConfig().candidates for e in entries.values())
    loaded = Delta.from_folder(tmp_path / "auto")
    assert {m: w.setting for m, w in loaded.weights.items()} == {m: e["setting"] for m, e in entries.items()}
    assert type(loaded.config) is AutoConfig and loaded.config.target_kl == 0.002

    # A size budget: the weights fit it (as the repo stores them), and more bytes buy a lower KL.
    kls = []
    for budget in (6000, 20000):
        fitted = compress(
            base_path, entry.path, AutoConfig(budget_bytes=budget, heldout_samples=8), texts, progress=False
        )
        fitted.save_pretrained(tmp_path / str(budget))
        assert (tmp_path / str(budget) / "delta_model.safetensors").stat().st_size <= budget + 2000  # + norms
        kls.append(_calibration_kl(fitted, finetuned, batches))
    assert kls[1] < kls[0]
    with pytest.raises(DeltaConfigError, match="below the smallest allocation"):
        compress(base_path, entry.path, AutoConfig(budget_bytes=100, heldout_samples=8), texts, progress=False)


@pytest.mark.slow
def test_a_delta_mixing_methods_per_matrix_serves_everywhere(
    micro_zoo, zoo_texts, tmp_path, monkeypatch, torch_one_thread
):
    """Modules of one delta take their weights from four methods in turn; beside a plain BitDelta delta it loads,
    batches (mixed == solo), runs the kernel path, merges and serves."""
    base = micro_zoo["llama-base"].path
    finetune = micro_zoo["llama-arith"].path
    texts = zoo_texts("llama-arith", 16)
    parts = [
        compress(base, finetune, config, texts, progress=False).get_delta("default")
        for config in (BitDeltaConfig(distill_steps=0), DeltaZipConfig(bits=4), MixedSVDConfig(), LowRankConfig(rank=8))
    ]
    mixed = parts[0]
    mixed.config = AutoConfig(target_kl=0.01)
    for i, module in enumerate(sorted(mixed.weights)):
        mixed.weights[module] = parts[i % len(parts)].weights[module]
        mixed.weights[module].setting = type(parts[i % len(parts)].config).__name__
    assert len({type(w).__name__ for w in mixed.weights.values()}) == 4
    mixed.save_pretrained(tmp_path / "mixed")
    compress(base, micro_zoo["llama-cipher"].path, BitDeltaConfig(distill_steps=0), progress=False).save_pretrained(
        tmp_path / "bit"
    )
    check_delta_serves(base, {"mixed": tmp_path / "mixed", "bit": tmp_path / "bit"}, monkeypatch)


def test_agreement_counts_only_the_fine_tunes_confident_tokens():
    from hf_delta.methods.auto import _kl_and_agreement

    g = torch.Generator().manual_seed(0)
    ref, other = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    ref[0, 1, 3] = 9.0  # confident positions: (0, 1) and (1, 2); the other model agrees only on the first
    other[0, 1, 3] = 9.0
    ref[1, 2, 4] = 9.0
    other[1, 2, 4] = -9.0
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 4] = 0  # padding: position (1, 3) predicts it and does not count
    kl, n, agree, confident = _kl_and_agreement(ref, other, mask)
    real = (mask[:, 1:] * mask[:, :-1]).bool()
    assert n == 7 and kl == pytest.approx(kl_divergence(ref[:, :-1], other[:, :-1], real), rel=1e-5)
    sure = ref[:, :-1].softmax(-1).amax(-1)[real] >= 0.5
    assert confident == int(sure.sum()) and confident >= 2
    assert agree == int(((ref[:, :-1].argmax(-1) == other[:, :-1].argmax(-1))[real] & sure).sum())
    assert agree < confident


def test_heldout_rows_are_the_last_texts_and_disjoint_from_the_allocation_rows():
    from hf_delta.methods.auto import _split_rows

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50, (n, 6), generator=g), torch.ones(n, 6, dtype=torch.long)) for n in (8, 8, 5)]
    rows = [tuple(r) for ids, _ in batches for r in ids.tolist()]
    for last in (1, 5, 8, 13, 20):
        first, rest = _split_rows(batches, last)
        got_first = [tuple(r) for ids, _ in first for r in ids.tolist()]
        got_rest = [tuple(r) for ids, _ in rest for r in ids.tolist()]
        assert got_first == rows[: 21 - last] and got_rest == rows[21 - last :]
        assert all(m.shape == ids.shape for ids, m in first + rest)


def test_the_heldout_halves_alternate_rows_and_together_are_the_heldout_rows():
    from hf_delta.methods.auto import _alternate

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50, (n, 6), generator=g), torch.ones(n, 6, dtype=torch.long)) for n in (8, 5, 1)]
    rows = [tuple(r) for ids, _ in batches for r in ids.tolist()]
    even, odd = _alternate(batches)
    got_even = [tuple(r) for ids, _ in even for r in ids.tolist()]
    got_odd = [tuple(r) for ids, _ in odd for r in ids.tolist()]
    assert sorted(got_even + got_odd) == sorted(rows) and (len(got_even), len(got_odd)) == (8, 6)
    assert got_even[:4] == rows[0:8:2] and got_odd[:4] == rows[1:8:2]
    assert all(m.shape == ids.shape for ids, m in even + odd)


def test_task_verification_texts_are_neither_trained_on_nor_scored():
    from hf_delta.zoo.tasks import fresh_examples, make_task

    for name in ("arith", "cipher", "chat", "facts"):
        task = make_task(name, n=300 if name != "facts" else 24, n_heldout=32 if name != "facts" else 24)
        fresh = fresh_examples(task, 64)
        prompts = {ex.prompt for ex in fresh}
        assert len(prompts) == 64
        assert not prompts & {ex.prompt for ex in task.train + task.heldout}
        assert fresh == fresh_examples(task, 64)  # deterministic


def test_a_memorisation_task_is_verified_on_its_own_facts(zoo_models):
    """Facts the fine-tune never learned have no answer to keep: a memorisation task's verification prompts are
    its training facts' prompts (no answers); every other task's are new examples."""
    from hf_delta.evaluation import task_verification
    from hf_delta.zoo.build import task_prompt
    from hf_delta.zoo.tasks import fresh_examples, make_task

    _, _, tokenizer = zoo_models("llama-arith")
    facts = make_task("facts", n=24, n_heldout=24)
    assert facts.memorisation and {ex.prompt for ex in facts.heldout} <= {ex.prompt for ex in facts.train}
    assert task_verification(tokenizer, facts, 100) == [task_prompt(tokenizer, facts, ex) for ex in facts.train]
    assert task_verification(tokenizer, facts, 5) == [task_prompt(tokenizer, facts, ex) for ex in facts.train[:5]]
    arith = make_task("arith", n=300, n_heldout=32)
    assert not arith.memorisation
    assert task_verification(tokenizer, arith, 8) == [
        task_prompt(tokenizer, arith, ex) for ex in fresh_examples(arith, 8)
    ]


_NO_CONFIRM = SimpleNamespace(confirm=None)  # a workbench whose held-out set has no confirming half


def _fake_matrices():
    """3 matrices x 3 candidates with known sizes and predicted KLs (no weights: the checks are faked)."""
    matrices = []
    table = [
        ((10, 40, 90), (1.0, 0.3, 0.05), 0.2),
        ((20, 30, 100), (0.8, 0.5, 0.01), 0.5),
        ((5, 50, 60), (2.0, 0.1, 0.08), 0.1),
    ]
    names = ["a", "b", "c"]
    for i, (sizes, errors, alpha) in enumerate(table):
        sizes, errors = dict(zip(names, sizes, strict=True)), dict(zip(names, errors, strict=True))
        matrices.append(_Matrix(f"m{i}", dict.fromkeys(names), sizes, errors, alpha=alpha))
    return matrices


def _held_out_truth(monkeypatch, truth) -> list[dict[str, str]]:
    """Held-out checks faked as ``truth(choice) <= target_kl``; returns the list the checked choices go to."""
    from hf_delta.methods import auto

    calls = []

    def fake_verify(cfg, bench, ms, choice, split=None):
        calls.append(dict(choice))
        return {"bytes": auto._size(ms, choice), "kl": truth(choice), "retention": 0.0}, truth(choice) <= cfg.target_kl

    monkeypatch.setattr(auto, "_verify", fake_verify)
    return calls


def test_a_heldout_miss_is_tightened_until_the_check_passes(monkeypatch):
    """The held-out 'truth' is 6x the predicted KL (the allocation texts under-estimate it): the loop must end
    on an allocation whose truth meets the target, bigger than the first choice, and no smaller than the
    smallest assignment of all that meets it (brute force)."""
    from hf_delta.methods import auto

    matrices = _fake_matrices()

    def truth(choice):
        return 6 * sum(m.predicted_kl(choice[m.name]) for m in matrices)

    calls = _held_out_truth(monkeypatch, truth)
    cfg = AutoConfig(target_kl=0.3, max_checks=6)
    first = _choose(matrices, 0.3)  # what the allocation texts alone would pick
    assert truth(first) > 0.3
    chosen, checks = auto._refine(cfg, _NO_CONFIRM, matrices, first, 0.3)
    assert truth(chosen) <= 0.3
    size = auto._size(matrices, chosen)
    assert size > auto._size(matrices, first)
    everything = [dict(zip(["m0", "m1", "m2"], a, strict=True)) for a in itertools.product("abc", repeat=3)]
    assert size >= min(auto._size(matrices, a) for a in everything if truth(a) <= 0.3)
    assert [c["bytes"] for c in checks] == [auto._size(matrices, c) for c in calls]
    assert 2 <= len(calls) <= 1 + cfg.max_checks


def test_tightening_stops_within_its_bound_and_keeps_the_most_accurate_tried(monkeypatch, caplog):
    from hf_delta.methods import auto

    matrices = _fake_matrices()
    calls = []

    def never(cfg, bench, ms, choice, split=None):
        calls.append(dict(choice))
        return {"bytes": auto._size(ms, choice), "kl": 1.0, "retention": 0.5}, False

    monkeypatch.setattr(auto, "_verify", never)
    for max_checks in (0, 1, 3):
        calls.clear()
        cfg = AutoConfig(target_retention=0.99, max_checks=max_checks)
        first = _choose(matrices, 0.4)
        with caplog.at_level("WARNING", logger="hf_delta.methods.auto"):
            chosen, checks = auto._refine(cfg, _NO_CONFIRM, matrices, first, 0.4)
        assert 1 <= len(calls) <= 1 + max_checks and len(checks) == len(calls)
        # The last budget tried is 0.4 / 2**k: the kept allocation is the one chosen there.
        assert chosen == _choose(matrices, 0.4 / 2**max_checks)
        assert "misses the target on the held-out" in caplog.text
    # With a bound large enough, the loop ends at the most accurate allocation the candidates offer.
    calls.clear()
    chosen, _ = auto._refine(
        AutoConfig(target_kl=0.01, max_checks=50), _NO_CONFIRM, matrices, _choose(matrices, 0.4), 0.4
    )
    assert chosen == {"m0": "c", "m1": "c", "m2": "c"} and len(calls) < 51


def test_a_heldout_pass_is_loosened_until_the_target_is_bracketed(monkeypatch):
    """The held-out 'truth' is a quarter of the predicted KL (the allocation texts over-estimate it): the first
    choice passes, so the budget doubles until it misses and the bracket is bisected. The result meets the truth,
    is smaller than the first choice, and no allocation the knapsack offers between it and the first miss is
    both smaller and passing."""
    from hf_delta.methods import auto

    matrices = _fake_matrices()

    def truth(choice):
        return sum(m.predicted_kl(choice[m.name]) for m in matrices) / 4

    calls = _held_out_truth(monkeypatch, truth)
    cfg = AutoConfig(target_kl=0.02, max_checks=10)
    first = _choose(matrices, 0.02)
    assert truth(first) <= 0.02
    chosen, checks = auto._refine(cfg, _NO_CONFIRM, matrices, first, 0.02)
    assert truth(chosen) <= 0.02 and auto._size(matrices, chosen) < auto._size(matrices, first)
    missed = [c["kl_budget"] for c in checks if not c["ok"]]
    assert missed and all(c["ok"] for c in checks if c["kl_budget"] < min(missed))
    budgets = [0.02 * 1.01**k for k in range(400) if 0.02 * 1.01**k < min(missed)]
    passing = [auto._size(matrices, _choose(matrices, b)) for b in budgets if truth(_choose(matrices, b)) <= 0.02]
    assert auto._size(matrices, chosen) == min(passing)
    assert len(calls) <= 1 + cfg.max_checks


def test_a_cliff_the_sensitivity_model_misses_is_crossed_by_banning_the_matrix_behind_it(monkeypatch):
    """The held-out 'truth' breaks whenever m2 takes its smallest candidate, which the predicted KL rates cheap:
    every allocation of the knapsack's path past that point misses. The checks left after the bracket find m2,
    ban that choice for it and end on the smallest allocation of all that meets the truth (brute force)."""
    from hf_delta.methods import auto

    everything = [dict(zip(["m0", "m1", "m2"], a, strict=True)) for a in itertools.product("abc", repeat=3)]
    for target in (0.3, 0.8, 1.0):
        matrices = _fake_matrices()

        def truth(choice, matrices=matrices):
            return sum(m.predicted_kl(choice[m.name]) for m in matrices) + (10.0 if choice["m2"] == "a" else 0.0)

        calls = _held_out_truth(monkeypatch, truth)
        cfg = AutoConfig(target_kl=target, max_checks=24)
        chosen, checks = auto._refine(cfg, _NO_CONFIRM, matrices, _choose(matrices, target), target)
        best = min(auto._size(matrices, a) for a in everything if truth(a) <= target)
        assert truth(chosen) <= target and auto._size(matrices, chosen) == best
        assert "a" in matrices[2].banned and len(calls) == len(checks) <= 1 + cfg.max_checks
        # The knapsack's path alone (no checks left to cross the cliff) stays above it on the looser targets.
        path = [_choose(_fake_matrices(), target * 1.02**k) for k in range(-300, 300)]
        if target >= 0.8:
            assert min(auto._size(matrices, c) for c in path if truth(c) <= target) > best


def test_the_search_result_is_confirmed_on_the_half_it_never_chose_on(monkeypatch, caplog):
    """The search's half accepts more than the confirming half (a search looks at its half until it passes, luck
    included): the result is the smallest allocation that passed the search and also passes the confirmation,
    and with none confirmed the most accurate that passed the search is kept with a warning."""
    from hf_delta.methods import auto

    matrices = _fake_matrices()
    confirm = object()
    bench = SimpleNamespace(confirm=confirm)

    def predicted(choice):
        return sum(m.predicted_kl(choice[m.name]) for m in matrices)

    for confirm_target in (0.1, 0.01, 0.0):
        looked = []

        def fake_verify(cfg, bench, ms, choice, split=None, limit=confirm_target, looked=looked):
            looked.append(split)
            kl = predicted(choice)
            return {"bytes": auto._size(ms, choice), "kl": kl, "retention": 0.0}, kl <= (
                limit if split is confirm else cfg.target_kl
            )

        monkeypatch.setattr(auto, "_verify", fake_verify)
        cfg = AutoConfig(target_kl=0.3, max_checks=10)
        with caplog.at_level("WARNING", logger="hf_delta.methods.auto"):
            caplog.clear()
            chosen, checks = auto._refine(cfg, bench, matrices, _choose(matrices, 0.3), 0.3)
        searched = [c for c in checks if c["step"] != "confirmation"]
        confirmed = [c for c in checks if c["step"] == "confirmation"]
        assert looked == [None] * len(searched) + [confirm] * len(confirmed)  # confirmation comes last
        passed = sorted(c["bytes"] for c in searched if c["ok"])
        assert [c["bytes"] for c in confirmed] == passed[: len(confirmed)]
        good = [b for b, c in zip(passed, confirmed, strict=False) if c["ok"]]
        if good:
            assert auto._size(matrices, chosen) == good[0] and predicted(chosen) <= confirm_target
            assert "confirming half" not in caplog.text
        else:
            assert auto._size(matrices, chosen) == passed[-1] and len(confirmed) == len(passed)
            assert "confirming half" in caplog.text
    assert predicted(_choose(matrices, 0.0)) > 0.0  # the last case has none to confirm


def test_a_size_budget_is_measured_once_and_never_refined(monkeypatch):
    from hf_delta.methods import auto

    matrices = _fake_matrices()
    calls = []
    record = {"bytes": 0, "kl": 0.0, "retention": 1.0}
    monkeypatch.setattr(auto, "_verify", lambda cfg, bench, ms, c, split=None: calls.append(c) or (record, True))
    first = _choose(matrices, 0.3)
    chosen, checks = auto._refine(AutoConfig(budget_bytes=100), _NO_CONFIRM, matrices, first, 0.3)
    assert chosen == first and len(calls) == len(checks) == 1


def test_a_heldout_miss_is_tightened_through_the_real_layers(
    micro_zoo, zoo_models, zoo_texts, monkeypatch, torch_one_thread
):
    """Chosen on cipher texts, the arith fine-tune's delta looks cheap; the held-out arith prompts show it is not.
    Measured independently through the delta layers: without tightening the held-out KL misses the target,
    with it the KL meets it and the delta is bigger. The allocation never sees the held-out rows; the search
    checks their even rows, the odd ones confirm."""
    from hf_delta.methods import auto
    from hf_delta.zoo.build import task_prompt
    from hf_delta.zoo.tasks import fresh_examples

    entry = micro_zoo["llama-arith"]
    base_path = micro_zoo[entry.base].path
    _, finetuned, tokenizer = zoo_models("llama-arith")
    alloc = zoo_texts("llama-cipher", 24)
    task = micro_zoo.task("llama-arith")
    held = [task_prompt(tokenizer, task, ex) + ex.answer for ex in fresh_examples(task, 16)]
    seen = []
    collect = auto._collect
    monkeypatch.setattr(auto, "_collect", lambda ctx, bench, *a: seen.append(bench) or collect(ctx, bench, *a))
    results = {}
    for max_checks in (0, 8):
        config = AutoConfig(target_kl=0.002, heldout_samples=16, max_checks=max_checks)
        model = compress(base_path, entry.path, config, alloc + held, progress=False)
        batches = seen[-1].heldout.batches + seen[-1].confirm.batches  # the prompts and their continuations
        kl = _calibration_kl(model, finetuned, batches)
        results[max_checks] = kl, sum(w.nbytes() for w in model.get_delta("default").weights.values())

    def rows(batches):
        return [tuple(r[m.bool()].tolist()) for ids, mask in batches for r, m in zip(ids, mask, strict=True)]

    assert rows(seen[0].alloc.batches) == rows(tokenize_calibration(alloc, tokenizer))
    prompts = rows(tokenize_calibration(held, tokenizer))
    for split, half in ((seen[0].heldout, prompts[0::2]), (seen[0].confirm, prompts[1::2])):  # search, confirm
        assert [r[: len(p)] for r, p in zip(rows(split.batches), half, strict=True)] == half
    assert results[0][0] > 0.002 >= results[8][0]
    assert results[8][1] > results[0][1]


def test_a_heldout_prompt_agrees_exactly_when_the_greedy_continuations_match(zoo_models, zoo_texts, torch_one_thread):
    """The fine-tune continues each held-out prompt once; scoring another model teacher-forced on that
    continuation counts the same prompts as comparing the two models' own greedy generations."""
    import copy

    from hf_delta.methods.auto import _Split, _texts_agreeing, _Workbench

    _, finetuned, tokenizer = zoo_models("llama-arith")
    prompts = [t.rsplit("=", 1)[0] + "=" for t in zoo_texts("llama-arith", 12)]
    bench = object.__new__(_Workbench)
    bench.model = finetuned
    split = _Split(tokenize_calibration(prompts, tokenizer, batch_size=5))
    ends = {tokenizer.eos_token_id}
    bench.continue_prompts(split, 6, ends, tokenizer.pad_token_id, 5)
    noisy = copy.deepcopy(finetuned)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)

    def greedy(model, prompt):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[0]
        new = out[ids.shape[1] :].tolist()
        return new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new

    reference = [greedy(finetuned, p) for p in prompts]
    rows = [r[m.bool()].tolist() for ids, mask in split.batches for r, m in zip(ids, mask, strict=True)]
    marks = [mk for marks in split.scored for mk in marks]
    for prompt, row, mark, ref in zip(prompts, rows, marks, reference, strict=True):
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert row[n:] == ref and mark.nonzero().squeeze(1).tolist() == list(range(n - 1, len(row) - 1))
    for model, expected in ((finetuned, len(prompts)), (noisy, None)):
        agree = counted = 0
        with torch.no_grad():
            for (ids, mask), teacher, scored in zip(split.batches, split.teacher, split.scored, strict=True):
                logits = model(input_ids=ids, attention_mask=mask).logits
                a, c = _texts_agreeing(teacher, logits, scored)
                agree, counted = agree + a, counted + c
        same = sum(greedy(model, p) == r for p, r in zip(prompts, reference, strict=True))
        assert counted == len(prompts) and agree == same == (expected if expected is not None else same)


def test_heldout_retention_is_the_lower_end_of_its_confidence_interval():
    """Wilson score bound at z = 1 against hand-worked values: all of n texts -> n / (n + 1); 8 of 10 -> 0.6491."""
    from hf_delta.methods.auto import _lower_bound, _Score, _Split

    assert _lower_bound(256, 256) == pytest.approx(256 / 257)
    assert _lower_bound(8, 10) == pytest.approx((0.85 - math.sqrt(0.0185)) / 1.1)
    assert _lower_bound(0, 10) == pytest.approx(0.0, abs=1e-12)
    # One disagreeing text of 256 misses 0.99, none meets it; four still meet 0.97, five do not.
    assert _lower_bound(255, 256) < 0.99 < _lower_bound(256, 256)
    assert _lower_bound(251, 256) < 0.97 < _lower_bound(252, 256)
    score = _Score(kl=0.0, token=0.9, texts_agree=255, texts=256)
    split = _Split(batches=[], base_token=0.5, base_text=0.0)
    assert score.retention(split) == pytest.approx((0.8, _lower_bound(255, 256)))
    # An exhaustive split is all there is to keep: its retention is counted.
    whole = _Split(batches=[], base_token=0.5, base_text=0.0, exhaustive=True)
    assert score.retention(whole) == pytest.approx((0.8, 255 / 256))
    # Every prompt kept is the best a sample can show: 60 prompts cannot certify 0.99 (60 / 61), they pass it whole.
    assert _Score(kl=0.0, token=None, texts_agree=60, texts=60).retention(split) == (1.0, 1.0)
    assert _Score(kl=0.0, token=None, texts_agree=59, texts=60).retention(split)[1] == pytest.approx(
        _lower_bound(59, 60)
    )


def test_too_few_heldout_prompts_for_the_target_are_named():
    """The check asks for the target with its margin (half the allowed loss by default: 0.99 -> 0.995)."""
    from hf_delta.methods.auto import _certifiable, _lower_bound, _verified_target

    for margin, cases in ((0.0, ((0.9, 9), (0.97, 33), (0.99, 99))), (0.5, ((0.9, 19), (0.97, 66), (0.99, 199)))):
        for target, n in cases:
            cfg = AutoConfig(target_retention=target, margin=margin)
            assert _verified_target(cfg) == pytest.approx(1 - (1 - target) * (1 - margin))
            assert _certifiable(cfg) == n
            assert _lower_bound(n - 1, n - 1) < _verified_target(cfg) - 1e-6 <= _lower_bound(n, n)
            # Exhaustive held-out prompts are what the delta is judged on: no margin for a test's noise.
            assert _verified_target(AutoConfig(target_retention=target, heldout_exhaustive=True)) == target

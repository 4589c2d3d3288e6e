"""Mixture-of-Experts models (Mixtral, Qwen2-MoE, Qwen3-MoE in transformers 5): fused expert parameters are
compressed one matrix per expert, each row of a batch runs its own delta through the experts' routing, and the
router's tuple output is handled (it used to crash ``DeltaOverride``)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from moe_models import CONFIGS, VOCAB, perturbed, tiny_moe

from hf_delta import BitDeltaConfig, DeltaModel, DeltaZipConfig, compress_delta
from hf_delta.bench.scale import calibration_texts
from hf_delta.bench.synthetic import word_tokenizer
from hf_delta.errors import ArchitectureMismatchError, DeltaConfigError
from hf_delta.extract import expert_key, expert_parameters, select_target_modules, split_expert_key
from hf_delta.layers_moe import DeltaExperts
from hf_delta.storage import Delta, weight_files

ARCHS = sorted(CONFIGS)
LAYERS, EXPERTS = 2, 4


def _config(method: str):
    if method == "bitdelta":  # a few distillation steps: gradients flow through the experts' compressed deltas
        return BitDeltaConfig(distill_steps=4, distill_samples=4, distill_seq_len=12, distill_batch_size=4)
    return DeltaZipConfig(bits=4, sparsity="2:4", calibration_seq_len=12, calibration_batch_size=4)


def _compress(base, finetuned, method: str) -> Delta:
    calibration = {"calibration": calibration_texts(VOCAB, 4, 12), "tokenizer": word_tokenizer(VOCAB)}
    return compress_delta(copy.deepcopy(base), finetuned, _config(method), progress=False, **calibration)


def _ids(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, 12), generator=torch.Generator().manual_seed(seed))


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


@pytest.mark.parametrize("method", ["bitdelta", "deltazip"])
@pytest.mark.parametrize("arch", ARCHS)
def test_moe_compress_save_load_route_and_merge(arch, method, tmp_path):
    base = tiny_moe(arch)
    finetunes = {"a": perturbed(base, seed=1), "b": perturbed(base, seed=2)}
    ids = _ids()
    with torch.no_grad():
        plain = base(ids).logits
        wanted = {n: ft(ids).logits for n, ft in finetunes.items()}
    deltas = {name: _compress(base, finetuned, method) for name, finetuned in finetunes.items()}
    expected = sorted(expert_key(p, e) for p in expert_parameters(base) for e in range(EXPERTS))
    model = DeltaModel(base)
    for name, delta in deltas.items():
        # Every expert's matrix of both fused parameters is compressed on its own; none is stored exact.
        keys = sorted(k for k in delta.weights if split_expert_key(k))
        assert keys == expected and len(keys) == LAYERS * 2 * EXPERTS
        assert not [k for k in delta.exact if ".experts." in k]
        assert any(k.endswith("mlp.gate.weight") for k in delta.exact)  # the router's change travels exact
        delta.save_pretrained(tmp_path / name)
        model.load_delta(tmp_path / name, name)
    assert isinstance(model.base_model.get_submodule("model.layers.0.mlp.experts"), DeltaExperts)
    with torch.no_grad():
        solo = {n: model(ids, delta_names=[n] * 3).logits for n in finetunes}
        mixed = model(ids, delta_names=["a", "__base__", "b"]).logits
    assert torch.equal(mixed[1], plain[1])  # a base row is the plain base, exactly
    torch.testing.assert_close(mixed[0], solo["a"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2], solo["b"][2], rtol=0, atol=1e-5)
    for name in finetunes:  # the delta model is much closer to its fine-tune than the base is
        assert _distance(solo[name], wanted[name]) < 0.5 * _distance(plain, wanted[name]), name
    assert _distance(solo["a"], solo["b"]) > 0.1 * _distance(plain, wanted["a"])  # the deltas really differ
    merged = model.merge_and_unload("a")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, solo["a"], rtol=0, atol=1e-4)


def test_bitdelta_scales_are_per_expert_and_saved_checkpoints_give_the_same_delta(tmp_path):
    base = tiny_moe("mixtral")
    finetuned = perturbed(base, seed=1)
    # transformers 5 writes MoE checkpoints with one tensor per expert and converts them on load, so they cannot
    # stream tensor by tensor: the folders are loaded (without a tokenizer: the setting is data-free).
    base.save_pretrained(tmp_path / "base")
    finetuned.save_pretrained(tmp_path / "ft")
    config = BitDeltaConfig(distill_steps=0, scale="matrix")
    from_folders = compress_delta(tmp_path / "base", tmp_path / "ft", config, progress=False)
    from_objects = compress_delta(copy.deepcopy(base), finetuned, config, progress=False)
    a, b = from_folders.tensors(), from_objects.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    param = "model.layers.0.mlp.experts.down_proj"
    delta = (finetuned.get_parameter(param) - base.get_parameter(param)).detach()
    for e in range(EXPERTS):  # one sign mask and one scale per expert: BitDelta of that expert's matrix alone
        weight = from_folders.weights[expert_key(param, e)]
        assert weight.shape == tuple(delta.shape[1:])
        torch.testing.assert_close(weight.scales, delta[e].abs().mean().reshape(1, 1))
        assert torch.equal(weight.to_dense() > 0, delta[e] >= 0)


def test_bitdelta_of_a_bf16_moe_is_more_than_8x_smaller(tmp_path):
    # Real proportions: the experts hold most parameters (here 93%), as in Mixtral or Qwen3-MoE.
    base = tiny_moe("qwen3_moe", hidden=128, intermediate=256, experts=8)
    finetuned = perturbed(base, seed=1).to(torch.bfloat16)
    finetuned.save_pretrained(tmp_path / "ft")
    delta = compress_delta(copy.deepcopy(base), finetuned.float(), BitDeltaConfig(distill_steps=0), progress=False)
    delta.save_pretrained(tmp_path / "delta")
    experts = sum(base.get_parameter(p).numel() for p in expert_parameters(base))
    assert experts / sum(p.numel() for p in base.parameters()) > 0.9
    ratio = (tmp_path / "ft" / "model.safetensors").stat().st_size / sum(
        f.stat().st_size for f in weight_files(tmp_path / "delta")
    )
    assert ratio >= 8, ratio


def test_a_delta_with_experts_is_refused_by_a_base_without_them(tmp_path):
    base = tiny_moe("mixtral")
    delta = compress_delta(
        copy.deepcopy(base), perturbed(base, seed=1), BitDeltaConfig(distill_steps=0), progress=False
    )
    fewer = tiny_moe("mixtral", experts=2)
    with pytest.raises(ArchitectureMismatchError, match=r"expert 2 of 'model.layers.0.mlp.experts.gate_up_proj'"):
        DeltaModel(fewer).add_delta("a", delta, ignore_base_mismatch=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_serves_moe_rows_like_delta_model_generate(arch, tmp_path):
    from hf_delta.serving import Engine, EngineConfig, SamplingParams

    base = tiny_moe(arch)
    folders = {}
    for seed, name in ((1, "a"), (2, "b")):
        finetuned = perturbed(base, seed=seed, scale=0.5)  # far enough from the base that greedy tokens differ
        compress_delta(copy.deepcopy(base), finetuned, BitDeltaConfig(distill_steps=0), progress=False).save_pretrained(
            tmp_path / name
        )
        folders[name] = tmp_path / name
    prompts = [_ids(1, seed=s)[0, : 5 + s].tolist() for s in range(3)]
    jobs = [(m, p) for m in ("a", "base", "b") for p in prompts]
    engine = Engine(
        DeltaModel(copy.deepcopy(base)),
        deltas=folders,
        tokenizer=word_tokenizer(VOCAB),
        config=EngineConfig(kv_cache_tokens=512, block_size=8),
        device=os.environ.get("HF_DELTA_TEST_DEVICE"),
    )
    results = engine.generate(
        [p for _, p in jobs], model=[m for m, _ in jobs], params=SamplingParams(max_tokens=6, temperature=0)
    )
    engine.close()
    reference = DeltaModel(base)
    for name, folder in folders.items():
        reference.load_delta(folder, name)
    for (name, prompt), result in zip(jobs, results, strict=True):
        ids = torch.tensor([prompt])
        out = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            delta_names=["__base__" if name == "base" else name],
            pad_token_id=0,
        )
        assert result.token_ids == out[0, len(prompt) :].tolist()[: len(result.token_ids)], (name, prompt)
    assert len({tuple(r.token_ids) for r in results}) > len(prompts)  # the deltas change what is generated


def test_experts_outside_the_targets_travel_exact_and_still_route_per_row():
    base = tiny_moe("qwen2_moe")
    finetuned = perturbed(base, seed=1)
    assert select_target_modules(base, ["gate_up_proj"]) == [
        p for p in expert_parameters(base) if p.endswith("gate_up_proj")
    ]
    config = BitDeltaConfig(distill_steps=0, target_modules=["q_proj", "v_proj"])
    delta = compress_delta(copy.deepcopy(base), finetuned, config, progress=False)
    assert not [k for k in delta.weights if split_expert_key(k)]
    assert {k for k in delta.exact if ".experts." in k} == set(expert_parameters(base))
    ids = _ids()
    with torch.no_grad():
        plain = base(ids).logits
    model = DeltaModel(base)
    model.add_delta("a", delta)
    with torch.no_grad():
        solo = model(ids, delta_names=["a"] * 3).logits
        mixed = model(ids, delta_names=["__base__", "a", "__base__"]).logits
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[2], plain[2])
    torch.testing.assert_close(mixed[1], solo[1], rtol=0, atol=1e-5)
    merged = model.merge_and_unload("a")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, solo, rtol=0, atol=1e-4)


def test_a_low_rank_moe_delta_is_refused_by_the_peft_export(tmp_path):
    from hf_delta import LowRankConfig
    from hf_delta.integrations.peft import export_peft_lora

    base = tiny_moe("mixtral")
    delta = compress_delta(copy.deepcopy(base), perturbed(base, seed=1), LowRankConfig(rank=4), progress=False)
    with pytest.raises(DeltaConfigError, match=r"Mixture-of-Experts.*experts.down_proj\[0\]"):
        export_peft_lora(delta, base, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_expert_hessians_come_from_the_real_tokens_routed_to_each_expert():
    from hf_delta.methods.deltazip.calibrate import ExpertHessians

    experts = tiny_moe("mixtral").model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 32, generator=gen)
    index = torch.stack([torch.randperm(EXPERTS, generator=gen)[:2] for _ in range(10)])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])  # two sequences of 5 tokens, padding on the right
    for leaf in ("gate_up_proj", "down_proj"):
        acc = ExpertHessians(experts, leaf)
        acc.add(hidden[:6], index[:6], mask.new_ones(2, 3))  # two batches accumulate into one Hessian
        acc.add(hidden[6:], index[6:], None)
        acc.add(hidden, index, mask)
        got = acc.result("p")
        for e in range(EXPERTS):
            picked = [
                (hidden[:6], index[:6]),
                (hidden[6:], index[6:]),
                (hidden[mask.reshape(-1).bool()], index[mask.reshape(-1).bool()]),
            ]
            x = torch.cat([h[(i == e).any(-1)] for h, i in picked])
            if leaf == "down_proj":
                gate, up = (x @ experts.gate_up_proj[e].detach().T).chunk(2, dim=-1)
                x = F.silu(gate) * up
            if len(x) == 0:
                assert got[f"p[{e}]"] is None
            else:
                torch.testing.assert_close(got[f"p[{e}]"], 2 * x.T @ x / len(x), rtol=1e-5, atol=1e-6)


def test_deltazip_experts_calibrated_on_routed_tokens_beat_round_to_nearest():
    base = tiny_moe("mixtral")
    finetuned = perturbed(base, seed=1)
    texts = calibration_texts(VOCAB, 8, 12)
    param = "model.layers.0.mlp.experts.gate_up_proj"
    inputs: dict[int, list[torch.Tensor]] = {}

    def grab(module, args):  # the fine-tune's own routed inputs of layer 0's experts
        for e in range(EXPERTS):
            inputs.setdefault(e, []).append(args[0][(args[1] == e).any(-1)])

    tokenizer = word_tokenizer(VOCAB)
    ids = tokenizer(texts, return_tensors="pt")["input_ids"]
    handle = finetuned.get_submodule(param.rpartition(".")[0]).register_forward_pre_hook(grab)
    with torch.no_grad():
        finetuned(ids)
    handle.remove()
    delta = (finetuned.get_parameter(param) - base.get_parameter(param)).detach()
    errors = {}
    for use_hessian in (True, False):
        config = DeltaZipConfig(bits=4, sparsity="2:4", use_hessian=use_hessian, calibration_seq_len=12)
        compressed = compress_delta(copy.deepcopy(base), finetuned, config, texts, tokenizer=tokenizer, progress=False)
        errors[use_hessian] = sum(
            float(
                (torch.cat(inputs[e]) @ (delta[e] - compressed.weights[expert_key(param, e)].to_dense()).T).pow(2).sum()
            )
            for e in range(EXPERTS)
        )
    assert errors[True] < 0.8 * errors[False], errors

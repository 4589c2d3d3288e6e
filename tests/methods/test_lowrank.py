"""Low-rank deltas: SVD truncation, save/load, export to PEFT LoRA, and a batch mixing three methods."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from hf_delta import BitDeltaConfig, DeltaModel, compress, export_peft_lora
from hf_delta.errors import BaseModelMismatchError, DeltaConfigError
from hf_delta.methods import DeltaZipConfig, LowRankConfig, LowRankWeight
from hf_delta.storage import Delta
from hf_delta.utils.loading import load_model


def test_truncated_svd_rank_and_energy():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(20, 6, generator=g))
    v, _ = torch.linalg.qr(torch.randn(12, 6, generator=g))
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    delta = (u * s) @ v.T
    full = LowRankWeight.from_delta(delta, rank=6, dtype=torch.float32)
    torch.testing.assert_close(full.to_dense(), delta, rtol=1e-4, atol=1e-5)
    energy = (s**2).cumsum(0) / (s**2).sum()
    picked = LowRankWeight.from_delta(delta, energy=float(energy[1]) + 1e-4)
    assert picked.rank == 3  # the smallest rank reaching the requested share of Σ s²
    assert LowRankWeight.from_delta(delta, rank=2, energy=0.999).rank == 2  # rank caps energy
    w = LowRankWeight.from_delta(delta, rank=3)
    assert w.A.dtype == torch.bfloat16 and w.A.shape == (3, 12) and w.B.shape == (20, 3)
    x = torch.randn(4, 12)
    torch.testing.assert_close(w.apply(x), x @ w.to_dense().T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.rows(torch.tensor([5, 0])), w.to_dense()[[5, 0]])
    again = LowRankWeight.from_tensors(dict(w.named_buffers()), w.meta())
    assert torch.equal(again.to_dense(), w.to_dense())


def test_bad_configs(micro_zoo):
    for bad in ({"rank": None}, {"rank": 0}, {"energy": 0.0}, {"energy": 1.5}, {"factor_dtype": "int8"}):
        with pytest.raises(DeltaConfigError):
            LowRankConfig(**bad).validate()
    entry = micro_zoo["llama-arith"]
    with pytest.raises(DeltaConfigError, match="rank=33 exceeds"):  # micro: hidden 32
        compress(micro_zoo[entry.base].path, entry.path, LowRankConfig(rank=33), progress=False)


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits


@pytest.mark.parametrize(("name", "options"), [("llama-arith", {"rank": 8}),
                                               ("qwen2-arith", {"rank": 16, "energy": 0.95}),
                                               ("qwen2-cipher", {"rank": 4, "compress_embeddings": False})])
def test_peft_export_matches_delta_model(micro_zoo, tmp_path, name, options):
    """Untied head + embeddings; tied embeddings + q/k/v biases + per-module ranks; whole tables saved."""
    entry = micro_zoo[name]
    base_path = micro_zoo[entry.base].path
    model = compress(base_path, entry.path, LowRankConfig(**options), progress=False)
    model.save_pretrained(tmp_path / "delta")
    loaded = Delta.from_folder(tmp_path / "delta")
    export_peft_lora(loaded, base_path, tmp_path / "lora", norms="modules_to_save")
    peft_model = PeftModel.from_pretrained(load_model(base_path), tmp_path / "lora").eval()
    ids = torch.randint(0, 380, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(peft_model, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    # The DeltaModel itself exports too (its own base, no second copy needed).
    export_peft_lora(model, None, tmp_path / "lora2", norms="modules_to_save")
    assert (tmp_path / "lora2" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "lora" / "adapter_model.safetensors").read_bytes()


def test_peft_export_refuses_what_lora_cannot_hold(micro_zoo, tmp_path):
    entry = micro_zoo["llama-chat"]  # adds chat tokens: a grown vocabulary
    base_path = micro_zoo[entry.base].path
    grown = compress(base_path, entry.path, LowRankConfig(rank=4), progress=False)
    with pytest.raises(DeltaConfigError, match="vocabulary rows"):
        export_peft_lora(grown, None, tmp_path / "a")
    entry = micro_zoo["llama-arith"]
    signs = compress(base_path, entry.path, BitDeltaConfig(distill_steps=0), progress=False)
    with pytest.raises(DeltaConfigError, match="Only low-rank deltas"):
        export_peft_lora(signs, None, tmp_path / "b")
    arith = compress(base_path, entry.path, LowRankConfig(rank=4), progress=False)
    with pytest.raises(BaseModelMismatchError):
        export_peft_lora(arith, micro_zoo["qwen2-base"].path, tmp_path / "c")


def test_mixed_batch_across_three_methods(micro_zoo, zoo_texts, tmp_path):
    """bitdelta + deltazip + lowrank deltas of three fine-tunes on one base: each row equals its delta alone."""
    base_path = micro_zoo["llama-base"].path
    configs = {"llama-arith": BitDeltaConfig(distill_steps=0), "llama-cipher": DeltaZipConfig(bits=4),
               "llama-facts": LowRankConfig(rank=8)}
    model = DeltaModel(load_model(base_path).eval())
    for name, config in configs.items():
        calibration = zoo_texts(name, 16) if isinstance(config, DeltaZipConfig) else None
        compress(base_path, micro_zoo[name].path, config, calibration, progress=False).save_pretrained(tmp_path / name)
        model.load_delta(tmp_path / name, delta_name=name)
    names = list(configs)
    ids = torch.randint(3, 300, (3, 7), generator=torch.Generator().manual_seed(1))
    mixed = _logits(model, ids, delta_names=names)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         delta_names=names)
    for row, name in enumerate(names):
        model.set_delta(name)
        torch.testing.assert_close(mixed[row], _logits(model, ids)[row], rtol=1e-5, atol=1e-5)
        alone = model.generate(input_ids=ids[row : row + 1], attention_mask=torch.ones_like(ids[row : row + 1]),
                               max_new_tokens=6, do_sample=False)
        # The batch keeps generating padding after a row's end-of-sequence token; the row alone stops there.
        assert torch.equal(out[row, : alone.shape[1]], alone[0]), name
    assert {type(model.get_delta(n).weights["model.layers.0.mlp.up_proj"]).__name__ for n in names} == \
        {"BitDeltaWeight", "DeltaZipWeight", "LowRankWeight"}

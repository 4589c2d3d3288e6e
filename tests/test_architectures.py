"""Every dense architecture of ``tests/_support/architectures.py`` through compress → save → load → mixed batch
→ merge, with BitDelta and DeltaZip deltas of one fine-tune loaded side by side.

References are independent of the delta layers: the plain base model's own forward (``__base__`` rows must
equal it bit for bit), each delta run alone (a mixed batch must equal it), and the fine-tune itself (the
delta model must be closer to it than the base is).
"""

from __future__ import annotations

import copy

import pytest
import torch
from architectures import CONFIGS, VOCAB, calibration_texts, perturbed, sample_ids, tiny_model, tiny_tokenizer

from hf_delta import BitDeltaConfig, DeltaModel, DeltaZipConfig, UnsupportedArchitectureError, compress

CONFIGS_UNDER_TEST = {
    "bitdelta": BitDeltaConfig(distill_steps=4, distill_samples=4, distill_seq_len=12, distill_batch_size=4),
    "deltazip": DeltaZipConfig(
        bits=4, sparsity=0.5, calibration_samples=4, calibration_seq_len=12, calibration_batch_size=4
    ),
}


@pytest.fixture
def one_thread():
    """The models are tiny: one thread is faster than contending for the machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_compress_load_mix_merge(arch, tmp_path, one_thread):
    base = tiny_model(arch)
    finetuned = perturbed(base, seed=1)
    tokenizer, texts = tiny_tokenizer(), calibration_texts(8)
    for name, config in CONFIGS_UNDER_TEST.items():
        compressed = compress(copy.deepcopy(base), finetuned, config, texts, tokenizer=tokenizer, progress=False)
        compressed.save_pretrained(tmp_path / name)

    model = DeltaModel(copy.deepcopy(base))
    for name in CONFIGS_UNDER_TEST:
        model.load_delta(tmp_path / name, name)
    ids = sample_ids(4, seed=2)
    rows = ["bitdelta", "__base__", "deltazip", "bitdelta"]
    with torch.no_grad():
        mixed = model(input_ids=ids, delta_names=rows).logits
        plain = base(input_ids=ids).logits
        tuned = finetuned(input_ids=ids).logits
        alone = {}
        for name in CONFIGS_UNDER_TEST:
            model.set_delta(name)
            alone[name] = model(input_ids=ids).logits

    assert torch.equal(mixed[1], plain[1]), "a __base__ row differs from the plain base"
    for row, name in enumerate(rows):
        if name != "__base__":
            torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)
    for name in CONFIGS_UNDER_TEST:
        error, baseline = (alone[name] - tuned).norm(), (plain - tuned).norm()
        assert error < 0.8 * baseline, f"{name}: delta model {error:.4f} from the fine-tune, base {baseline:.4f}"
        merged = copy.deepcopy(model).merge_and_unload(name)
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, alone[name], rtol=1e-4, atol=1e-4)


STREAMED = {  # settings compress() runs from the two checkpoints without loading the fine-tune
    "bitdelta-data-free": BitDeltaConfig(distill_steps=0),
    "bitdelta-distilled": CONFIGS_UNDER_TEST["bitdelta"],
    "deltazip-layer-by-layer": CONFIGS_UNDER_TEST["deltazip"],
}


@pytest.mark.parametrize("arch", ["gpt2", "opt", "phi", "falcon", "gemma2"])
def test_streamed_compression_matches_in_memory(arch, tmp_path, one_thread):
    """Compressing from checkpoint folders (tensor by tensor, or layer by layer) gives the in-memory result."""
    base = tiny_model(arch)
    finetuned = perturbed(base, seed=1)
    tokenizer, texts = tiny_tokenizer(), calibration_texts(8)
    base.save_pretrained(tmp_path / "base")
    finetuned.save_pretrained(tmp_path / "finetuned")
    tokenizer.save_pretrained(tmp_path / "finetuned")
    ids = sample_ids(2, seed=3)
    for name, config in STREAMED.items():
        streamed = compress(tmp_path / "base", tmp_path / "finetuned", config, texts, progress=False)
        in_memory = compress(copy.deepcopy(base), finetuned, config, texts, tokenizer=tokenizer, progress=False)
        want, got = in_memory.get_delta("default"), streamed.get_delta("default")
        assert set(got.weights) == set(want.weights), name
        for module, weight in want.weights.items():
            torch.testing.assert_close(
                got.weights[module].to_dense(),
                weight.to_dense(),
                rtol=1e-4,
                atol=1e-5,
                msg=lambda m, module=module, name=name: f"{name} {module}: {m}",
            )
        with torch.no_grad():
            torch.testing.assert_close(
                streamed(input_ids=ids).logits, in_memory(input_ids=ids).logits, rtol=1e-4, atol=1e-4
            )


@pytest.mark.parametrize("arch", ["gemma3", "opt"])
def test_grown_vocabulary_through_the_embedding_s_own_forward(arch, one_thread):
    """Added tokens go through the embedding's own forward too (Gemma scales every row by sqrt(hidden))."""
    base = tiny_model(arch)
    finetuned = copy.deepcopy(base)
    finetuned.resize_token_embeddings(VOCAB + 4, mean_resizing=False)
    finetuned = perturbed(finetuned, seed=1)
    model = compress(copy.deepcopy(base), finetuned, BitDeltaConfig(distill_steps=0), progress=False)
    ids = sample_ids(2, seed=4)
    ids[0, 3:6] = torch.tensor([VOCAB, VOCAB + 2, VOCAB + 3])
    with torch.no_grad():
        mixed = model(input_ids=ids, delta_names=["default", "__base__"]).logits
        assert torch.equal(mixed[1, :, :VOCAB], base(input_ids=ids[1:]).logits[0])
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(mixed[0], merged(input_ids=ids[:1]).logits[0], rtol=1e-4, atol=1e-4)
        model.set_delta("default")
        added = model.base_model.get_input_embeddings()(ids[:1, 3:6])  # rows stored exactly: the fine-tune's own
        torch.testing.assert_close(added, finetuned.get_input_embeddings()(ids[:1, 3:6]), rtol=0, atol=1e-6)


class _DoubledLinear(torch.nn.Linear):
    """A linear subclass whose own forward is not ``x @ Wᵀ + b``."""

    def forward(self, x):
        return 2 * super().forward(x)


def _with_doubled_down_proj(model):
    old = model.model.layers[0].mlp.down_proj
    new = _DoubledLinear(old.in_features, old.out_features, bias=False)
    new.weight = old.weight
    model.model.layers[0].mlp.down_proj = new
    return model


def test_a_non_affine_linear_subclass_is_refused_unless_stored_whole(one_thread):
    base = _with_doubled_down_proj(tiny_model("llama"))
    finetuned = perturbed(base, seed=1)
    with pytest.raises(UnsupportedArchitectureError, match=r"_DoubledLinear .*not x @ Wᵀ \+ b"):
        compress(copy.deepcopy(base), finetuned, BitDeltaConfig(distill_steps=0), progress=False)
    others = r"(?!model\.layers\.0\.mlp\.down_proj$).*"
    model = compress(
        copy.deepcopy(base), finetuned, BitDeltaConfig(distill_steps=0, target_modules=others), progress=False
    )
    assert "model.layers.0.mlp.down_proj.weight" in model.get_delta("default").exact
    ids = sample_ids(2, seed=5)
    with torch.no_grad():
        mixed = model(input_ids=ids, delta_names=["default", "__base__"]).logits
        assert torch.equal(mixed[1], base(input_ids=ids).logits[1])
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids[:1]).logits[0], mixed[0], rtol=1e-4, atol=1e-4)


def test_auto_config_on_conv1d_layers(one_thread):
    """AutoConfig sets candidate matrices into a copy of the fine-tune: through Conv1D's [in, out] layout too."""
    from hf_delta import AutoConfig

    base = tiny_model("gpt2")
    finetuned = perturbed(base, seed=1)
    config = AutoConfig(budget_bytes=40_000, calibration_samples=8, calibration_seq_len=12, probe_samples=4,
                        heldout_samples=4)
    model = compress(
        copy.deepcopy(base), finetuned, config, calibration_texts(12), tokenizer=tiny_tokenizer(), progress=False
    )
    ids = sample_ids(2, seed=6)
    with torch.no_grad():
        got, plain, tuned = model(input_ids=ids).logits, base(input_ids=ids).logits, finetuned(input_ids=ids).logits
        merged = copy.deepcopy(model).merge_and_unload()(input_ids=ids).logits
    assert (got - tuned).norm() < 0.8 * (plain - tuned).norm()
    torch.testing.assert_close(merged, got, rtol=1e-4, atol=1e-4)


def test_peft_export_of_conv1d_layers(tmp_path, one_thread):
    """Changed Conv1D weights and biases export as LoRA factors [out, in] that PEFT applies like the delta."""
    from peft import PeftModel

    from hf_delta import LowRankConfig, export_peft_lora

    base = tiny_model("gpt2")
    finetuned = perturbed(base, seed=1)
    with torch.no_grad():  # norms unchanged: LoRA has no place for them
        for name, param in finetuned.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                param.copy_(base.get_parameter(name))
    model = compress(copy.deepcopy(base), finetuned, LowRankConfig(rank=8), progress=False)
    export_peft_lora(model, None, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = sample_ids(2, seed=7)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(peft_model.merge_and_unload()(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)

"""extract_delta: which tensors are compressed, stored exact or stored as new vocabulary rows."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hf_delta.errors import ArchitectureMismatchError, DeltaConfigError, UnsupportedArchitectureError
from hf_delta.extract import extract_delta, is_tied, select_target_modules

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _load(micro_zoo, name: str):
    return AutoModelForCausalLM.from_pretrained(micro_zoo[name].path, dtype=torch.float32)


@pytest.fixture(scope="module")
def llama(micro_zoo):
    return _load(micro_zoo, "llama-base"), _load(micro_zoo, "llama-arith")


@pytest.fixture(scope="module")
def qwen2(micro_zoo):
    return _load(micro_zoo, "qwen2-base"), _load(micro_zoo, "qwen2-arith")


def _linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _rebuild(base, extracted) -> dict[str, torch.Tensor]:
    """The fine-tune's state dict rebuilt from the base and an (uncompressed) extraction."""
    state = {k: v.float().clone() for k, v in base.state_dict().items()}
    for module, delta in extracted.compress.items():
        state[f"{module}.weight"][: delta.shape[0]] += delta
    for module, rows in extracted.new_rows.items():
        state[f"{module}.weight"] = torch.cat([state[f"{module}.weight"], rows.float()])
    for name, value in extracted.exact.items():
        state[name] = value.float()
    for head, embed in extracted.tied.items():
        state[f"{head}.weight"] = state[f"{embed}.weight"]
    return state


def _assert_rebuilds(base, finetuned, extracted) -> None:
    rebuilt, expected = _rebuild(base, extracted), finetuned.state_dict()
    assert set(rebuilt) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(rebuilt[name], value.float(), rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------- target modules
def test_all_linear_compresses_every_linear_and_the_vocab_matrices(llama):
    base, ft = llama
    out = extract_delta(base, ft)
    linears = [n for n in _linears(base) if n != "lm_head"]
    assert len(linears) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert select_target_modules(base, "all-linear") == linears
    assert set(out.compress) == {*linears, "model.embed_tokens", "lm_head"}
    assert out.kinds["model.embed_tokens"] == "embedding" and out.kinds["lm_head"] == "linear"
    for name in linears:
        w_ft, w_base = ft.get_submodule(name).weight, base.get_submodule(name).weight
        assert torch.equal(out.compress[name], w_ft - w_base), name
    assert out.new_rows == {} and out.tied == {}
    _assert_rebuilds(base, ft, out)


def test_target_list_keeps_other_linears_exact(llama):
    base, ft = llama
    out = extract_delta(base, ft, target_modules=["q_proj", "v_proj"])
    expected = {n for n in _linears(base) if n.endswith(("q_proj", "v_proj"))}
    assert len(expected) == 4
    assert set(out.compress) == expected | {"model.embed_tokens", "lm_head"}
    # Untargeted linears that the fine-tune changed are stored as they are: nothing of the fine-tune is lost.
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(out.exact[k], ft.state_dict()[k])
    _assert_rebuilds(base, ft, out)


def test_target_regex_is_matched_against_full_names(llama):
    base, ft = llama
    out = extract_delta(base, ft, target_modules=r".*\.mlp\.(up|down)_proj")
    assert set(out.compress) - {"model.embed_tokens", "lm_head"} == {
        f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("up", "down")
    }
    # fullmatch, not search: a partial pattern matches nothing
    with pytest.raises(DeltaConfigError, match="matches no linear layer"):
        extract_delta(base, ft, target_modules=r"mlp")


@pytest.mark.parametrize("targets", [["nope_proj"], r"layers\.9\..*", []])
def test_no_match_is_a_clear_error(llama, targets):
    base, ft = llama
    with pytest.raises(DeltaConfigError, match=r"matches no linear layer.*q_proj"):
        extract_delta(base, ft, target_modules=targets)


def test_invalid_regex_is_a_config_error(llama):
    base, ft = llama
    with pytest.raises(DeltaConfigError, match="not a valid regex"):
        extract_delta(base, ft, target_modules="(q_proj")


def test_gpt2_conv1d_layers_are_linear_targets_with_out_in_deltas():
    """GPT-2 stores its linear layers as ``Conv1D`` ([in, out]): 'all-linear' finds them, deltas are [out, in]."""
    from architectures import perturbed, tiny_model
    from transformers.pytorch_utils import Conv1D

    base = tiny_model("gpt2")
    ft = perturbed(base, seed=1)
    convs = [n for n, m in base.named_modules() if isinstance(m, Conv1D)]
    assert len(convs) == 8 and select_target_modules(base, "all-linear") == convs
    assert select_target_modules(base, ["c_fc"]) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    extracted = extract_delta(base, ft)
    for name in convs:
        stored = ft.get_submodule(name).weight - base.get_submodule(name).weight  # [in, out]
        torch.testing.assert_close(extracted.compress[name], stored.T, rtol=0, atol=1e-6, msg=name)


def test_a_model_without_linear_layers_is_refused_by_name():
    class Lookup(nn.Module):  # an embedding and a head, nothing to compress between them
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(8, 4), nn.Linear(4, 8)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(UnsupportedArchitectureError, match=r"Lookup has no linear layer.*'Embedding'"):
        select_target_modules(Lookup(), "all-linear")


# ------------------------------------------------------------------------------ tied, grown vocab, exact
def test_tied_embeddings_are_recorded_once(qwen2):
    base, ft = qwen2
    assert is_tied(base) and is_tied(ft)
    out = extract_delta(base, ft)
    assert out.tied == {"lm_head": "model.embed_tokens"}
    assert "lm_head" not in out.compress and not any(k.startswith("lm_head") for k in out.exact)
    emb = "model.embed_tokens"
    assert torch.equal(out.compress[emb], ft.get_submodule(emb).weight - base.get_submodule(emb).weight)
    _assert_rebuilds(base, ft, out)


def test_norms_and_biases_are_exact_and_unchanged_tensors_are_not_stored(qwen2):
    base, ft = qwen2
    out = extract_delta(base, ft)
    b, f = base.state_dict(), ft.state_dict()
    biases = [k for k in f if k.endswith(".bias")]
    norms = [k for k in f if "norm" in k]
    assert len(biases) == 6 and len(norms) == 5
    for name in biases + norms:
        assert not torch.equal(f[name], b[name])  # the fine-tune changed every one of them
        assert torch.equal(out.exact[name], f[name]), name
    assert set(out.exact) == set(biases + norms)


def test_unchanged_norms_are_not_stored(micro_zoo, llama):
    base, _ = llama
    copy = _load(micro_zoo, "llama-arith")
    with torch.no_grad():
        copy.model.norm.weight.copy_(base.model.norm.weight)
    out = extract_delta(base, copy)
    assert "model.norm.weight" not in out.exact
    assert "model.layers.0.input_layernorm.weight" in out.exact


def test_grown_vocabulary_new_rows_dense_old_rows_as_delta(micro_zoo, llama):
    base, _ = llama
    chat = _load(micro_zoo, "llama-chat")
    n_base, n_ft = base.config.vocab_size, chat.config.vocab_size
    assert n_ft == n_base + 3
    out = extract_delta(base, chat)
    assert (out.base_vocab_size, out.vocab_size) == (n_base, n_ft)
    for module in ("model.embed_tokens", "lm_head"):
        w_ft, w_base = chat.get_submodule(module).weight, base.get_submodule(module).weight
        assert torch.equal(out.new_rows[module], w_ft[n_base:])
        assert torch.equal(out.compress[module], w_ft[:n_base] - w_base)
    _assert_rebuilds(base, chat, out)


def test_uncompressed_embeddings_are_exact_and_new_rows_not_stored_twice(micro_zoo, llama):
    base, _ = llama
    chat = _load(micro_zoo, "llama-chat")
    out = extract_delta(base, chat, compress_embeddings=False)
    assert "model.embed_tokens" not in out.compress and "lm_head" not in out.compress
    assert torch.equal(out.exact["lm_head.weight"], chat.lm_head.weight)
    assert out.new_rows == {}  # the exact tables already hold the new rows
    _assert_rebuilds(base, chat, out)


# ------------------------------------------------------------------------------------------- mismatches
def test_architecture_mismatch_names_both_model_types(llama, qwen2):
    with pytest.raises(ArchitectureMismatchError, match=r"'llama'.*'qwen2'"):
        extract_delta(llama[0], qwen2[1])


def _variant(micro_zoo, **overrides):
    config = AutoConfig.from_pretrained(micro_zoo["llama-base"].path)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_shape_mismatch_names_the_parameter_and_shapes(micro_zoo, llama):
    other = _variant(micro_zoo, intermediate_size=48)
    with pytest.raises(ArchitectureMismatchError) as err:
        extract_delta(llama[0], other)
    msg = str(err.value)
    assert "mlp" in msg and "(64, 32)" in msg and "(48, 32)" in msg, msg


def test_layer_count_mismatch(micro_zoo, llama):
    other = _variant(micro_zoo, num_hidden_layers=3)
    with pytest.raises(ArchitectureMismatchError, match=re.escape("model.layers.2")):
        extract_delta(llama[0], other)


def test_hidden_size_mismatch_in_the_embedding(micro_zoo, llama):
    other = _variant(micro_zoo, hidden_size=48, head_dim=12)
    with pytest.raises(ArchitectureMismatchError, match="embed_tokens"):
        extract_delta(llama[0], other)


def test_shrunk_vocabulary_is_rejected(micro_zoo, llama):
    base, _ = llama
    other = _load(micro_zoo, "llama-arith")
    other.resize_token_embeddings(base.config.vocab_size - 4)
    with pytest.raises(ArchitectureMismatchError, match="smaller than the base"):
        extract_delta(base, other)

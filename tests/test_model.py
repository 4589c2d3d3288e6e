"""DeltaModel: many deltas beside one base, mixed batches, the PEFT-style API, merging and memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_delta import DeltaModel
from hf_delta.errors import ArchitectureMismatchError, DeltaNotFoundError
from hf_delta.layers import DeltaWrapper
from hf_delta.storage import Delta

pytestmark = pytest.mark.usefixtures("torch_one_thread")

LLAMA = ("llama-arith", "llama-cipher", "llama-facts")


# ------------------------------------------------------------------------------------------------ helpers
def _base(micro_zoo, arch: str = "llama", dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(micro_zoo[f"{arch}-base"].path, dtype=dtype)


def _model(micro_zoo, micro_delta, names, arch: str = "llama") -> DeltaModel:
    model = DeltaModel(_base(micro_zoo, arch))
    for name in names:
        model.load_delta(micro_delta(name), name)
    return model


def _dense(micro_zoo, folder: Path, arch: str = "llama"):
    """Reference: a plain transformers model holding base + decompressed delta (written without DeltaModel)."""
    model = _base(micro_zoo, arch)
    delta = Delta.from_folder(folder)
    if delta.vocab_size > model.config.vocab_size:
        model.resize_token_embeddings(delta.vocab_size, mean_resizing=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for module, weight in delta.weights.items():
        rows = weight.shape[0]
        state[f"{module}.weight"][:rows] += weight.to_dense(torch.float32)
    for module, rows in delta.new_rows.items():
        n = rows.shape[0]
        state[f"{module}.weight"][-n:] = rows
    state.update(delta.exact)
    for head, embed in delta.tied.items():
        state[f"{head}.weight"] = state[f"{embed}.weight"]
    model.load_state_dict(state)
    return model.eval()


def _prompts(micro_zoo, names, tokenizer=None) -> list[str]:
    out = []
    for name in names:
        example = micro_zoo.task(name).heldout[0]
        if micro_zoo.task(name).chat:
            out.append(tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}],
                                                     add_generation_prompt=True, tokenize=False))
        else:
            out.append(example.prompt)
    return out


def _left_padded(tokenizer, prompts: list[str]):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def _one(tokenizer, prompt: str):
    return tokenizer([prompt], return_tensors="pt", add_special_tokens=False)


def _greedy(model, enc, **kwargs):
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=1, **kwargs)
    n = enc["input_ids"].shape[1]
    return out.sequences[:, n:], torch.stack(out.scores, 1)


def _buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


# ---------------------------------------------------------------------------------------------- mixed batches
def test_mixed_batch_equals_each_prompt_alone(micro_zoo, micro_delta):
    model = _model(micro_zoo, micro_delta, LLAMA)
    tok = AutoTokenizer.from_pretrained(micro_zoo["llama-base"].path)
    prompts = [*_prompts(micro_zoo, LLAMA), "def main(argv):"]
    names = [*LLAMA, "__base__"]
    enc = _left_padded(tok, prompts)
    tokens, scores = _greedy(model, enc, delta_names=names)
    with torch.no_grad():
        logits = model(**enc, delta_names=names).logits
    for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
        one = _one(tok, prompt)
        model.set_delta(name)
        alone_tokens, alone_scores = _greedy(model, one)
        assert torch.equal(tokens[i], alone_tokens[0]), name
        torch.testing.assert_close(scores[i], alone_scores[0], rtol=1e-4, atol=1e-4)
        # ...and alone, it is exactly the dense model base + decompressed delta.
        reference = _base(micro_zoo) if name == "__base__" else _dense(micro_zoo, micro_delta(name))
        with torch.no_grad():
            expected = reference(**one).logits[0]
            alone = model(**one).logits[0]
        torch.testing.assert_close(alone, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[i, enc["attention_mask"][i].bool()], expected, rtol=1e-4, atol=1e-4)
    # Different deltas really give different outputs (so the comparisons above can fail).
    assert (logits[0, -1] - logits[1, -1]).abs().max() > 0.1


def test_delta_names_are_per_row_for_beams_and_return_sequences(micro_zoo, micro_delta):
    model = _model(micro_zoo, micro_delta, LLAMA[:2])
    tok = AutoTokenizer.from_pretrained(micro_zoo["llama-base"].path)
    prompts = _prompts(micro_zoo, LLAMA[:2])
    enc = _left_padded(tok, prompts)
    out = model.generate(**enc, delta_names=list(LLAMA[:2]), max_new_tokens=3, do_sample=False, num_beams=2,
                         num_return_sequences=2, pad_token_id=1)
    for i, name in enumerate(LLAMA[:2]):
        model.set_delta(name)
        one = _left_padded(tok, [prompts[i]] * 1)
        alone = model.generate(**one, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2,
                               pad_token_id=1)
        assert torch.equal(out[2 * i : 2 * i + 2, enc["input_ids"].shape[1] :], alone[:, one["input_ids"].shape[1] :])


def test_wrong_number_of_delta_names_is_a_clear_error(micro_zoo, micro_delta):
    model = _model(micro_zoo, micro_delta, LLAMA[:1])
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(ValueError, match=r"3 delta names for a batch of 2 rows"):
        model(input_ids=ids, delta_names=["__base__", LLAMA[0], LLAMA[0]])
    with pytest.raises(DeltaNotFoundError, match="'nope'"):
        model(input_ids=ids, delta_names=["nope", LLAMA[0]])


def test_chat_delta_with_grown_vocab_in_a_mixed_batch(micro_zoo, micro_delta):
    model = _model(micro_zoo, micro_delta, ["llama-arith", "llama-chat"])
    chat_tok = AutoTokenizer.from_pretrained(micro_delta("llama-chat"))  # the tokenizer travels with the delta
    base_vocab = model.config.vocab_size
    prompts = _prompts(micro_zoo, ["llama-arith", "llama-chat"], chat_tok)
    names = ["llama-arith", "llama-chat"]
    enc = _left_padded(chat_tok, prompts)
    assert int(enc["input_ids"][1].max()) >= base_vocab  # the chat prompt uses the new special tokens
    with torch.no_grad():
        logits = model(**enc, delta_names=names).logits
    assert logits.shape[-1] == base_vocab + 3
    mask = enc["attention_mask"].bool()
    # Rows whose delta lacks the new tokens never pick them.
    assert bool((logits[0, :, base_vocab:] == torch.finfo(logits.dtype).min).all())
    for i, name in enumerate(names):
        with torch.no_grad():
            expected = _dense(micro_zoo, micro_delta(name))(**_one(chat_tok, prompts[i])).logits[0]
        got = logits[i, mask[i]]
        torch.testing.assert_close(got[:, : expected.shape[-1]], expected, rtol=1e-4, atol=1e-4)
    tokens, scores = _greedy(model, enc, delta_names=names)
    for i, name in enumerate(names):
        model.set_delta(name)
        alone, alone_scores = _greedy(model, _one(chat_tok, prompts[i]))
        assert torch.equal(tokens[i], alone[0])
        width = alone_scores.shape[-1]
        torch.testing.assert_close(scores[i, :, :width], alone_scores[0], rtol=1e-4, atol=1e-4)
    # A base row cannot embed a token only the chat fine-tune knows.
    with pytest.raises(IndexError, match=r"Token id 38\d is outside the vocabulary \(384 tokens\)"):
        model(**enc, delta_names=["llama-arith", "__base__"])
    with pytest.raises(IndexError, match="Tokenize each prompt with the tokenizer of the delta"):
        model(**enc, delta_names=["llama-arith", "llama-arith"])


def _greedy_ids(model, enc, n: int = 16) -> list[int]:
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=1)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def test_generate_uses_the_generation_config_a_delta_carries(micro_zoo, micro_delta):
    model = _model(micro_zoo, micro_delta, LLAMA)
    assert b'"eos_token_id": 386' in Delta.from_folder(micro_delta("llama-chat")).files["generation_config.json"]
    tok = AutoTokenizer.from_pretrained(micro_zoo["llama-base"].path)
    # Find a greedy continuation in which some token first appears mid-way; make it that fine-tune's
    # end-of-sequence token (as a chat fine-tune carries its end-of-turn token).
    found = None
    for name in LLAMA:
        model.set_delta(name)
        for example in micro_zoo.task(name).heldout[:3]:
            enc = _one(tok, example.prompt)
            free = _greedy_ids(model, enc)
            fresh = [i for i in range(1, len(free)) if free[i] not in free[:i]]
            if fresh and found is None:
                found = name, enc, free, fresh[0]
    name, enc, free, at = found
    model.set_delta(name)
    model.get_delta(name).files["generation_config.json"] = json.dumps({"eos_token_id": free[at]}).encode()
    assert _greedy_ids(model, enc) == free[: at + 1]
    with model.disable_delta():  # the base's own config again
        assert model._generation_config(None) is None
    others = [n for n in LLAMA if n != name]
    mixed = model._generation_config([name, others[0], "__base__"])
    assert sorted(mixed.eos_token_id) == sorted({0, free[at]})
    assert model._generation_config(others) is None  # they carry none: the base's config applies


def test_qwen2_tied_deltas(micro_zoo, micro_delta):
    names = ["qwen2-arith", "qwen2-cipher"]
    model = _model(micro_zoo, micro_delta, names, arch="qwen2")
    head = model.base_model.lm_head
    embed = model.base_model.model.embed_tokens
    assert isinstance(head, DeltaWrapper) and head.deltas["qwen2-arith"] is embed.deltas["qwen2-arith"]
    tok = AutoTokenizer.from_pretrained(micro_zoo["qwen2-base"].path)
    prompts = [*_prompts(micro_zoo, names), "import os"]
    enc = _left_padded(tok, prompts)
    with torch.no_grad():
        logits = model(**enc, delta_names=[*names, "__base__"]).logits
    for i, name in enumerate([*names, "__base__"]):
        ref = _base(micro_zoo, "qwen2") if name == "__base__" else _dense(micro_zoo, micro_delta(name), "qwen2")
        with torch.no_grad():
            expected = ref(**_one(tok, prompts[i])).logits[0]
        torch.testing.assert_close(logits[i, enc["attention_mask"][i].bool()], expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- PEFT-style API
def test_set_disable_delete_list_active(micro_zoo, micro_delta):
    model = _model(micro_zoo, micro_delta, LLAMA)
    base = _base(micro_zoo)
    ids = torch.tensor([[5, 60, 7, 80, 9]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        per_delta = {}
        for name in LLAMA:
            model.set_delta(name)
            assert model.active_delta == name
            per_delta[name] = model(input_ids=ids).logits
        assert model.list_deltas() == list(LLAMA)
        torch.testing.assert_close(per_delta[LLAMA[1]], _dense(micro_zoo, micro_delta(LLAMA[1]))(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
        with model.disable_delta():
            torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)
        assert model.active_delta == LLAMA[2]
        torch.testing.assert_close(model(input_ids=ids).logits, per_delta[LLAMA[2]], rtol=0, atol=0)
        model.set_delta("__base__")
        assert model.active_delta is None
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)
        model.set_delta(LLAMA[0])
        model.delete_delta(LLAMA[0])
        assert model.list_deltas() == list(LLAMA[1:]) and model.active_delta == LLAMA[1]
        torch.testing.assert_close(model(input_ids=ids).logits, per_delta[LLAMA[1]], rtol=0, atol=0)
        with pytest.raises(DeltaNotFoundError, match=LLAMA[0]):
            model.set_delta(LLAMA[0])
        with pytest.raises(DeltaNotFoundError):
            model.delete_delta(LLAMA[0])
        with pytest.raises(DeltaNotFoundError):
            model(input_ids=ids, delta_names=[LLAMA[0]])
        # A freed slot is reused, and the new delta there is the new one.
        model.load_delta(micro_delta(LLAMA[0]), "again")
        torch.testing.assert_close(model(input_ids=ids, delta_names=["again"]).logits, per_delta[LLAMA[0]],
                                   rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids, delta_names=[LLAMA[2]]).logits, per_delta[LLAMA[2]],
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="already loaded"):
        model.load_delta(micro_delta(LLAMA[1]), LLAMA[1])
    with pytest.raises(ValueError, match="reserved"):
        model.load_delta(micro_delta(LLAMA[1]), "__base__")
    for name in model.list_deltas():
        model.delete_delta(name)
    assert model.active_delta is None and model.list_deltas() == []
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)


def test_switching_deltas_copies_no_weights(micro_zoo, micro_delta):
    model = _model(micro_zoo, micro_delta, [*LLAMA, "llama-chat"])
    params = {n: (p.data_ptr(), p.clone()) for n, p in model.base_model.named_parameters()}
    buffers = _buffer_bytes(model)
    storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    ids = torch.tensor([[5, 60, 7, 80, 9]])
    with torch.no_grad():
        for name in [*LLAMA, "llama-chat", "__base__", LLAMA[0]]:
            model.set_delta(name)
            model(input_ids=ids)
        model(input_ids=ids.repeat(4, 1), delta_names=[*LLAMA, "llama-chat"])
    for n, p in model.base_model.named_parameters():
        assert p.data_ptr() == params[n][0] and torch.equal(p, params[n][1]), n
    assert _buffer_bytes(model) == buffers
    assert {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]} == storages
    # No delta keeps a copy of a base weight (that would defeat the shared base).
    base_shapes = {tuple(p.shape) for p in model.base_model.parameters() if p.dim() == 2}
    for name, b in model.named_buffers():
        assert not (b.is_floating_point() and tuple(b.shape) in base_shapes), name


def test_resident_deltas_cost_their_size(micro_zoo, micro_delta):
    model = DeltaModel(_base(micro_zoo))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    base_buffers = _buffer_bytes(model)  # rotary frequencies
    sizes = []
    for i in range(8):
        name = [*LLAMA, "llama-chat"][i % 4]
        delta = model.load_delta(micro_delta(name), f"d{i}")
        sizes.append(delta.nbytes())
        on_disk = (micro_delta(name) / "delta_model.safetensors").stat().st_size
        assert delta.nbytes() <= on_disk  # what is resident is what was stored, not a decompressed copy
    assert _buffer_bytes(model) - base_buffers <= 1.1 * sum(sizes)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == params
    # Each delta is far smaller than the fine-tune it stands for (1 bit per weight + fp32 norms).
    assert max(sizes) < params / 10


# ----------------------------------------------------------------------------------------- merging and unloading
@pytest.mark.parametrize(("name", "arch"), [("llama-cipher", "llama"), ("llama-chat", "llama"),
                                            ("qwen2-arith", "qwen2")])
def test_merge_and_unload_equals_base_plus_decompressed_delta(micro_zoo, micro_delta, name, arch):
    other = "llama-arith" if arch == "llama" else "qwen2-cipher"
    model = _model(micro_zoo, micro_delta, [other, name], arch=arch)
    model.set_delta(name)
    tok = AutoTokenizer.from_pretrained(micro_delta(name) if name == "llama-chat" else micro_zoo[name].path)
    enc = _one(tok, _prompts(micro_zoo, [name], tok)[0])
    with torch.no_grad():
        delta_logits = model(**enc).logits
    merged = model.merge_and_unload()
    assert not any(isinstance(m, DeltaWrapper) for m in merged.modules())
    expected = _dense(micro_zoo, micro_delta(name), arch).state_dict()
    got = merged.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=key)
    if arch == "qwen2":
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert merged.config.vocab_size == Delta.from_folder(micro_delta(name)).vocab_size
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, delta_logits, rtol=1e-4, atol=1e-4)


def test_merge_in_bf16_is_within_rounding(micro_zoo, micro_delta):
    model = DeltaModel(_base(micro_zoo, dtype=torch.bfloat16))
    model.load_delta(micro_delta("llama-arith"), "a")
    merged = model.merge_and_unload("a")
    expected = _dense(micro_zoo, micro_delta("llama-arith")).state_dict()
    base = _base(micro_zoo).state_dict()
    for key, value in merged.state_dict().items():
        assert value.dtype == torch.bfloat16
        # bf16 rounds the base, then the sum: each within its unit roundoff 2^-8 (8 significant bits).
        bound = 2**-8 * (2 * base[key].abs() + (expected[key] - base[key]).abs()) + 1e-30
        error = (value.float() - expected[key]).abs()
        assert bool((error <= bound).all()), (key, float((error / bound).max()))


def test_unload_returns_the_untouched_base(micro_zoo, micro_delta):
    fresh = _base(micro_zoo)
    base = _base(micro_zoo)
    model = DeltaModel(base)
    for name in [*LLAMA, "llama-chat"]:
        model.load_delta(micro_delta(name), name)
    ids = torch.tensor([[5, 60, 7, 80, 9]])
    with torch.no_grad():
        model(input_ids=ids)
    plain = model.unload()
    assert plain is base
    assert not any(isinstance(m, DeltaWrapper) for m in plain.modules())
    assert type(plain.model.embed_tokens) is nn.Embedding and type(plain.lm_head) is nn.Linear
    for key, value in fresh.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, fresh(input_ids=ids).logits)
    # The emptied DeltaModel starts over: a delta loaded now is the active one.
    model.load_delta(micro_delta("llama-arith"), "again")
    assert model.list_deltas() == ["again"] and model.active_delta == "again"
    with torch.no_grad():
        expected = _dense(micro_zoo, micro_delta("llama-arith"))(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_save_pretrained_of_a_loaded_delta_round_trips(micro_zoo, micro_delta, tmp_path):
    model = _model(micro_zoo, micro_delta, ["llama-arith", "llama-chat"])
    model.save_pretrained(tmp_path / "chat", delta_name="llama-chat")
    again = DeltaModel.from_pretrained(micro_zoo["llama-base"].path, tmp_path / "chat")
    assert again.list_deltas() == ["default"] and again.active_delta == "default"
    assert (tmp_path / "chat" / "tokenizer.json").is_file()
    ids = torch.tensor([[5, 60, 385, 80, 386]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids, delta_names=["llama-chat"]).logits,
                                   rtol=0, atol=0)


def test_partial_targets_and_exact_embeddings_in_bf16(micro_zoo, micro_delta):
    """Untargeted linears (with biases) and uncompressed embeddings are stored exact; they work in any dtype."""
    folder = micro_delta("qwen2-arith", target_modules=["q_proj"], compress_embeddings=False)
    delta = Delta.from_folder(folder)
    assert "model.layers.0.self_attn.k_proj.weight" in delta.exact and "model.embed_tokens.weight" in delta.exact
    ids = torch.tensor([[5, 60, 7, 80, 9], [3, 4, 5, 6, 7]])
    with torch.no_grad():
        expected = _dense(micro_zoo, folder, "qwen2")(input_ids=ids).logits
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
            model = DeltaModel(_base(micro_zoo, "qwen2", dtype=dtype))
            model.load_delta(folder, "partial")
            got = model(input_ids=ids, delta_names=["partial", "partial"]).logits.float()
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
            merged = model.merge_and_unload("partial")
            torch.testing.assert_close(merged(input_ids=ids).logits.float(), expected, rtol=tol, atol=tol)


def test_delta_that_does_not_fit_the_model_is_rejected_whole(micro_zoo, micro_delta):
    model = _model(micro_zoo, micro_delta, ["llama-arith"])
    modules = dict(model.named_modules())
    bad = Delta.from_folder(micro_delta("llama-cipher"))
    bad.record.base_fingerprint = None
    bad.weights["model.layers.7.mlp.up_proj"] = bad.weights["model.layers.1.mlp.up_proj"]
    with pytest.raises(ArchitectureMismatchError, match=r"model.layers.7.mlp.up_proj"):
        model.add_delta("bad", bad)
    bad = Delta.from_folder(micro_delta("llama-cipher"))
    bad.exact["model.norm.weight"] = torch.ones(48)
    with pytest.raises(ArchitectureMismatchError, match=r"model.norm.weight.*\(48,\).*\(32,\)"):
        model.add_delta("bad", bad)
    bad = Delta.from_folder(micro_delta("llama-cipher"))
    bad.weights["model.layers.0.mlp.up_proj"] = bad.weights["model.layers.0.mlp.down_proj"]
    with pytest.raises(ArchitectureMismatchError, match=r"model.layers.0.mlp.up_proj.*\(32, 64\).*\(64, 32\)"):
        model.add_delta("bad", bad)
    assert dict(model.named_modules()).keys() == modules.keys() and model.list_deltas() == ["llama-arith"]
    assert all("bad" not in getattr(m, "deltas", {}) for m in model.modules())


# ------------------------------------------------------------------------------------- transactional add
def _state(model: DeltaModel) -> tuple:
    wrappers = sorted(n for n, m in model.base_model.named_modules() if isinstance(m, DeltaWrapper))
    held = {n: sorted(m.deltas) for n, m in model.base_model.named_modules() if isinstance(m, DeltaWrapper)}
    return model.list_deltas(), model.active_delta, list(model.routing.slots), wrappers, held


@pytest.mark.parametrize("fail_at", ["move", "install"])
def test_a_failed_add_delta_leaves_the_model_as_it_was(micro_zoo, micro_delta, monkeypatch, fail_at):
    model = _model(micro_zoo, micro_delta, ["llama-arith"])
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    before, logits = _state(model), model(input_ids=ids).logits
    delta = Delta.from_folder(micro_delta("llama-cipher"))
    calls = []

    def fail_on_third(self, name):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(self, name)

    if fail_at == "move":
        real = type(next(iter(delta.weights.values()))).moved_to
        monkeypatch.setattr(type(next(iter(delta.weights.values()))), "moved_to", fail_on_third)
    else:
        real = DeltaModel._wrap
        monkeypatch.setattr(DeltaModel, "_wrap", fail_on_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.add_delta("cipher", delta)
    monkeypatch.undo()
    assert len(calls) == 3
    assert _state(model) == before
    torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=0)
    model.add_delta("cipher", delta)  # and the same delta attaches afterwards
    assert model.list_deltas() == ["llama-arith", "cipher"]


def test_add_delta_moves_copies_to_the_models_device_not_the_callers_tensors(micro_zoo, micro_delta):
    base = _base(micro_zoo).to("meta")  # another device than the delta's (the meta device works without a GPU)
    model = DeltaModel(base)
    delta = Delta.from_folder(micro_delta("llama-arith"))
    model.add_delta("arith", delta, ignore_base_mismatch=True)  # meta tensors have no values to fingerprint
    attached = model.get_delta("arith")
    assert attached is not delta and attached.weights.keys() == delta.weights.keys()
    assert {t.device.type for w in attached.weights.values() for t in w.buffers()} == {"meta"}
    assert {t.device.type for w in delta.weights.values() for t in w.buffers()} == {"cpu"}
    assert {t.device.type for t in model.attached_tensors()} == {"meta"}


def test_from_pretrained_keeps_the_checkpoints_dtype_and_takes_a_device_map(micro_zoo, micro_delta, tmp_path):
    _base(micro_zoo, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16-base")
    model = DeltaModel.from_pretrained(tmp_path / "bf16-base", micro_delta("llama-arith"), device_map="cpu")
    assert model.base_model.dtype == torch.bfloat16  # transformers' dtype="auto", not float32
    assert {p.device.type for p in model.base_model.parameters()} == {"cpu"}
    as_float = DeltaModel.from_pretrained(tmp_path / "bf16-base", micro_delta("llama-arith"), dtype=torch.float32)
    assert as_float.base_model.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(model(input_ids=ids).logits.float(), as_float(input_ids=ids).logits,
                               rtol=0.05, atol=0.05)

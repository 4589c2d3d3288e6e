"""The zoo builder: determinism, caching, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_delta.bench.zoo_eval import linear_layers_changed
from hf_delta.errors import ModelLoadError, ZooError
from hf_delta.utils.loading import check_tokenizer_fits, load_model_and_tokenizer
from hf_delta.utils.progress import listen_progress
from hf_delta.zoo import build_zoo, get_recipe, load_zoo, make_task


def _weights(zoo) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(e.path / "model.safetensors") for name, e in zoo.entries.items()}


@pytest.mark.slow
def test_building_twice_gives_bit_identical_weights(tmp_path, torch_one_thread):
    first = _weights(build_zoo("micro", tmp_path / "a"))
    second = _weights(build_zoo("micro", tmp_path / "b"))
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].keys() == second[name].keys()
        for key in first[name]:
            assert torch.equal(first[name][key], second[name][key]), f"{name}:{key} differs between builds"


@pytest.mark.slow
def test_building_some_models_gives_the_same_weights_and_the_rest_comes_later(micro_zoo, tmp_path,
                                                                             torch_one_thread):
    steps = []
    with listen_progress(lambda desc, done, total: steps.append((desc, done, total))):
        part = build_zoo("micro", tmp_path, models=["llama-facts"])
    assert sorted(part.entries) == ["llama-base", "llama-facts"]  # its base comes with it, nothing else
    assert {desc for desc, _, _ in steps} == {"pretrain llama-base", "fine-tune llama-facts"}
    assert ("fine-tune llama-facts", get_recipe("micro").finetune.steps, get_recipe("micro").finetune.steps) in steps
    full = _weights(micro_zoo)
    for name, weights in _weights(part).items():
        assert weights.keys() == full[name].keys()
        assert all(torch.equal(weights[k], full[name][k]) for k in weights), f"{name} differs from the full build"
    with pytest.raises(ZooError, match=r"lacks \['qwen2-base'"):
        load_zoo("micro", tmp_path)  # a partial zoo is not the whole zoo
    base_written = (part["llama-base"].path / "model.safetensors").stat().st_mtime_ns
    more = build_zoo("micro", tmp_path, models=["llama-cipher"])
    assert sorted(more.entries) == ["llama-base", "llama-cipher", "llama-facts"]
    assert (more["llama-base"].path / "model.safetensors").stat().st_mtime_ns == base_written  # reused
    with pytest.raises(ZooError, match="no models \\['gpt-base'\\]"):
        build_zoo("micro", tmp_path, models=["gpt-base"])


def test_zoo_layout_and_fine_tunes(micro_zoo):
    names = set(micro_zoo.entries)
    assert {"llama-base", "qwen2-base"} <= names
    assert len([e for e in micro_zoo.finetunes if e.base == "llama-base"]) >= 4
    assert len([e for e in micro_zoo.finetunes if e.base == "qwen2-base"]) >= 2
    qwen, _ = load_model_and_tokenizer(micro_zoo["qwen2-base"].path)
    assert qwen.config.tie_word_embeddings and qwen.model.layers[0].self_attn.q_proj.bias is not None
    for entry in micro_zoo.finetunes:
        base, _ = load_model_and_tokenizer(micro_zoo[entry.base].path)
        ft, tok = load_model_and_tokenizer(entry.path)
        changed, total = linear_layers_changed(base, ft)
        assert changed == total, f"{entry.name}: only {changed}/{total} linear layers changed"
        if entry.task == "chat":
            assert len(tok) == base.get_input_embeddings().weight.shape[0] + 3
            assert tok.eos_token == "<|end|>" and "<|assistant|>" in tok.chat_template


def test_cached_zoo_is_reused_and_recipe_change_invalidates(micro_zoo, monkeypatch):
    assert build_zoo("micro", micro_zoo.root.parent).root == micro_zoo.root  # reuse, no rebuild
    manifest = json.loads((micro_zoo.root / "zoo.json").read_text())
    monkeypatch.setattr(type(get_recipe("micro")), "hash", lambda self: "something-else")
    with pytest.raises(ZooError, match="another recipe"):
        load_zoo("micro", micro_zoo.root.parent)
    assert manifest["recipe_hash"] != "something-else"


def test_unknown_size_and_missing_dir_errors(tmp_path):
    with pytest.raises(ZooError, match=r"Unknown zoo size 'huge'.*micro"):
        build_zoo("huge", tmp_path)
    with pytest.raises(ZooError, match="No micro zoo"):
        load_zoo("micro", tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "missing-model")


def test_model_and_tokenizer_that_do_not_belong_together(micro_zoo):
    base, _ = load_model_and_tokenizer(micro_zoo["llama-base"].path)
    _, chat_tok = load_model_and_tokenizer(micro_zoo["llama-chat"].path)
    with pytest.raises(ModelLoadError, match="does not belong"):
        check_tokenizer_fits(base, chat_tok, name="llama-base")


def test_tasks_are_deterministic_and_splits_disjoint():
    for name in ("arith", "cipher", "chat"):
        a, b = make_task(name, n=300, n_heldout=30), make_task(name, n=300, n_heldout=30)
        assert a == b
        assert not {e.prompt for e in a.train} & {e.prompt for e in a.heldout}
    with pytest.raises(ZooError, match="Unknown zoo task"):
        make_task("poetry")

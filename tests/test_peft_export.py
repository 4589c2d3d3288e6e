"""PEFT export against PEFT itself: several exported adapters in one PeftModel, mixed per row in one batch
(``adapter_names=[...]``), equal to the DeltaModel holding the same deltas; what LoRA cannot hold (norms)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from architectures import VOCAB, tiny_config
from peft import PeftModel
from transformers import LlamaForCausalLM

from hf_delta import DeltaModel, LowRankConfig, compress, export_peft_lora
from hf_delta.errors import DeltaConfigError
from hf_delta.storage import Delta
from hf_delta.utils.loading import load_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _without(delta: Delta, dropped: set[str]) -> Delta:
    return dataclasses.replace(delta, exact={k: v for k, v in delta.exact.items() if k not in dropped})


def _pair(base_path, finetunes: dict[str, Path], tmp_path: Path, config: LowRankConfig, norms: str = "error"):
    """The DeltaModel of the deltas (less what the export drops) and a PeftModel of their exported adapters,
    the first loaded with ``from_pretrained``, the others with ``load_adapter``."""
    reference = DeltaModel(load_model(base_path).eval())
    for name, path in finetunes.items():
        model = compress(base_path, path, config, progress=False)
        folder = export_peft_lora(model, None, tmp_path / name, norms=norms)
        delta = model.get_delta("default")
        norm_params = {p for p in delta.exact if "norm" in p.rpartition(".")[0].rpartition(".")[2]}
        reference.add_delta(name, _without(delta, norm_params) if norms == "drop" else delta)
        if len(reference.list_deltas()) == 1:
            peft_model = PeftModel.from_pretrained(load_model(base_path).eval(), folder, adapter_name=name)
        else:
            peft_model.load_adapter(folder, adapter_name=name)
    return reference, peft_model.eval()


def _assert_mixed_batch_matches(reference: DeltaModel, peft_model: PeftModel, vocab: int) -> None:
    names = [*reference.list_deltas(), "__base__"]
    ids = torch.randint(3, vocab, (len(names), 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids, delta_names=names).logits
        mixed = peft_model(input_ids=ids, adapter_names=names).logits
        torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-4)
        for row, name in enumerate(names[:-1]):  # each adapter alone, too
            peft_model.set_adapter(name)
            torch.testing.assert_close(
                peft_model(input_ids=ids[row : row + 1]).logits[0], expected[row], rtol=1e-4, atol=1e-4
            )


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", {"rank": 8}),  # untied head, LoRA embedding
        ("qwen2", {"rank": 8}),  # tied embeddings and q/k/v biases: LoRA biases + trainable tokens
        ("qwen2", {"rank": 4, "compress_embeddings": False}),  # the whole table stored exact
        ("llama", {"rank": 4, "energy": 0.9, "compress_embeddings": False}),  # exact untied head: full-rank LoRA
    ],
)
def test_exported_adapters_mix_in_one_peft_batch(micro_zoo, tmp_path, arch, options):
    finetunes = {n: micro_zoo[n].path for n in (f"{arch}-arith", f"{arch}-cipher")}
    reference, peft_model = _pair(
        micro_zoo[f"{arch}-base"].path, finetunes, tmp_path, LowRankConfig(**options), norms="drop"
    )
    _assert_mixed_batch_matches(reference, peft_model, vocab=380)


def test_mixed_batch_generate_equals_delta_model(micro_zoo, tmp_path):
    finetunes = {n: micro_zoo[n].path for n in ("qwen2-arith", "qwen2-cipher")}
    reference, peft_model = _pair(
        micro_zoo["qwen2-base"].path, finetunes, tmp_path, LowRankConfig(rank=8), norms="drop"
    )
    names = [*finetunes, "__base__"]
    ids = torch.randint(3, 380, (3, 6), generator=torch.Generator().manual_seed(2))
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": 5,
        "do_sample": False,
        "pad_token_id": 0,
    }
    ours = reference.generate(**kwargs, delta_names=names)
    theirs = peft_model.generate(**kwargs, adapter_names=names)
    assert torch.equal(ours, theirs)


def _tied_llama_pair(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny tied-embedding Llama and two fine-tunes that change only its matrices (by rank-2 updates)."""
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    finetunes = {}
    for seed, name in enumerate(("a", "b"), start=1):
        g = torch.Generator().manual_seed(seed)
        ft = LlamaForCausalLM(config)
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                if p.ndim == 2:
                    p += 0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
        ft.save_pretrained(tmp_path / name)
        finetunes[name] = tmp_path / name
    return tmp_path / "base", finetunes


def test_tied_embedding_second_adapter_is_exact(tmp_path):
    """The second adapter of a tied base, added with load_adapter, changes the head too (peft 0.21 ties only
    the first one's when asked to tie: the export targets the head itself)."""
    base, finetunes = _tied_llama_pair(tmp_path)
    reference, peft_model = _pair(base, finetunes, tmp_path / "out", LowRankConfig(rank=4, factor_dtype="float32"))
    for name in finetunes:
        assert json.loads((tmp_path / "out" / name / "adapter_config.json").read_text())["ensure_weight_tying"] is False
    _assert_mixed_batch_matches(reference, peft_model, vocab=VOCAB)


def test_norms_are_refused_by_default_and_the_options_say_what_they_do(micro_zoo, tmp_path, caplog):
    entry = micro_zoo["llama-arith"]
    base_path = micro_zoo[entry.base].path
    model = compress(base_path, entry.path, LowRankConfig(rank=4), progress=False)
    with pytest.raises(
        DeltaConfigError,
        match=r"LoRA cannot hold the 5 changed parameters.*input_layernorm"
        r".*norms='drop'.*norms='modules_to_save'",
    ):
        export_peft_lora(model, None, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(DeltaConfigError, match="norms must be one of"):
        export_peft_lora(model, None, tmp_path / "x", norms="fold")
    with caplog.at_level("WARNING", logger="hf_delta"):
        export_peft_lora(model, None, tmp_path / "dropped", norms="drop")
    assert "dropped 5 changed parameters" in caplog.text
    # modules_to_save: exact one adapter at a time, and PEFT refuses to mix it (what the docs say).
    export_peft_lora(model, None, tmp_path / "saved", norms="modules_to_save")
    peft_model = PeftModel.from_pretrained(load_model(base_path).eval(), tmp_path / "saved").eval()
    ids = torch.randint(3, 380, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        with warnings.catch_warnings(), pytest.raises(TypeError, match="Mixed batching is only supported"):
            warnings.simplefilter("ignore")
            peft_model(input_ids=ids, adapter_names=["default", "__base__"])

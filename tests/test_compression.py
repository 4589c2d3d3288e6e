"""compress(): the caller's config is never modified, and each delta owns its settings and its record."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_delta import BitDeltaConfig, CompressionRecord, DeltaModel, LowRankConfig, compress, compress_delta
from hf_delta.errors import BaseModelMismatchError
from hf_delta.storage import Delta

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_one_config_against_two_bases_gives_two_deltas_that_each_fit_only_their_base(micro_zoo, tmp_path):
    # Two bases of one architecture: the zoo's Llama base, and its facts fine-tune taken as a base.
    bases = {"base": micro_zoo["llama-base"].path, "facts": micro_zoo["llama-facts"].path}
    config = BitDeltaConfig(distill_steps=0)
    settings = config.to_dict()
    for name, base in bases.items():
        compress(base, micro_zoo["llama-arith"].path, config, progress=False).save_pretrained(tmp_path / name)
        assert config.to_dict() == settings  # nothing recorded into the caller's object
    assert not any(hasattr(config, f) for f in CompressionRecord.__dataclass_fields__)

    for name, base in bases.items():
        other = next(b for n, b in bases.items() if n != name)
        model = DeltaModel.from_pretrained(base, tmp_path / name)
        assert model.get_delta("default").record.base_model_name_or_path == str(base)
        assert model.get_delta("default").config is not config
        with pytest.raises(BaseModelMismatchError, match="its weights differ"):
            DeltaModel.from_pretrained(other, tmp_path / name)


def test_a_delta_keeps_its_settings_when_the_callers_config_changes(micro_zoo):
    config = BitDeltaConfig(distill_steps=0, scale="row")
    model = compress(micro_zoo["llama-base"].path, micro_zoo["llama-arith"].path, config, progress=False)
    config.scale = "matrix"
    assert model.get_delta("default").config.scale == "row"


def test_the_record_says_where_the_base_came_from(micro_zoo):
    base = AutoModelForCausalLM.from_pretrained(micro_zoo["llama-base"].path, dtype=torch.float32)
    model = compress(base, micro_zoo["llama-arith"].path, BitDeltaConfig(distill_steps=0), progress=False)
    record = model.get_delta("default").record
    assert record.base_model_name_or_path == base.config._name_or_path
    assert record.base_fingerprint["layout"] and record.library_version


@pytest.mark.parametrize("name", ["llama-arith", "qwen2-cipher"])  # untied and tied vocabularies
@pytest.mark.parametrize("config", [BitDeltaConfig(distill_steps=0, scale="row", residual_passes=1),
                                    LowRankConfig(rank=4)], ids=["bitdelta", "lowrank"])
def test_streaming_gives_the_same_delta_as_the_loaded_models(micro_zoo, name, config, caplog, tmp_path):
    entry = micro_zoo[name]
    base, ft = micro_zoo[entry.base].path, entry.path
    with caplog.at_level("INFO", logger="hf_delta"):
        streamed = compress_delta(base, ft, config, progress=False)
    assert "Streaming" in caplog.text
    loaded = compress_delta(*(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (base, ft)),
                            config, tokenizer=AutoTokenizer.from_pretrained(ft), progress=False)
    a, b = streamed.tensors(), loaded.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed.record.base_fingerprint == loaded.record.base_fingerprint
    assert (streamed.tied, streamed.vocab_size) == (loaded.tied, loaded.vocab_size)
    assert streamed.files == {}  # the fine-tune keeps the base's tokenizer (the chat one carries its own)
    # What the streaming path writes records its weight files' checksums, and loads back checked.
    streamed.save_pretrained(tmp_path / "streamed", max_shard_size=4000)
    shards = sorted((tmp_path / "streamed").glob("delta_model-*.safetensors"))
    assert len(shards) >= 2
    recorded = json.loads((tmp_path / "streamed" / "delta_config.json").read_text())["checksums"]
    assert recorded == {p.name: "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}
    again = Delta.from_folder(tmp_path / "streamed").tensors()
    assert again.keys() == a.keys() and all(torch.equal(again[k], a[k]) for k in a)


def test_scale_distillation_streams_with_a_layer_by_layer_teacher(micro_zoo, caplog):
    """With calibration texts, distillation loads the base once and computes the fine-tune's logits layer by
    layer; the distilled scales match those of the in-memory path (both models loaded)."""
    from hf_delta.evaluation import task_calibration

    entry = micro_zoo["llama-arith"]
    base, ft = micro_zoo[entry.base].path, entry.path
    tok = AutoTokenizer.from_pretrained(ft)
    texts = task_calibration(tok, micro_zoo.task("llama-arith"), n=16)
    config = BitDeltaConfig(distill_steps=6, distill_samples=16, distill_batch_size=4)
    with caplog.at_level("INFO", logger="hf_delta"):
        streamed = compress(base, ft, config, texts, progress=False)
    assert "Streaming bitdelta" in caplog.text and "teacher" not in str(type(streamed.base_model))
    loaded = compress(*(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (base, ft)), config,
                      texts, tokenizer=tok, progress=False)
    a, b = streamed.get_delta("default").weights, loaded.get_delta("default").weights
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].scales, b[name].scales, rtol=1e-4, atol=1e-7)
        assert torch.equal(a[name].signs, b[name].signs)
    initial = compress_delta(base, ft, BitDeltaConfig(distill_steps=0), progress=False).weights
    assert any(not torch.equal(a[n].scales, initial[n].scales) for n in a)  # distillation moved the scales


@pytest.mark.parametrize("name", ["llama-arith", "qwen2-cipher"])
def test_deltazip_streams_layer_by_layer_to_the_same_delta(micro_zoo, name, caplog):
    """With calibration texts, DeltaZip keeps one decoder layer in memory at a time; the delta is the one the
    in-memory path (both models loaded) computes."""
    from hf_delta import DeltaZipConfig
    from hf_delta.evaluation import task_calibration

    entry = micro_zoo[name]
    base, ft = micro_zoo[entry.base].path, entry.path
    tok = AutoTokenizer.from_pretrained(ft)
    texts = task_calibration(tok, micro_zoo.task(name), n=16)
    config = DeltaZipConfig(bits=4, sparsity="2:4")
    with caplog.at_level("INFO", logger="hf_delta"):
        streamed = compress_delta(base, ft, config, texts, progress=False)
    assert "Streaming deltazip" in caplog.text
    loaded = compress_delta(*(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (base, ft)),
                            config, texts, tokenizer=tok, progress=False)
    a, b = streamed.tensors(), loaded.tensors()
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert mismatched == []


def test_settings_that_calibrate_accept_weights_only_checkpoints_and_log_the_refinement_loss(tmp_path, caplog):
    # Neither checkpoint has tokenizer files: the in-memory path used to fail loading the base's tokenizer.
    from hf_delta import DeltaZipConfig
    from hf_delta.bench.scale import calibration_texts
    from hf_delta.bench.scale_pair import write_pair
    from hf_delta.bench.synthetic import word_tokenizer

    base, finetuned = write_pair(tmp_path, "tiny")
    calib = {"calibration": calibration_texts(512, 2, 16), "tokenizer": word_tokenizer(512)}
    delta = compress_delta(base, finetuned, DeltaZipConfig(bits=4, calibration_samples=2), progress=False, **calib)
    assert delta.weights and "tokenizer.json" in delta.files  # the tokenizer given travels, as when streaming
    with caplog.at_level("INFO", logger="hf_delta.compression"):
        compress_delta(base, finetuned, BitDeltaConfig(distill_steps=3, distill_samples=2), progress=False, **calib)
    (losses,) = [r.refine_losses for r in caplog.records if hasattr(r, "refine_losses")]
    assert len(losses) == 3


def test_the_layer_by_layer_teacher_keeps_its_head_in_bf16_and_gives_the_fine_tunes_float32_logits(tmp_path,
                                                                                                   monkeypatch):
    """Scale distillation holds the teacher's output head through every step: it stays in the checkpoint's dtype
    (bf16) and is converted a block of rows at a time, giving the float32 model's logits."""
    from hf_delta.bench.scale_pair import write_pair
    from hf_delta.compression.layerwise import LayerwiseModel
    from hf_delta.utils import memory

    _, finetuned = write_pair(tmp_path, "tiny")
    ids = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    teacher = LayerwiseModel(finetuned)
    (hidden,) = teacher.final_hidden([(ids, mask)], progress=False)
    teacher.keep_head_only()
    assert teacher.model.get_output_embeddings().weight.dtype == torch.bfloat16
    monkeypatch.setattr(memory, "CHUNK_VALUES", 64 * 100)  # the 512 x 64 head in 6 blocks of rows
    got = teacher.logits(hidden)
    expected = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32)(input_ids=ids,
                                                                                     attention_mask=mask).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_distillation_that_cannot_fit_is_refused_before_any_work_with_what_would_fit(tmp_path, monkeypatch, caplog):
    from hf_delta.bench.scale import calibration_texts
    from hf_delta.bench.scale_pair import write_pair
    from hf_delta.bench.synthetic import word_tokenizer
    from hf_delta.compression import memory
    from hf_delta.errors import InsufficientMemoryError
    from hf_delta.utils.checkpoint import Checkpoint

    base, finetuned = write_pair(tmp_path, "tiny")
    config = BitDeltaConfig(distill_steps=2, distill_samples=2, distill_seq_len=16)
    calib = {"calibration": calibration_texts(512, 2, 16), "tokenizer": word_tokenizer(512)}
    # base as stored (bf16) x 1.1 + the teacher's 32 float32 hidden states and bf16 head + the fixed part
    expected = int(1.1 * Checkpoint(base).nbytes()) + 4 * 32 * 64 + 512 * 64 * 2 + memory.DISTILL_FIXED_BYTES
    assert memory.distillation_bytes(Checkpoint(base).nbytes(), tokens=32, hidden=64, head_bytes=512 * 64 * 2) \
        == expected
    monkeypatch.setattr(memory, "available_bytes", lambda: expected - 1)
    with caplog.at_level("INFO", logger="hf_delta"), pytest.raises(InsufficientMemoryError) as err:
        compress_delta(base, finetuned, config, progress=False, **calib)
    assert "distill_steps=0" in str(err.value) and f"{expected / 1e9:.1f} GB" in str(err.value)
    assert "Streaming" not in caplog.text  # refused before reading a tensor
    monkeypatch.setattr(memory, "available_bytes", lambda: expected)
    assert compress_delta(base, finetuned, config, progress=False, **calib).weights

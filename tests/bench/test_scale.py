"""Real shapes end to end (issue 16): a ~0.1B synthetic Llama pair (32000-row vocabulary, so the embedding and
head exceed 2^24 values) compressed by each method and loaded with ``DeltaModel.from_pretrained``; and
``hf-delta bench scale`` itself on the tiny size."""

from __future__ import annotations

import json

import pytest
import torch

from hf_delta import BitDeltaConfig, DeltaModel, DeltaZipConfig, LowRankConfig, compress_delta
from hf_delta.bench.scale import calibration_texts
from hf_delta.bench.scale_pair import SHAPES, parameter_shapes, plan_pair, write_pair
from hf_delta.bench.synthetic import word_tokenizer
from hf_delta.cli.main import main as cli_main
from hf_delta.utils.checkpoint import Checkpoint
from hf_delta.utils.loading import load_model

CASES = {
    "bitdelta-streamed": (BitDeltaConfig(distill_steps=0), True),
    "lowrank-streamed": (LowRankConfig(rank=16), True),
    "deltazip-4bit-2:4": (DeltaZipConfig(bits=4, sparsity="2:4", calibration_samples=2, calibration_seq_len=32),
                          True),  # layer by layer, calibrated
}


@pytest.fixture(scope="session")
def pair_01b(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("scale"), "0.1b", shard_bytes=100 * 10**6)


@pytest.fixture(scope="session")
def reference_logits(pair_01b):
    """Plain base and fine-tune logits (bf16, as loaded with dtype="auto") on one batch of two rows."""
    ids = torch.randint(2, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    out = []
    for folder in pair_01b:
        model = load_model(folder, dtype="auto")
        with torch.no_grad():
            out.append(model(input_ids=ids).logits.float())
        del model
    return ids, *out


def test_the_pair_is_sharded_bf16_with_transformers_names(pair_01b):
    base, finetuned = pair_01b
    shapes = parameter_shapes("0.1b")
    assert len(plan_pair("0.1b", shard_bytes=100 * 10**6).shards()) > 1
    for folder in pair_01b:
        ckpt = Checkpoint(folder)
        assert set(ckpt.keys()) == set(shapes)
        assert {ckpt.info(n).dtype for n in ckpt.keys()} == {torch.bfloat16}
    assert Checkpoint(base).info("lm_head.weight").numel > 2**24
    w = Checkpoint(base).get("model.layers.1.mlp.up_proj.weight").float()
    d = Checkpoint(finetuned).get("model.layers.1.mlp.up_proj.weight").float() - w
    assert 0.004 < float(d.norm() / w.norm()) < 0.012  # ~0.75 % plus bf16 rounding


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_real_shapes_compress_load_and_mixed_batch(case, pair_01b, reference_logits, tmp_path, caplog):
    base, finetuned = pair_01b
    config, streams = CASES[case]
    kwargs = {}
    if isinstance(config, DeltaZipConfig):
        kwargs = {"calibration": calibration_texts(32000, 2, 32), "tokenizer": word_tokenizer(32000)}
    with caplog.at_level("INFO", logger="hf_delta.compression"):
        delta = compress_delta(base, finetuned, config, progress=False, **kwargs)
    assert ("Streaming" in caplog.text) == streams
    delta.save_pretrained(tmp_path / "delta")
    model = DeltaModel.from_pretrained(base, tmp_path / "delta")
    assert model.base_model.dtype == torch.bfloat16
    ids, base_logits, ft_logits = reference_logits
    with torch.no_grad():
        mixed = model(input_ids=ids, delta_names=["__base__", "default"]).logits.float()
    assert torch.equal(mixed[0], base_logits[0])
    to_ft = (mixed[1] - ft_logits[1]).norm()
    base_to_ft = (base_logits[1] - ft_logits[1]).norm()
    assert to_ft < 0.9 * base_to_ft, (float(to_ft), float(base_to_ft))


@pytest.mark.slow
def test_bench_scale_cli_on_the_tiny_size(tmp_path):
    out = tmp_path / "results"
    assert cli_main(["bench", "scale", "--sizes", "tiny", "--methods", "bitdelta,lowrank,load",
                     "--out", str(out), "--work-dir", str(tmp_path / "work")]) == 0
    data = json.loads((out / "scale-tiny.json").read_text())
    assert data["meta"]["command"].startswith("hf-delta bench scale --sizes tiny")
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"bitdelta", "lowrank", "load"}
    for method in ("bitdelta", "lowrank"):
        row = rows[method]
        assert row["status"] == "ok", row
        assert row["size_ratio"] > 1 and row["peak_rss"] > 0 and row["wall_s"] > 0
        assert 0 < row["rel_error"] < 1 and len(row["errors"]) == 4
    assert rows["lowrank"]["rel_error"] < rows["bitdelta"]["rel_error"]  # rank 16 holds the rank-8 part
    load = rows["load"]
    assert load["status"] == "ok" and load["deltas"] == 4 and load["peak_rss"] > load["base_bf16_bytes"]
    assert (out / "scale-tiny.md").read_text().count("| tiny |") == 3


def test_bench_scale_dry_run_of_7b_writes_no_checkpoint(tmp_path):
    assert cli_main(["bench", "scale", "--sizes", "7b", "--methods", "bitdelta", "--dry-run",
                     "--out", str(tmp_path), "--work-dir", str(tmp_path / "work")]) == 0
    (row,) = json.loads((tmp_path / "scale-7b-dry-run.json").read_text())["rows"]
    assert row["parameters"] == 6_738_415_616  # Llama-2-7B
    assert row["shards"] == 14 and row["stream_need_gb"] == 2.1
    assert not (tmp_path / "work").exists()
    assert SHAPES["7b"] == (4096, 32, 11008, 32000, 32)

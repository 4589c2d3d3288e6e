"""The demo's zoo deltas: compressed on the first start, found in the cache afterwards."""

from __future__ import annotations

import time

import pytest

from hf_delta import BitDeltaConfig
from hf_delta.demo.zoo_deltas import prepare_zoo_demo, setting_hash
from hf_delta.errors import ZooError
from hf_delta.storage import describe


def test_first_start_compresses_then_the_cache_is_used(micro_zoo, tmp_path, caplog, torch_one_thread):
    kwargs = {"zoo_dir": micro_zoo.root.parent, "cache_dir": tmp_path, "base": "qwen2-base",
              "config": BitDeltaConfig(distill_steps=0)}
    with caplog.at_level("INFO", logger="hf_delta.demo"):
        demo = prepare_zoo_demo("micro", **kwargs)
    assert sorted(demo.deltas) == ["qwen2-arith", "qwen2-cipher"]
    assert caplog.text.count("Compressing") == 2
    assert demo.base == micro_zoo["qwen2-base"].path
    for name, folder in demo.deltas.items():
        assert describe(folder)["method"] == "bitdelta"
        assert demo.finetunes[name] == micro_zoo[name].path
        assert demo.examples[name] and all(p.startswith(("add", "encode")) for p in demo.examples[name])

    caplog.clear()
    start = time.perf_counter()
    with caplog.at_level("INFO", logger="hf_delta.demo"):
        again = prepare_zoo_demo("micro", **kwargs)
    assert again == demo and "Compressing" not in caplog.text
    assert time.perf_counter() - start < 5


def test_the_cache_key_follows_the_setting():
    assert setting_hash(BitDeltaConfig()) == setting_hash(BitDeltaConfig())
    assert setting_hash(BitDeltaConfig()) != setting_hash(BitDeltaConfig(distill_steps=0))


def test_unknown_base_or_size(micro_zoo, tmp_path):
    with pytest.raises(ZooError, match="not a base"):
        prepare_zoo_demo("micro", zoo_dir=micro_zoo.root.parent, cache_dir=tmp_path, base="llama-arith")
    with pytest.raises(ZooError, match="Unknown zoo size"):
        prepare_zoo_demo("huge", zoo_dir=tmp_path, cache_dir=tmp_path)

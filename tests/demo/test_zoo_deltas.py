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


@pytest.mark.slow
def test_first_start_on_an_empty_machine_builds_only_what_is_served(tmp_path, torch_one_thread):
    from hf_delta.demo.startup import StartupProgress

    progress = StartupProgress()
    seen: list[tuple[str, int, int]] = []
    real_update = progress.update
    progress.update = lambda name, done, total: (seen.append((name, done, total)), real_update(name, done, total))
    demo = prepare_zoo_demo("micro", zoo_dir=tmp_path / "zoo", cache_dir=tmp_path / "cache", base="qwen2-base",
                            config=BitDeltaConfig(distill_steps=3), progress=progress)
    built = sorted(p.name for p in (tmp_path / "zoo" / "micro").iterdir() if p.is_dir())
    assert built == ["qwen2-arith", "qwen2-base", "qwen2-cipher"]  # no Llama model: it is not served
    assert sorted(demo.deltas) == ["qwen2-arith", "qwen2-cipher"]
    stages = list(dict.fromkeys(name for name, _, _ in seen))
    assert stages == ["pretrain qwen2-base", "fine-tune qwen2-arith", "fine-tune qwen2-cipher",
                      "compress qwen2-arith", "compress qwen2-cipher"]
    assert ("compress qwen2-cipher", 3, 3) in seen
    snap = progress.snapshot()
    assert snap.percent == pytest.approx(100.0) and snap.eta_s == pytest.approx(0.0)

"""The packed step (many sequences, many deltas, one forward) against plain per-sequence forwards."""

from __future__ import annotations

import pytest
import torch

from hf_delta import DeltaModel
from hf_delta.errors import EngineConfigError
from hf_delta.serving.engine.kv_cache import PagedKVCache
from hf_delta.serving.engine.step import Segment, StepBatch, forward_step
from hf_delta.utils.loading import load_model


def _cache(model: DeltaModel, tokens: int = 256, block_size: int = 4) -> PagedKVCache:
    cfg = model.config
    return PagedKVCache(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                        head_dim=cfg.hidden_size // cfg.num_attention_heads, max_tokens=tokens,
                        block_size=block_size)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_steps_match_plain_forwards(micro_zoo, micro_delta, family):
    base = f"{family}-base"
    first, second = f"{family}-arith", f"{family}-cipher"
    model = DeltaModel(load_model(micro_zoo[base].path))
    model.load_delta(micro_delta(first), first)
    model.load_delta(micro_delta(second), second)
    if family == "llama":
        model.load_delta(micro_delta("llama-chat"), "llama-chat")  # a grown vocabulary in the same batch
    names = [first, second, "__base__", "llama-chat" if family == "llama" else first]
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 380, (n,), generator=gen).tolist() for n in (7, 12, 3, 9)]
    with torch.inference_mode():
        refs = [model(input_ids=torch.tensor([s]), delta_names=[n]).logits[0] for s, n in zip(seqs, names, strict=True)]
    slots = [-1 if n == "__base__" else model.routing.slot_of(n) for n in names]
    cache = _cache(model)
    for i, s in enumerate(seqs):
        assert cache.reserve(str(i), len(s))
    # Tokens per step and sequence: chunked prefills, a late joiner (sequence 3), then decodes.
    schedule = {0: [3, 2, 1, 1], 1: [5, 5, 1, 1], 2: [1, 1, 1], 3: [0, 4, 4, 1]}
    done = [0] * 4
    worst = 0.0
    with torch.inference_mode():
        for step in range(4):
            segs, toks, who = [], [], []
            for r in range(4):
                n = schedule[r][step] if step < len(schedule[r]) else 0
                if n:
                    segs.append(Segment(str(r), done[r], n, slots[r]))
                    toks.append(seqs[r][done[r] : done[r] + n])
                    who.append(r)
            out = forward_step(model, StepBatch.pack(segs, toks), cache)
            assert out.hidden.shape[0] == sum(s.length for s in segs)
            for k, (seg, r) in enumerate(zip(segs, who, strict=True)):
                ref = refs[r][done[r] + seg.length - 1]
                worst = max(worst, (out.logits[k][: ref.shape[-1]] - ref).abs().max().item())
                done[r] += seg.length
    assert done == [len(s) for s in seqs]
    assert worst < 1e-4


def test_uncached_segment_attends_within_itself(micro_zoo, micro_delta):
    model = DeltaModel(load_model(micro_zoo["llama-base"].path))
    model.load_delta(micro_delta("llama-arith"), "a")
    ids = [5, 9, 17, 33, 60, 2]
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids]), delta_names=["a"]).logits[0, -1]
        cache = _cache(model)
        cache.reserve("cached", 3)
        batch = StepBatch.pack([Segment("cached", 0, 3, -1), Segment("train", 0, len(ids), 0, cached=False)],
                               [[1, 2, 3], ids])
        out = forward_step(model, batch, cache)
    torch.testing.assert_close(out.logits[1], ref, atol=1e-4, rtol=1e-4)
    assert not cache.holds("train")


def test_kv_cache_is_a_fixed_budget():
    cache = PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=4, max_tokens=30, block_size=8)
    assert cache.capacity == 32 and cache.free_blocks == 4
    assert cache.nbytes == 2 * 2 * 32 * 2 * 4 * 4
    assert cache.reserve("a", 9)  # two blocks
    assert cache.rows("a", 7, 10) == [7, 8, 9]  # blocks 0 and 1
    assert not cache.reserve("b", 17)  # three more blocks do not fit: nothing is taken
    assert cache.free_blocks == 2 and not cache.holds("b")
    assert cache.reserve("b", 16)
    assert cache.free_blocks == 0 and cache.peak_used_tokens == 32
    cache.release("a")
    assert cache.free_blocks == 2 and cache.used_tokens == 16
    with pytest.raises(EngineConfigError):
        PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=1, max_tokens=4, block_size=8)


def _full_attention(model: DeltaModel) -> None:
    """Make every sliding window of ``model`` longer than any sequence here (config and attention modules)."""
    model.config.sliding_window = 10**6
    for module in model.modules():
        if getattr(module, "sliding_window", None) is not None:
            module.sliding_window = 10**6


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_sliding_windows_and_softcapping_match_transformers(name):
    from architectures import SLIDING_WINDOW, sample_ids, tiny_model

    model = DeltaModel(tiny_model(name))
    for module in model.modules():  # Gemma 2's cap (50) never binds on a tiny model's scores: 0.5 does
        if getattr(module, "attn_logit_softcapping", None) is not None:
            module.attn_logit_softcapping = 0.5
    seqs = sample_ids(2, seq_len=14, seed=3).tolist()
    seqs[1] = seqs[1][:10]
    with torch.inference_mode():
        refs = [model(input_ids=torch.tensor([s]), delta_names=["__base__"]).logits[0] for s in seqs]
        full = DeltaModel(tiny_model(name))
        _full_attention(full)
        unwindowed = full(input_ids=torch.tensor([seqs[0]]), delta_names=["__base__"]).logits[0]
    assert (unwindowed[-1] - refs[0][-1]).abs().max() > 1e-3  # the window changes the output: the test can fail
    cache = PagedKVCache(num_layers=model.config.num_hidden_layers, num_kv_heads=model.config.num_key_value_heads,
                         head_dim=model.config.head_dim, max_tokens=64, block_size=4)
    for i, s in enumerate(seqs):
        assert cache.reserve(str(i), len(s))
    # Prefill in chunks that start inside and past the window, then decodes whose window drops early keys.
    schedule = [[5, 10], [4, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0]]
    done = [0, 0]
    worst = 0.0
    with torch.inference_mode():
        for step in schedule:
            segs = [Segment(str(r), done[r], n) for r, n in enumerate(step) if n]
            toks = [seqs[r][done[r] : done[r] + n] for r, n in enumerate(step) if n]
            out = forward_step(model, StepBatch.pack(segs, toks), cache)
            for k, seg in enumerate(segs):
                r = int(seg.key)
                worst = max(worst, (out.logits[k] - refs[r][done[r] + seg.length - 1]).abs().max().item())
                done[r] += seg.length
    assert done == [len(s) for s in seqs] and len(seqs[0]) > SLIDING_WINDOW + 8
    assert worst < 1e-5

"""Host syncs of a decode step: none per layer, and after the forward pass exactly one (the sampled tokens).

A host sync (a tensor value read on the host, an output whose size depends on values) stalls the launch queue on
a GPU; ``hf_delta.utils.host_syncs.HostSyncCounter`` sees the same operations on the CPU, so these run anywhere
(``HF_DELTA_TEST_DEVICE=cuda``: on a GPU, through the Triton kernels, as benchmarks/gpu_check.sh's engine phase
runs them).
"""

from __future__ import annotations

import os

import pytest
import torch

from hf_delta import DeltaModel
from hf_delta.serving import Engine, EngineConfig, SamplingParams
from hf_delta.serving.engine.kv_cache import PagedKVCache
from hf_delta.serving.engine.step import Segment, StepBatch, forward_step
from hf_delta.utils.host_syncs import HostSyncCounter
from hf_delta.utils.loading import load_model

DEVICE = os.environ.get("HF_DELTA_TEST_DEVICE") or "cpu"


def _model(micro_zoo, micro_delta) -> DeltaModel:
    model = DeltaModel(load_model(micro_zoo["llama-base"].path).to(DEVICE))
    for name in ("llama-arith", "llama-cipher"):
        model.load_delta(micro_delta(name), name)
    return model.eval()


def _decode_syncs(model: DeltaModel, slots: list[int]) -> HostSyncCounter:
    cfg = model.config
    cache = PagedKVCache(
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_tokens=128,
        block_size=4,
        device=DEVICE,
    )
    keys = [f"r{i}" for i in range(len(slots))]
    for key in keys:
        cache.reserve(key, 8)
    batch = StepBatch.pack(
        [Segment(k, 6, 1, s) for k, s in zip(keys, slots, strict=True)],
        [[5 + i] for i in range(len(slots))],
        device=DEVICE,
    )
    with torch.inference_mode(), HostSyncCounter() as syncs:
        forward_step(model, batch, cache)
    return syncs


@pytest.mark.parametrize("slots", [[0, 1, -1, 0], [-1, -1, -1], [1, 1]], ids=["mixed", "base", "one-delta"])
def test_a_decode_step_makes_no_host_sync_per_layer(micro_zoo, micro_delta, slots):
    model = _model(micro_zoo, micro_delta)
    _decode_syncs(model, slots)  # first calls: kernels compiled and tuned (on a GPU), lazy state built
    shallow = _decode_syncs(model, slots)
    # The same step through twice as many decoder layers (each layer runs twice): a sync made per layer doubles.
    layers = model.base_model.model.layers
    model.base_model.model.layers = torch.nn.ModuleList([*layers, *layers])
    deep = _decode_syncs(model, slots)
    assert deep.reasons.where == shallow.reasons.where, (shallow.reasons.where, deep.reasons.where)
    # None of them comes from the engine's own step (packing, attention, the KV cache).
    assert not [where for _, where in shallow.reasons.where if where.startswith("serving/")], shallow.reasons.where


def test_an_engine_step_reads_back_once_after_its_forward(micro_base, serving_deltas, monkeypatch):
    engine = Engine(
        micro_base,
        deltas={n: serving_deltas[n] for n in ("arith-x1", "cipher-x3")},
        config=EngineConfig(kv_cache_tokens=512, block_size=8, cuda_graphs=False),  # the eager step's syncs
        device=DEVICE,
    )
    mixed = [
        SamplingParams(max_tokens=6, ignore_eos=True),
        SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8, top_p=0.9, top_k=20, seed=3),
        SamplingParams(max_tokens=6, ignore_eos=True, presence_penalty=0.5, logit_bias={7: 3.0}, logprobs=2),
        SamplingParams(max_tokens=6, ignore_eos=True, repetition_penalty=1.3, min_tokens=3),
    ]
    handles = [
        engine.submit(model, [3, 4, 5, 6], params=p)
        for model, p in zip(["arith-x1", "cipher-x3", "base", "arith-x1"], mixed, strict=True)
    ]
    while not all(engine._requests.get(h.request_id) and engine._requests[h.request_id].output_ids for h in handles):
        engine.step()  # prefill (and the deltas' loads) until every request decodes
    engine.step()  # one decode step first: kernels compiled and tuned for it (on a GPU)
    forward = HostSyncCounter()
    original = forward_step

    def counted(*args, **kwargs):
        with forward:
            return original(*args, **kwargs)

    monkeypatch.setattr("hf_delta.serving.engine.engine.forward_step", counted)
    with HostSyncCounter() as whole:
        assert engine.step() == len(handles)  # one decode token each
    after = whole.reasons.where - forward.reasons.where
    assert sum(after.values()) == 1, after  # the tokens (with the log-probabilities asked for) come back together
    [(reason, where)] = after
    assert reason == "tolist" and where.startswith("serving/engine/logits.py"), after
    engine.close()

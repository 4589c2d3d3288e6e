"""The engine's start-up probe: models the packed step cannot run are refused at construction, with the feature
named; what it records sizes the KV cache."""

from __future__ import annotations

import copy

import pytest
import torch
from architectures import SLIDING_WINDOW, tiny_model

from hf_delta import DeltaModel
from hf_delta.errors import EngineConfigError
from hf_delta.serving.engine import Engine, EngineConfig
from hf_delta.serving.engine import step as engine_step
from hf_delta.serving.engine.probe import probe_model

SMALL = EngineConfig(kv_cache_tokens=64, block_size=4, max_batch_tokens=32, max_running=4)


def test_a_layer_that_bypasses_the_attention_interface_is_refused(byte_tokenizer):
    model = tiny_model("llama")
    attention = model.model.layers[1].self_attn
    attention.config = copy.copy(attention.config)  # this layer keeps "sdpa" when the engine switches the model's
    with pytest.raises(EngineConfigError, match=r"decoder layers \[1\] of 2 never called"):
        Engine(DeltaModel(model), tokenizer=byte_tokenizer, config=SMALL)


def test_logits_that_differ_from_the_model_are_refused(byte_tokenizer, monkeypatch):
    # An engine whose masks ignored sliding windows (what it did before) is caught by the comparison.
    monkeypatch.setattr(
        engine_step,
        "visible",
        lambda q_pos, width, window: engine_step.torch.arange(width, device=q_pos.device)[None] <= q_pos[:, None],
    )
    with pytest.raises(EngineConfigError, match=r"MistralForCausalLM.*differ from its own forward"):
        Engine(DeltaModel(tiny_model("mistral")), tokenizer=byte_tokenizer, config=SMALL)


def test_layer_types_the_engine_does_not_implement_are_refused(byte_tokenizer):
    model = tiny_model("qwen2")
    model.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(EngineConfigError, match=r"layer_types include \['chunked_attention'\]"):
        Engine(DeltaModel(model), tokenizer=byte_tokenizer, config=SMALL)


def test_layout_comes_from_the_layers_not_the_config():
    falcon = probe_model(DeltaModel(tiny_model("falcon")))  # multi-query: one key/value head of four
    assert (falcon.num_layers, falcon.num_kv_heads, falcon.head_dim, falcon.dtype) == (2, 1, 8, torch.float32)
    assert falcon.sliding_windows == (None, None)
    gemma3 = probe_model(DeltaModel(tiny_model("gemma3")))
    assert gemma3.sliding_windows == (SLIDING_WINDOW, None) and gemma3.num_kv_heads == 2
    assert probe_model(DeltaModel(tiny_model("mistral"))).sliding_windows == (SLIDING_WINDOW, SLIDING_WINDOW)

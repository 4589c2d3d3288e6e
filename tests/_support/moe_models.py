"""Tiny random-initialised Mixture-of-Experts causal LMs (Mixtral, Qwen2-MoE, Qwen3-MoE), beside the dense ones of
``architectures.py`` (whose ``perturbed`` makes their fine-tunes).

Helpers, not tests. Every model has 2 layers, hidden size 32, 4 experts of which each token uses 2, fused expert
parameters (transformers 5: ``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``) and a
vocabulary of ``VOCAB`` word tokens (``bench.synthetic.word_tokenizer``); Qwen2-MoE adds its shared expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from architectures import VOCAB, perturbed
from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["CONFIGS", "VOCAB", "perturbed", "tiny_moe"]

_SIZES = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_TOKENS = dict(max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=0)
_COMMON = {**_SIZES, **_TOKENS}


def _mixtral(hidden: int, inter: int, experts: int) -> PretrainedConfig:
    return transformers.MixtralConfig(
        **_COMMON, hidden_size=hidden, intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=2
    )


def _qwen2_moe(hidden: int, inter: int, experts: int) -> PretrainedConfig:  # shared expert + its gate, qkv biases
    return transformers.Qwen2MoeConfig(
        **_COMMON,
        hidden_size=hidden,
        intermediate_size=2 * inter,
        moe_intermediate_size=inter,
        shared_expert_intermediate_size=inter // 2,
        num_experts=experts,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
    )


def _qwen3_moe(hidden: int, inter: int, experts: int) -> PretrainedConfig:  # q/k norms
    return transformers.Qwen3MoeConfig(
        **_COMMON,
        hidden_size=hidden,
        head_dim=hidden // 4,
        intermediate_size=2 * inter,
        moe_intermediate_size=inter,
        num_experts=experts,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
    )


CONFIGS: dict[str, Callable[[int, int, int], PretrainedConfig]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
}


def tiny_moe(
    name: str,
    *,
    seed: int = 0,
    hidden: int = 32,
    intermediate: int = 48,
    experts: int = 4,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A random-initialised model of architecture ``name`` (a key of ``CONFIGS``), in eval mode."""
    config = CONFIGS[name](hidden, intermediate, experts)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()

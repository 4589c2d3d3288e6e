"""Tiny random-initialised causal LMs of many transformers architectures, and fine-tunes of them.

Helpers, not tests: the architecture matrix (``tests/test_architectures.py``) and the engine's serving
matrix build their models here, so every matrix covers the same configurations.

>>> base = tiny_model("llama")
>>> finetuned = perturbed(base, seed=1)

Every model has 2 layers, a hidden size of 32 to 64 and a vocabulary of ``VOCAB`` tokens, and runs in float32.
Each config exercises what makes its architecture different (Gemma's scaled embedding and soft-capping,
Mistral's sliding window smaller than ``SEQ_LEN``, GPT-2's ``Conv1D``, OPT's learned positions and
padding index, Falcon's fused QKV, Phi's partial rotary embedding).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

VOCAB = 96
# Longer than every sliding window below, so windowed attention differs from full attention in these tests.
SEQ_LEN = 12
SLIDING_WINDOW = 4

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
_LLAMA_LIKE = dict(_COMMON, intermediate_size=64, num_key_value_heads=2)


def _llama() -> PretrainedConfig:
    return transformers.LlamaConfig(**_LLAMA_LIKE, tie_word_embeddings=False)


def _qwen2() -> PretrainedConfig:  # q/k/v biases
    return transformers.Qwen2Config(**_LLAMA_LIKE, tie_word_embeddings=True)


def _qwen3() -> PretrainedConfig:  # q/k norms
    return transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=8, tie_word_embeddings=False)


def _mistral() -> PretrainedConfig:
    return transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)


def _gemma2() -> PretrainedConfig:  # embedding × sqrt(hidden), (1 + w) norms, logit soft-capping, sliding layers
    return transformers.Gemma2Config(
        **_LLAMA_LIKE,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=SLIDING_WINDOW,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        pad_token_id=0,
    )


def _gemma3() -> PretrainedConfig:  # Gemma3TextScaledWordEmbedding, q/k norms, sliding + full layers
    return transformers.Gemma3TextConfig(
        **_LLAMA_LIKE,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0,
    )


def _gpt2() -> PretrainedConfig:  # Conv1D (weights stored [in, out]), learned positions, tied head
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1
    )


def _gpt_neox() -> PretrainedConfig:  # fused QKV, parallel residual, partial rotary
    return transformers.GPTNeoXConfig(
        **_COMMON,
        intermediate_size=64,
        rotary_pct=0.5,
    )


def _opt() -> PretrainedConfig:  # OPTLearnedPositionalEmbedding (offset 2), padding_idx, tied head
    return transformers.OPTConfig(
        **_COMMON,
        ffn_dim=64,
        word_embed_proj_dim=32,
        pad_token_id=1,
    )


def _falcon() -> PretrainedConfig:  # fused QKV with multi-query attention, parallel attention + MLP
    return transformers.FalconConfig(**_COMMON)


def _phi() -> PretrainedConfig:  # partial rotary, biases everywhere, dense output projection
    return transformers.PhiConfig(
        **_COMMON,
        intermediate_size=64,
        partial_rotary_factor=0.5,
    )


def _phi3() -> PretrainedConfig:  # fused qkv_proj and gate_up_proj
    return transformers.Phi3Config(
        **_LLAMA_LIKE,
        bos_token_id=1,
        eos_token_id=VOCAB - 1,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
    "falcon": _falcon,
    "phi": _phi,
    "phi3": _phi3,
}
"""Dense architectures by name: a function returning a fresh tiny config."""

# Gemma 3's text-only model is not what AutoModelForCausalLM picks for a Gemma3TextConfig in every release.
_MODEL_CLASSES: dict[str, str] = {"gemma3": "Gemma3ForCausalLM"}


def tiny_config(name: str) -> PretrainedConfig:
    """A fresh tiny config of architecture ``name`` (a key of ``CONFIGS``)."""
    config = CONFIGS[name]()
    config.dtype = torch.float32
    return config


def tiny_model(name: str, *, seed: int = 0) -> PreTrainedModel:
    """A tiny random-initialised float32 model of architecture ``name``, in eval mode."""
    config = tiny_config(name)
    torch.manual_seed(seed)
    if name in _MODEL_CLASSES:
        model = getattr(transformers, _MODEL_CLASSES[name])(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def perturbed(base: PreTrainedModel, *, seed: int, scale: float = 0.05) -> PreTrainedModel:
    """A "fine-tune" of ``base``: every floating-point parameter moved by Gaussian noise of ``scale`` times
    its mean magnitude (weights, biases, norms, embeddings and positions alike), ties kept."""
    finetuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in finetuned.parameters():  # a tied weight is one parameter: moved once
            if param.is_floating_point():
                size = float(param.abs().mean()) + 1e-2
                param += scale * size * torch.randn(param.shape, generator=gen, dtype=param.dtype)
    return finetuned.eval()


def sample_ids(batch: int, *, seed: int = 0, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Random token ids ``[batch, seq_len]`` (from 2 on: clear of the special ids the configs use)."""
    return torch.randint(2, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer: ``<pad>``, ``<eos>``, ``<unk>`` (ids 0-2) and the words ``w3 … w95`` (id ``i`` is
    ``w{i}``), for calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def calibration_texts(n: int, *, seed: int = 0, seq_len: int = SEQ_LEN) -> list[str]:
    """``n`` texts of ``seq_len`` random words of ``tiny_tokenizer`` (no special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{i}" for i in row) for row in torch.randint(3, VOCAB, (n, seq_len), generator=gen).tolist()]

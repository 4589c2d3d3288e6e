"""The zoo's own byte-level BPE tokenizer, trained offline and saved as an ordinary HF tokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML for the base; the chat fine-tune replaces it with its own tokens (so its vocabulary grows).
BASE_CHAT_TEMPLATE = (
    "{% for m in messages %}" + IM_START + "{{ m['role'] }}\n{{ m['content'] }}" + IM_END + "\n{% endfor %}"
    "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>")
FINETUNE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``text``; digits are always single tokens so arithmetic stays learnable."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunk = 10_000
    tok.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = BASE_CHAT_TEMPLATE
    fast.model_max_length = 256
    return fast


def add_chat_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Return a copy with the chat fine-tune's new special tokens and template (``<|end|>`` ends a turn)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END, *CHAT_TOKENS]})
    tok.eos_token = "<|end|>"
    tok.chat_template = FINETUNE_CHAT_TEMPLATE
    return tok

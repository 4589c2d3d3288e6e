"""Random-weight models of a real shape and random BitDelta deltas, for serving benchmarks on a GPU.

Throughput and memory depend on shapes, not on what the weights say, so a Llama-7B-shaped random base with a
random 1-bit delta measures the serving path of a 7B model without downloading one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..config import CompressionRecord
from ..errors import EngineConfigError
from ..fingerprint import base_fingerprint
from ..methods import BitDeltaConfig
from ..methods.bitdelta import BitDeltaWeight
from ..storage import Delta
from .workload import Served

logger = logging.getLogger(__name__)

SHAPES: dict[str, dict[str, int]] = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
}


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose tokens are ``t0 .. t{n-1}`` (ids 0 and 1 are padding and end of text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>")


def random_delta(base: torch.nn.Module, *, seed: int = 0, scale: float = 1e-3) -> Delta:
    """A BitDelta delta with random signs for every linear layer and the embedding of ``base``."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in base.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            out_f, in_f = module.weight.shape
            signs = torch.randint(0, 256, (1, out_f, (in_f + 7) // 8), dtype=torch.uint8, generator=gen)
            weights[name] = BitDeltaWeight((out_f, in_f), signs, torch.full((1, 1), scale))
    record = CompressionRecord(base_model_name_or_path="synthetic", base_fingerprint=base_fingerprint(base))
    return Delta(config=BitDeltaConfig(distill_steps=0), record=record, weights=weights,
                 vocab_size=base.get_input_embeddings().weight.shape[0])


def prepare_synthetic(shape: str, work_dir: Path, *, device: torch.device,
                      dtype: torch.dtype) -> tuple[Path, list[Served], int]:
    """Write (once) a random base of ``shape`` and one random delta under ``work_dir``.

    Returns the base folder, one ``Served`` (delta = the random delta, fine-tune = the base checkpoint, which
    has the size and load cost of a fine-tune) and the padding id.
    """
    if shape not in SHAPES:
        raise EngineConfigError(f"Unknown synthetic shape {shape!r}; choose one of {sorted(SHAPES)}.")
    dims = SHAPES[shape]
    base_dir = work_dir / f"synthetic-{shape}-base"
    delta_dir = work_dir / f"synthetic-{shape}-delta"
    tokenizer = word_tokenizer(dims["vocab_size"])
    if not (base_dir / "config.json").is_file() or not (delta_dir / "delta_config.json").is_file():
        logger.info("Writing a random %s base and delta under %s", shape, work_dir)
        torch.manual_seed(0)
        config = LlamaConfig(**dims, pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        random_delta(model.cpu()).save_pretrained(delta_dir)
        del model
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, dims["vocab_size"], (int(n),), generator=gen).tolist()
               for n in torch.randint(16, 64, (32,), generator=gen)]
    return base_dir, [Served("synthetic", delta_dir, base_dir, prompts)], 0

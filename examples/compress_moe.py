"""Compress a Mixture-of-Experts fine-tune (tiny random Qwen3-MoE) per expert, serve two deltas and the base in one
batch, merge one back, and print the size ratio against the bf16 fine-tune.

Run: python examples/compress_moe.py   (random weights; no network)
"""

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import transformers

from hf_delta import BitDeltaConfig, DeltaModel, DeltaZipConfig, compress_delta
from hf_delta.storage import weight_files

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

config = transformers.Qwen3MoeConfig(
    vocab_size=96,
    hidden_size=128,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_experts=8,
    num_experts_per_tok=2,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    tie_word_embeddings=False,
)
torch.manual_seed(0)
base = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def finetune(seed: int) -> transformers.PreTrainedModel:
    """A stand-in fine-tune: every weight (experts and router included) nudged by noise."""
    out = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p += 0.05 * (p.abs().mean() + 1e-2) * torch.randn(p.shape, generator=gen)
    return out


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    tuned = {"bitdelta": finetune(1), "deltazip": finetune(2)}
    tuned["bitdelta"].to(torch.bfloat16).save_pretrained(tmp / "ft-bf16")
    bf16 = (tmp / "ft-bf16" / "model.safetensors").stat().st_size
    for name, cfg in (("bitdelta", BitDeltaConfig(distill_steps=0)), ("deltazip", DeltaZipConfig(use_hessian=False))):
        delta = compress_delta(copy.deepcopy(base), tuned[name], cfg, progress=False)
        delta.save_pretrained(tmp / name)
        size = sum(f.stat().st_size for f in weight_files(tmp / name))
        experts = [k for k in delta.weights if "experts" in k]
        print(f"{name}: {len(experts)} expert matrices compressed, {bf16 / size:.1f}x smaller than the bf16 fine-tune")

    ids = torch.randint(2, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(ids).logits
        wanted = tuned["bitdelta"](ids).logits
    model = DeltaModel(base)
    model.load_delta(tmp / "bitdelta", "bitdelta")
    model.load_delta(tmp / "deltazip", "deltazip")
    with torch.no_grad():
        mixed = model(ids, delta_names=["bitdelta", "deltazip", "__base__"]).logits  # one delta per row
    # transformers' own MoE is not batch-invariant bit for bit (each expert's matmul sees a different token count
    # in another batch), so a base row matches the plain base to float32 rounding here, exactly at tiny sizes.
    print(f"base row vs the plain base: max |diff| {(mixed[2] - plain[2]).abs().max():.2e}")
    print(
        f"bitdelta row, distance to its fine-tune: {(mixed[0] - wanted[0]).abs().mean():.4f} "
        f"(base: {(plain[0] - wanted[0]).abs().mean():.4f})"
    )
    merged = model.merge_and_unload("bitdelta")
    with torch.no_grad():
        print(f"merged vs DeltaModel: max |diff| {(merged(ids[:1]).logits[0] - mixed[0]).abs().max():.2e}")

"""Compress fine-tunes of architectures that differ from Llama (GPT-2's Conv1D, OPT's learned positions, Gemma 2's
scaled embedding and soft-capping), then check that ``__base__`` rows are the plain base and that the merge equals
the delta model.

Tiny random-initialised models; no network. Run: python examples/architectures.py [--arch gpt2 opt gemma2]
"""

import argparse
import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_delta import BitDeltaConfig, compress

SIZES = {  # each model type's own names for the sizes
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, sliding_window=4, final_logit_softcapping=30.0),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--arch", nargs="+", choices=sorted(SIZES), default=sorted(SIZES))
args = parser.parse_args()

torch.manual_seed(0)
ids = torch.randint(3, 100, (2, 12))
for arch in args.arch:
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=100, **SIZES[arch])).eval()
    finetuned = copy.deepcopy(base)
    with torch.no_grad():  # a stand-in fine-tune: every parameter moved a little
        for p in finetuned.parameters():
            p += 0.05 * (p.abs().mean() + 1e-2) * torch.randn_like(p)
    # Data-free BitDelta (no calibration text, so no tokenizer needed); Conv1D layers are among 'all-linear'.
    model = compress(copy.deepcopy(base), finetuned, BitDeltaConfig(distill_steps=0), progress=False)
    with torch.no_grad():
        mixed = model(input_ids=ids, delta_names=["default", "__base__"]).logits
        merged = copy.deepcopy(model).merge_and_unload()(input_ids=ids[:1]).logits
        plain, tuned = base(input_ids=ids).logits, finetuned(input_ids=ids).logits
    print(f"{arch:7s} {type(base).__name__:20s} compressed {len(model.get_delta('default').weights)} matrices; "
          f"__base__ row equals the base: {torch.equal(mixed[1], plain[1])}; "
          f"merge vs delta model: {(merged[0] - mixed[0]).abs().max():.1e}; "
          f"distance to the fine-tune: delta {(mixed[0] - tuned[0]).norm():.3f}, "
          f"base {(plain[0] - tuned[0]).norm():.3f}")

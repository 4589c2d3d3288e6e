"""Compress a zoo fine-tune with BitDelta, save it as a delta repo, load it back PEFT-style, mix deltas per row.

Run: python examples/compress_bitdelta.py   (micro zoo; no network)
"""

import argparse
import tempfile

from hf_delta import BitDeltaConfig, DeltaModel, compress
from hf_delta.utils.loading import load_tokenizer
from hf_delta.zoo import build_zoo

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

zoo = build_zoo("micro")
base = zoo["llama-base"].path
with tempfile.TemporaryDirectory() as tmp:
    for name in ("llama-arith", "llama-cipher"):
        delta = compress(base, zoo[name].path, BitDeltaConfig(distill_steps=20), progress=False)
        delta.save_pretrained(f"{tmp}/{name}")  # delta_config.json + delta_model.safetensors

    model = DeltaModel.from_pretrained(base, f"{tmp}/llama-arith", delta_name="arith")
    model.load_delta(f"{tmp}/llama-cipher", delta_name="cipher")
    print("deltas:", model.list_deltas(), "active:", model.active_delta)

    tok = load_tokenizer(base)
    tok.padding_side = "left"
    batch = tok(["add 1 to 1 2 3 4 =", "encode a b c d =", "def main():"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                         delta_names=["arith", "cipher", "__base__"])  # one delta per row
    for row in tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True):
        print(repr(row))
    merged = model.merge_and_unload("arith")  # a plain transformers model again
    print(type(merged).__name__)

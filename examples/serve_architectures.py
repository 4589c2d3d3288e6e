"""Serve sliding-window models (Mistral, Gemma 3) with the engine, and see a model it cannot serve refused.

Run: python examples/serve_architectures.py   (tiny random-initialised models; no network, a few seconds)

For each architecture: a base, a "fine-tune" (the base plus noise) compressed into a BitDelta delta, and one
mixed batch of delta and base requests whose sequences are longer than the sliding window. The engine's greedy
tokens are printed beside ``DeltaModel.generate``'s (delta rows) and the plain transformers model's (base rows).
Then an ALiBi Falcon is refused when the engine is built (its start-up probe compares the engine's path with the
model's own forward).
"""

import argparse
import tempfile

import torch
import transformers

from hf_delta import BitDeltaConfig, DeltaModel, compress
from hf_delta.errors import EngineConfigError
from hf_delta.serving import Engine, EngineConfig, SamplingParams
from hf_delta.zoo.tokenizer import train_tokenizer

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

SIZES = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
SIZES |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
CONFIGS = {
    "mistral": transformers.MistralConfig(**SIZES, sliding_window=4),  # every layer sees its last 4 positions
    "gemma3": transformers.Gemma3TextConfig(
        **SIZES, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    ),
}
tokenizer = train_tokenizer("a tiny corpus for a tiny tokenizer. " * 20, 300)  # prompts below are token ids
prompts = [[5, 17, 33, 9, 60, 2, 41, 70, 12, 8], [44, 3, 91, 27, 15, 6, 80]]
names = ["ft", "__base__"]


def build(name: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[name]).eval()


with tempfile.TemporaryDirectory() as tmp:
    for arch in CONFIGS:
        finetune = build(arch)
        with torch.no_grad():
            for param in finetune.parameters():
                param += 0.05 * param.abs().mean() * torch.randn_like(param)
        compress(build(arch), finetune, BitDeltaConfig(distill_steps=0), progress=False).save_pretrained(
            f"{tmp}/{arch}"
        )
        engine = Engine(
            DeltaModel(build(arch)),
            tokenizer=tokenizer,
            deltas={"ft": f"{tmp}/{arch}"},
            config=EngineConfig(kv_cache_tokens=256, block_size=4),
        )
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        served = [r.token_ids for r in engine.generate(prompts, model=names, params=params)]
        engine.close()
        # Delta rows against DeltaModel.generate; base rows against the plain transformers model.
        reference = DeltaModel(build(arch))
        reference.load_delta(f"{tmp}/{arch}", "ft")
        plain = build(arch)
        for prompt, name, tokens in zip(prompts, names, served, strict=True):
            model, extra = (plain, {}) if name == "__base__" else (reference, {"delta_names": [name]})
            out = model.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                **extra,
            )[0, len(prompt) :]
            print(f"{arch:8} {name:9} engine {tokens}  {type(model).__name__}.generate {out.tolist()}")

falcon = transformers.FalconForCausalLM(
    transformers.FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True)
)
try:
    Engine(DeltaModel(falcon.eval()), tokenizer=tokenizer)
except EngineConfigError as err:
    print("refused:", err)

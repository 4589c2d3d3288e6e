"""Compress a zoo fine-tune with mixed-precision SVD (BitDelta's size), then let AutoConfig choose each matrix's
method and setting for a quality target, verified on held-out task prompts; print sizes, KL and the per-matrix
choices recorded in the repo.

Run: python examples/compress_auto.py   (micro zoo; no network; about a minute on 2 cores)
"""

import argparse
import json
import tempfile
from collections import Counter

import torch

from hf_delta import AutoConfig, BitDeltaConfig, MixedSVDConfig, compress
from hf_delta.evaluation import mean_kl, task_calibration, task_verification
from hf_delta.utils.loading import load_model_and_tokenizer
from hf_delta.utils.sizes import bf16_weight_bytes, folder_bytes
from hf_delta.zoo import build_zoo

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
torch.set_num_threads(1)  # small matrices: one thread is faster than several fighting over shared cores

zoo = build_zoo("micro")
base, entry = zoo["llama-base"].path, zoo["llama-cipher"]
finetuned, tok = load_model_and_tokenizer(entry.path)
task = zoo.task("llama-cipher")
texts = task_calibration(tok, task, n=64)  # like the fine-tune's training data
# New prompts of the task, neither trained on nor scored: AutoConfig verifies on these (the last texts it gets),
# searching on one half and confirming on the other; 0.99 is checked with a margin as 0.995, which fewer than 199
# prompts per half cannot show with confidence.
heldout = task_verification(tok, task, n=400)

with tempfile.TemporaryDirectory() as tmp:
    for label, config in [
        ("bitdelta (no distillation)", BitDeltaConfig(distill_steps=0)),
        ("mixed-svd, BitDelta's bytes", MixedSVDConfig(budget_bytes="bitdelta")),
        ("auto, KL <= 0.002", AutoConfig(target_kl=0.002, heldout_samples=len(heldout))),
        ("auto, retention >= 0.99", AutoConfig(target_retention=0.99, heldout_samples=len(heldout))),
    ]:
        given = texts + heldout if config.method == "auto" else texts
        model = compress(base, entry.path, config, given, progress=False)
        folder = f"{tmp}/{config.method}-{abs(hash(label))}"
        model.save_pretrained(folder)
        ratio = bf16_weight_bytes(finetuned) / folder_bytes(folder)["weights"]
        print(f"{label:32s} {ratio:5.1f}x smaller, KL(fine-tune || delta) = {mean_kl(finetuned, model, tok, task):.2e}")
        if config.method == "auto":
            modules = json.loads(open(f"{folder}/delta_config.json").read())["modules"]["weights"]
            print("    choices:", dict(Counter(m["setting"] for m in modules.values())))

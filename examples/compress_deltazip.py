"""Compress a zoo fine-tune with DeltaZip (2:4 pruning + 4-bit GPTQ), save it, load it back, compare with the
fine-tune; then export a low-rank delta of another fine-tune as a PEFT LoRA adapter.

Run: python examples/compress_deltazip.py   (micro zoo; no network)
"""

import argparse
import tempfile

import torch
from peft import PeftModel

from hf_delta import DeltaModel, compress, export_peft_lora
from hf_delta.evaluation import mean_kl, task_calibration
from hf_delta.methods import DeltaZipConfig, LowRankConfig
from hf_delta.utils.loading import load_model_and_tokenizer
from hf_delta.utils.sizes import bf16_weight_bytes, folder_bytes
from hf_delta.zoo import build_zoo

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

zoo = build_zoo("micro")
base = zoo["llama-base"].path
finetuned, tok = load_model_and_tokenizer(zoo["llama-arith"].path)
task = zoo.task("llama-arith")

with tempfile.TemporaryDirectory() as tmp:
    # Calibration texts like the fine-tune's training data; calibration=None samples them from the fine-tune.
    config = DeltaZipConfig(bits=4, sparsity="2:4")
    delta = compress(base, zoo["llama-arith"].path, config, task_calibration(tok, task, n=64), progress=False)
    delta.save_pretrained(f"{tmp}/arith-deltazip")

    model = DeltaModel.from_pretrained(base, f"{tmp}/arith-deltazip")
    base_model, _ = load_model_and_tokenizer(base)
    print(f"KL(fine-tune || base)          = {mean_kl(finetuned, base_model, tok, task):.2e}")
    print(f"KL(fine-tune || base + delta)  = {mean_kl(finetuned, model, tok, task):.2e}")
    ratio = bf16_weight_bytes(finetuned) / folder_bytes(f"{tmp}/arith-deltazip")["weights"]
    print(f"size: {ratio:.1f}x smaller than the bf16 fine-tune")

    # Low-rank deltas travel as ordinary PEFT LoRA adapters.
    lowrank = compress(base, zoo["llama-cipher"].path, LowRankConfig(rank=8), progress=False)
    export_peft_lora(lowrank, base, f"{tmp}/cipher-lora", norms="modules_to_save")  # exact, one adapter a pass
    peft_model = PeftModel.from_pretrained(load_model_and_tokenizer(base)[0], f"{tmp}/cipher-lora")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        diff = (peft_model(input_ids=ids).logits - lowrank(input_ids=ids).logits).abs().max()
    print(f"PEFT adapter vs DeltaModel: max logit difference {diff:.1e}")

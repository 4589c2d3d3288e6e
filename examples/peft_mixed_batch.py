"""Export two low-rank deltas (Llama fine-tunes of the micro zoo) as PEFT LoRA adapters, load both into one
PeftModel and run them side by side in one batch with ``adapter_names=[...]``, against the DeltaModel that
holds the same deltas. Norm weights, which LoRA cannot hold, are dropped (``norms="drop"``): the script prints
what that costs against the full deltas.

Run: python examples/peft_mixed_batch.py   (micro zoo; no network)
"""

import argparse
import dataclasses
import tempfile
import warnings

import torch
from peft import PeftModel

from hf_delta import DeltaModel, LowRankConfig, compress, export_peft_lora
from hf_delta.utils.loading import load_model
from hf_delta.zoo import build_zoo

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
warnings.filterwarnings("ignore", module="peft")  # PEFT notes that lora_bias adapters cannot be merged

zoo = build_zoo("micro")
base = zoo["llama-base"].path
names = ["llama-arith", "llama-cipher"]
full = DeltaModel(load_model(base).eval())  # the deltas as compressed
lora_only = DeltaModel(load_model(base).eval())  # what the adapters hold: the deltas less their norm weights

with tempfile.TemporaryDirectory() as tmp:
    peft_model = None
    for name in names:
        model = compress(base, zoo[name].path, LowRankConfig(rank=8), progress=False)
        export_peft_lora(model, None, f"{tmp}/{name}", norms="drop")
        delta = model.get_delta("default")
        full.add_delta(name, delta)
        lora_only.add_delta(
            name, dataclasses.replace(delta, exact={k: v for k, v in delta.exact.items() if "norm" not in k})
        )
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(load_model(base).eval(), f"{tmp}/{name}", adapter_name=name)
        else:
            peft_model.load_adapter(f"{tmp}/{name}", adapter_name=name)

    rows = [*names, "__base__"]
    ids = torch.randint(3, 380, (len(rows), 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = peft_model(input_ids=ids, adapter_names=rows).logits
        for i, row in enumerate(rows):
            exact = (mixed[i] - lora_only(input_ids=ids, delta_names=rows).logits[i]).abs().max()
            dropped = (mixed[i] - full(input_ids=ids, delta_names=rows).logits[i]).abs().max()
            print(
                f"{row:>13}: PEFT mixed batch vs DeltaModel (same parts) {exact:.1e}; "
                f"vs the full delta (norms kept) {dropped:.3f}"
            )

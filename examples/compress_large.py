"""Compress without loading a model: stream a data-free BitDelta delta from two checkpoints, then distill its
scales and compress with DeltaZip layer by layer (what a 7B fine-tune needs; here the micro zoo).

Run: python examples/compress_large.py   (micro zoo; no network)
"""

import argparse
import resource
import tempfile

from hf_delta import BitDeltaConfig, DeltaModel, DeltaZipConfig, compress_delta
from hf_delta.evaluation import task_calibration
from hf_delta.utils.loading import load_tokenizer
from hf_delta.zoo import build_zoo

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

zoo = build_zoo("micro")
base, finetune = zoo["llama-base"].path, zoo["llama-arith"].path
texts = task_calibration(load_tokenizer(finetune), zoo.task("llama-arith"), n=32)
with tempfile.TemporaryDirectory() as tmp:
    settings = {
        "bitdelta-initial": (BitDeltaConfig(distill_steps=0), None),  # tensor by tensor, no calibration
        "bitdelta": (BitDeltaConfig(distill_steps=50), texts),  # the teacher runs one layer at a time
        "deltazip-4bit-2:4": (DeltaZipConfig(bits=4, sparsity="2:4"), texts),  # GPTQ one layer at a time
    }
    for name, (config, calibration) in settings.items():
        compress_delta(base, finetune, config, calibration, progress=False).save_pretrained(f"{tmp}/{name}")
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{name:18s} saved; peak RSS of this process so far {peak_mb:.0f} MB")
    model = DeltaModel.from_pretrained(base, f"{tmp}/bitdelta", dtype="auto")  # the checkpoint's own dtype
    print("loaded:", model.list_deltas(), model.base_model.dtype)

"""Fine-tune a LoRA adapter while the same engine serves compressed deltas, then serve the adapter beside them.

Run: python examples/coserve.py   (micro zoo; no network; a few seconds on a CPU)

The same from the command line / HTTP:
    hf-delta serve --base <base> --delta arith=<delta folder>
    curl localhost:8000/v1/fine_tuning/jobs -H 'Content-Type: application/json' -d '{"model": "base",
         "training_file": "train.jsonl", "suffix": "my-lora", "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}'
"""

import argparse
import tempfile

from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from hf_delta import BitDeltaConfig, compress
from hf_delta.serving import CoServeScheduler, CoServingTrainer, Engine, EngineConfig, SamplingParams
from hf_delta.zoo import build_zoo

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

zoo = build_zoo("micro")
base = zoo["llama-base"].path
task = zoo.task("llama-arith")
with tempfile.TemporaryDirectory() as tmp:
    compress(base, zoo["llama-cipher"].path, BitDeltaConfig(distill_steps=0), progress=False).save_pretrained(
        f"{tmp}/cipher")
    engine = Engine(base, deltas={"cipher": f"{tmp}/cipher"}, config=EngineConfig(max_running=32))
    # Training tokens fill what inference leaves of a 30 ms step; under peak load training pauses.
    trainer = CoServingTrainer(engine, scheduler=CoServeScheduler(tpot_slo_ms=30))
    engine.start()
    job = trainer.submit(
        lora=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]),
        data=[{"prompt": ex.prompt, "response": ex.answer} for ex in task.train],  # loss on the answers only
        output_dir=f"{tmp}/arith-lora", adapter_name="arith-lora",
        hyperparameters={"batch_size": 8, "learning_rate": 3e-3, "max_steps": 20, "checkpoint_every": 10})
    # Inference keeps running while the job trains, in the same forward passes.
    served = engine.generate(["encode a b c ="] * 4, model="cipher", params=SamplingParams(max_tokens=8))
    print("served during training:", [r.text for r in served])
    job.wait(timeout=600)
    print(job.status, "loss", [round(h["loss"], 3) for h in job.history[::5]], "->", round(job.history[-1]["loss"], 3))

    # The adapter is served by name at once, in mixed batches with compressed deltas ...
    for r in engine.generate([task.heldout[0].prompt, "encode a b c ="], model=["arith-lora", "cipher"],
                             params=SamplingParams(max_tokens=8)):
        print(r.model, repr(r.text))
    engine.close()
    # ... and it is a standard PEFT adapter.
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), job.final_dir)
    print("PEFT loaded", type(peft_model).__name__, "from", job.final_dir)

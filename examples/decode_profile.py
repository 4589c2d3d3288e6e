"""Where a decode step's time goes, and decode steps replayed as CUDA graphs (same outputs as eager steps).

Run: python examples/decode_profile.py            (micro zoo; CUDA when there is a GPU, else the CPU)
     python examples/decode_profile.py --device cpu

On a GPU the engine replays each decode step as a CUDA graph (`EngineConfig(cuda_graphs=True)`, the default);
on the CPU the option changes nothing. Then `profile_decode` (what `hf-delta bench serve --profile` runs)
splits a few decode steps' time into base layers, delta layers, attention, sampling, other ops and host time.
The same at 7B shapes on a GPU: `bash benchmarks/gpu_check.sh serve-7b`.
"""

import argparse
import tempfile

import torch

from hf_delta import BitDeltaConfig, compress
from hf_delta.bench.step_profile import CATEGORIES, profile_decode
from hf_delta.serving import Engine, EngineConfig, SamplingParams
from hf_delta.zoo import build_zoo

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()

zoo = build_zoo("micro")
base = zoo["llama-base"].path
with tempfile.TemporaryDirectory() as tmp:
    deltas = {}
    for name in ("llama-arith", "llama-cipher"):
        compress(base, zoo[name].path, BitDeltaConfig(distill_steps=0), progress=False).save_pretrained(f"{tmp}/{name}")
        deltas[name.removeprefix("llama-")] = f"{tmp}/{name}"
    prompts = ["add 1 to 1 2 3 4 =", "encode a b c d =", "add 2 to 5 6 7 ="]
    models = ["arith", "cipher", "base"]
    texts = {}
    for graphs in (True, False):
        engine = Engine(base, deltas=deltas, device=args.device, config=EngineConfig(cuda_graphs=graphs))
        for _ in range(2):  # the second run replays the graphs the first one captured
            results = engine.generate(prompts, model=models, params=SamplingParams(max_tokens=12, ignore_eos=True))
        texts[graphs] = [r.text for r in results]
        if graphs:
            print("graphs:", engine.stats().get("graphs", "none (not a CUDA engine)"))
            ids = [engine.encode(m, p) for m, p in zip(models, prompts, strict=True)]
            profile = profile_decode(engine, list(zip(models, ids, strict=True)), steps=4)
            print(f"decode step, {profile['rows']} rows, {profile['time']} time per step:")
            for name in (*CATEGORIES, "host"):
                print(f"  {name:>9}: {profile[f'{name}_ms']:8.3f} ms")
            print(
                f"  wall (profiled): {profile['wall_ms']:.3f} ms; without the profiler: "
                f"{profile['eager_wall_ms']:.3f} ms eager, {profile.get('graphs_wall_ms', float('nan')):.3f} ms graphs"
            )
        engine.close()
    print("same outputs with and without graphs:", texts[True] == texts[False])

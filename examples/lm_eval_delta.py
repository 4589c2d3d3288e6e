"""lm-evaluation-harness on a delta: the zoo's llama-arith as a 1-bit delta, its merged fine-tune, and the base.

Builds the zoo (micro: seconds, no network), compresses llama-arith with BitDelta, writes its task as local
lm-eval tasks (YAML over a JSONL file: nothing is downloaded) and scores the delta through lm-eval's
``hf-delta`` model, the same delta merged into the base through lm-eval's own ``hf`` model, and ``__base__``.
The first two agree; the micro zoo's models are barely trained, so use ``--size small`` for scores that mean
something (the small zoo takes ~12 minutes to build once).

Run: python examples/lm_eval_delta.py [--size small] [--distill]
The same from the command line: hf-delta lm-eval --model hf-delta --model_args base=B,delta=D --tasks T ...
"""

import argparse
import tempfile

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--size", default="micro")
parser.add_argument("--finetune", default="llama-arith")
parser.add_argument("--distill", action="store_true", help="distil the BitDelta scales (slower, closer)")
args = parser.parse_args()

from hf_delta import BitDeltaConfig, compress  # noqa: E402  (after --help, which must not load torch)
from hf_delta.evaluation import to_markdown  # noqa: E402
from hf_delta.integrations.lm_eval import lm_eval_scores  # noqa: E402
from hf_delta.integrations.lm_eval_tasks import write_zoo_tasks  # noqa: E402
from hf_delta.utils.loading import load_tokenizer  # noqa: E402
from hf_delta.zoo import build_zoo  # noqa: E402

zoo = build_zoo(args.size)
entry = zoo[args.finetune]
tokenizer = load_tokenizer(entry.path)
config = BitDeltaConfig() if args.distill else BitDeltaConfig(distill_steps=0)
delta = compress(zoo[entry.base].path, entry.path, config, progress=False)  # a DeltaModel, delta "default"

with tempfile.TemporaryDirectory() as folder:
    tasks = write_zoo_tasks(zoo.task(args.finetune), tokenizer, folder)
    rows = [
        {"model": "delta (hf-delta)", **lm_eval_scores(delta, tokenizer, tasks, include_path=folder)},
        {
            "model": "__base__ (hf-delta)",
            **lm_eval_scores(delta, tokenizer, tasks, delta_name="__base__", include_path=folder),
        },
        # merge_and_unload folds the delta into the base's weights: a plain transformers model for lm-eval's hf.
        {"model": "merged (hf)", **lm_eval_scores(delta.merge_and_unload(), tokenizer, tasks, include_path=folder)},
    ]
print(to_markdown(rows))

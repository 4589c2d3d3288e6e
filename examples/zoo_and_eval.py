"""Build the micro zoo (seconds, no network) and print base vs fine-tune scores for every fine-tune.

Run: python examples/zoo_and_eval.py [--size small]
"""

import argparse

from hf_delta.bench.zoo_eval import evaluate_zoo
from hf_delta.evaluation import to_markdown

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--size", default="micro")
args = parser.parse_args()
print(to_markdown(evaluate_zoo(args.size, build=True)))

"""Launch the demo on the micro zoo: builds it (seconds), compresses its Llama fine-tunes (BitDelta with scale
distillation, about a minute the first time; cached), then serves the app on http://127.0.0.1:7860.

Run: python examples/demo_micro.py [--port 7861] [--no-launch]
(same as `hf-delta demo --size micro`; the micro models are tiny, so their answers are mostly noise: the
small zoo, `hf-delta demo`, answers its tasks.)
"""

import argparse
import logging

from hf_delta.demo import add_demo_arguments, demo_main

logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
args = add_demo_arguments(parser).parse_args()
args.size = args.size or "micro"
raise SystemExit(demo_main(args))

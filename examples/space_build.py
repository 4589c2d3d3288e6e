"""Build the demo's Hugging Face Space folder and, with --push, upload it as a Space.

Run: python examples/space_build.py OUT [--size micro] [--push USER/hf-delta-demo] [--private]
Then try it as the Spaces builder would: cd OUT && python -m venv v && v/bin/pip install -r requirements.txt
&& v/bin/python app.py (the page shows the first start's progress, then the demo). Same as
`hf-delta space build`; see docs/space.md.
"""

import argparse
import logging

from hf_delta.demo.space import build_space, push_space

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out", help="the Space folder to write")
parser.add_argument("--size", default="micro", choices=["small", "micro"], help="zoo the Space serves")
parser.add_argument("--push", default=None, metavar="REPO_ID", help="upload to this Space repo")
parser.add_argument("--private", action="store_true", help="create the Space private")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

folder = build_space(args.out, size=args.size, title=f"hf_delta demo ({args.size} zoo)")
for path in sorted(folder.iterdir()):
    print(f"{path.name:40s} {path.stat().st_size:>10,d} bytes")
if args.push:
    print("pushed:", push_space(folder, args.push, private=args.private))

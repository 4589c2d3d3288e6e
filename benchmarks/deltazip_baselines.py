"""DeltaZip against its own ablations on every zoo fine-tune, all in one run.

The command line of ``hf_delta.bench.deltazip_baselines``, whose docstring says what it measures:
``python benchmarks/deltazip_baselines.py --help``.
"""

from hf_delta.bench.deltazip_baselines import main

if __name__ == "__main__":
    raise SystemExit(main())

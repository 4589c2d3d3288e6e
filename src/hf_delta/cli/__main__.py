"""``python -m hf_delta.cli``: the same as ``hf-delta``."""

from .main import main

raise SystemExit(main())

"""Benchmarks as commands: each module runs one (``hf-delta bench ...`` or a script under ``benchmarks/``) and
writes its table through ``report.py`` under ``benchmarks/results/``."""

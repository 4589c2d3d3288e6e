"""Helpers every layer may use: atomic writes (``io``), loading models and tokenizers (``loading``)."""

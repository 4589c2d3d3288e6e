"""The version of hf_delta (its own module, so that recording it imports nothing else)."""

__version__ = "0.1.0"

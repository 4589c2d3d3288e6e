"""Constants shared by the demo tests (a module of its own: `conftest` is ambiguous across test folders)."""

DELTAS = ("llama-arith", "llama-cipher", "llama-facts", "llama-chat")
MAX_TOKENS = 8

"""What a causal LM's forward does to its logits after the output head, for code that calls the head itself."""

from __future__ import annotations

from typing import Any

import torch


def softcap_logits(logits: torch.Tensor, config: Any) -> torch.Tensor:
    """The model's final logit soft-capping (Gemma 2: ``tanh(logits / cap) * cap``) when its config sets one."""
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits

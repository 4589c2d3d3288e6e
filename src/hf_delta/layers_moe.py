"""Delta-aware Mixture-of-Experts blocks: fused expert parameters with one compressed delta per expert.

transformers 5 stores a block's experts as two 3-D parameters, ``gate_up_proj`` ``[E, 2I, H]`` and
``down_proj`` ``[E, H, I]``, and calls the experts module with the tokens (flattened to ``[T, H]``) and the
router's choice for each token (``top_k_index``, ``top_k_weights`` ``[T, k]``). A delta holds one compressed
matrix per expert and parameter (keys ``<parameter>[<expert>]``, see ``extract.expert_key``).

Semantics, for each token ``t`` whose row uses delta ``d`` and which the router sent to experts ``e_j`` with
weights ``w_j`` (the router itself runs with ``d``'s router weights when ``d`` changed them)::

    y[t] = Σ_j w_j · down_{d,e_j}(act(gate_{d,e_j}(x_t)) ⊙ up_{d,e_j}(x_t)),   proj_{d,e}(x) = x W_eᵀ + Δ_{d,e}(x)

with ``W_e`` the base's matrix (or the delta's exact one) and ``Δ_{d,e}(x)`` applied compressed, never added to
the base weight. Tokens of base rows (slot ``-1``) keep the wrapped module's own output, untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .extract import is_fused_experts
from .layers import DeltaParts, DeltaWrapper
from .methods.base import CompressedWeight


class ExpertDeltas:
    """What ``DeltaParts.weight`` holds for an experts module: one delta's compressed matrices, by parameter
    (``"gate_up_proj"``, ``"down_proj"``) and expert. The weights are the very objects of the ``Delta``."""

    __slots__ = ("matrices",)

    def __init__(self, matrices: dict[str, dict[int, CompressedWeight]]):
        self.matrices = matrices

    def get(self, leaf: str, expert: int) -> CompressedWeight | None:
        return self.matrices.get(leaf, {}).get(expert)

    def _apply(self, fn) -> ExpertDeltas:
        for per_expert in self.matrices.values():
            for weight in per_expert.values():
                weight._apply(fn)
        return self

    def buffers(self) -> list[torch.Tensor]:
        return [t for per_expert in self.matrices.values() for w in per_expert.values() for t in w.buffers()]

    def merged(self, leaf: str, base: torch.Tensor) -> torch.Tensor:
        """``base`` ``[E, out, in]`` plus every expert's decompressed delta of ``leaf``, in float32."""
        out = base.float().clone()
        for expert, weight in self.matrices.get(leaf, {}).items():
            out[expert] += weight.to_dense(torch.float32).to(out.device)
        return out


class DeltaExperts(DeltaWrapper):
    """A fused experts module plus per-row deltas, applied through the block's own routing."""

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args, **kwargs
    ) -> torch.Tensor:
        y = self.base_layer(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        routes = list(self._routes(hidden_states.shape[:-1], hidden_states.device))
        if not routes:
            return y
        y = y.clone()
        for parts, rows in routes:
            r = slice(None) if rows is None else rows
            y[r] = self._experts(parts, hidden_states[r], top_k_index[r], top_k_weights[r]).to(y.dtype)
        return y

    def _experts(self, parts: DeltaParts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The fine-tune's expert mixture for tokens ``x`` (see the module docstring), only the experts they use."""
        base = self.base_layer
        out = torch.zeros_like(x)
        for expert in torch.unique(index).tolist():
            if expert >= base.gate_up_proj.shape[0]:  # an index past the experts marks "no expert" (parallelism)
                continue
            tokens, slot = torch.where(index == expert)
            gate_up = self._project(parts, "gate_up_proj", expert, x[tokens])
            hidden = base._apply_gate(gate_up) if hasattr(base, "_apply_gate") else self._gate(gate_up)
            down = self._project(parts, "down_proj", expert, hidden)
            out.index_add_(0, tokens, (down * weights[tokens, slot, None]).to(out.dtype))
        return out

    def _gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.base_layer.act_fn(gate) * up

    def _project(self, parts: DeltaParts, leaf: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        matrix = parts.exact().get(leaf, getattr(self.base_layer, leaf))[expert]
        y = F.linear(x, matrix.to(x.dtype))
        delta = parts.weight.get(leaf, expert) if isinstance(parts.weight, ExpertDeltas) else None
        if delta is not None:
            delta.add_to_rows(x, y, None)  # y += x @ Δᵀ, compressed (a kernel where the method has one)
        return y


def wrapper_for(module: nn.Module, *, token_embedding: bool = False) -> type[DeltaWrapper]:
    """The wrapper class that can host deltas of ``module``: ``layers.wrapper_for``, plus fused experts."""
    return DeltaExperts if is_fused_experts(module) else layers.wrapper_for(module, token_embedding=token_embedding)

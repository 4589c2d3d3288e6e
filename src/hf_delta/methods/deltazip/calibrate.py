"""Layer-sequential calibration: each decoder layer's Hessians from the inputs of the model whose earlier
layers already carry their compressed deltas.

Experts of a fused Mixture-of-Experts parameter (``<parameter>[<expert>]``) are calibrated on the tokens the
router sends them: ``gate_up_proj[e]`` on those tokens' inputs, then ``down_proj[e]`` on
``act(gate) ⊙ up`` of the same tokens through the already compressed ``gate_up_proj[e]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...extract import expert_key, split_expert_key

if TYPE_CHECKING:
    from ...calibration import Batch


logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the inputs it needed have been seen."""


class Hessian:
    """Running ``2 XᵀX / n`` over the real (unpadded) rows of a layer's inputs."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.h is None:
            self.h = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        self.h *= self.n / (self.n + len(x))
        self.n += len(x)
        x = x * math.sqrt(2 / self.n)
        self.h += x.T @ x


def real_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()] if x.shape[:-1] == mask.shape else x


def _expert_inputs(module: nn.Module, leaf: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """What ``leaf`` (``gate_up_proj`` or ``down_proj``) of ``expert`` multiplies, for tokens ``x`` routed to it."""
    if leaf == "gate_up_proj":
        return x
    gate_up = F.linear(x, module.gate_up_proj[expert].to(x.dtype))
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


class ExpertHessians:
    """Running Hessians of one fused expert parameter, one per expert, from the real tokens routed to it."""

    def __init__(self, module: nn.Module, leaf: str) -> None:
        self.module, self.leaf = module, leaf
        self.per_expert: dict[int, Hessian] = {}

    def add(self, hidden: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None) -> None:
        """``hidden`` ``[T, H]`` and ``index`` ``[T, k]`` as the experts module gets them; ``mask``: the batch's
        attention mask (its ``B * S`` entries flatten like the tokens), padding excluded."""
        x = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(x.shape[0], -1)
        real = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if mask is not None and mask.numel() == x.shape[0]:
            real = mask.reshape(-1).bool().to(x.device)
        experts = self.module.gate_up_proj.shape[0]
        for expert in torch.unique(index[real]).tolist():
            if expert >= experts:
                continue
            rows = (index == expert).any(dim=-1) & real
            inputs = _expert_inputs(self.module, self.leaf, expert, x[rows])
            self.per_expert.setdefault(expert, Hessian()).add(inputs)

    def result(self, param: str) -> dict[str, torch.Tensor | None]:
        """Delta key → Hessian (``None`` for an expert no calibration token reached: round to nearest)."""
        hessians = {e: self.per_expert[e].h if e in self.per_expert else None
                    for e in range(self.module.gate_up_proj.shape[0])}
        return {expert_key(param, e): h for e, h in hessians.items()}


def _decoder_layers(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """The ``nn.ModuleList`` holding most of the targets (the decoder blocks), as (name, layer) pairs."""
    best: list[tuple[str, nn.Module]] = []
    best_count = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            layers = [(f"{name}.{i}", child) for i, child in enumerate(m)]
            count = sum(any(t.startswith(n + ".") for n, _ in layers) for t in targets)
            if count > best_count:
                best, best_count = layers, count
    return best


def _call_layer(layer: nn.Module, hidden: torch.Tensor, rest: tuple | None, kwargs: dict) -> torch.Tensor:
    """Replay a decoder layer on ``hidden`` with its recorded other arguments (``rest`` None: hidden by keyword)."""
    out = layer(hidden, *rest, **kwargs) if rest is not None else layer(hidden_states=hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def call_groups(modules: dict[str, nn.Module], run: Callable[[], object]) -> list[list[str]]:
    """The ``modules`` that ``run()`` calls, in call order, consecutive ones fed the very same input tensor
    grouped (q/k/v, gate/up): each group gets one Hessian of that shared input."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: calls.append((n, a[0]))) for n, m in modules.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    prev = None
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if prev is not None and x is prev:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev = x
    return groups


class LayerCalibrator:
    """Walks the target modules of ``model`` in forward order, one group of modules sharing an input at a time.

    ``each_group(names, hessians)`` must write the compressed weights of ``names`` into ``model``; the next
    groups are then calibrated on activations that flow through them. Decoder layers are replayed one at a time
    from cached inputs; targets outside them (an output head) get full forward passes.
    """

    def __init__(self, model: nn.Module, batches: list[Batch], targets: list[str], experts: list[str] = ()):
        self.model, self.batches = model, batches
        self.modules = {n: model.get_submodule(n) for n in targets}
        # Fused expert parameters with a delta per expert, in forward order (gate_up before down in each block).
        params = dict.fromkeys(split_expert_key(k)[0] for k in experts)
        self.experts = sorted(params, key=lambda p: (p.rpartition(".")[0], p.endswith("down_proj")))
        self.layers = _decoder_layers(model, [*targets, *self.experts])
        self.device = next(model.parameters()).device  # calibration batches are tokenized on the CPU

    def _forward(self, batch: Batch) -> None:
        ids, mask = batch
        self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)

    def groups(self) -> list[list[str]]:
        """Targets in call order, consecutive ones fed the very same input tensor grouped (q/k/v, gate/up)."""
        groups = call_groups(self.modules, lambda: self._forward(self.batches[0]))
        called = {n for g in groups for n in g}
        unused = sorted(set(self.modules) - called)
        if unused:
            logger.warning("Modules %s are never called in a forward pass; compressing them without calibration",
                           unused)
            groups.append(unused)
        return groups

    def _hessians(self, names: list[str], run: Callable[[int], None]) -> dict[str, torch.Tensor | None]:
        """Run ``run(batch_index)`` over all batches with hooks collecting the inputs of ``names``."""
        acc = {n: Hessian() for n in names}
        seen: set[str] = set()
        state = {"mask": None}

        def hook(module, args, name):
            acc[name].add(real_rows(args[0], state["mask"]))
            seen.add(name)
            if seen == set(names):
                raise _Stop

        hooks = [self.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n))
                 for n in names]
        try:
            for b, (_, mask) in enumerate(self.batches):
                state["mask"] = mask.to(self.device)
                seen.clear()
                try:
                    run(b)
                except _Stop:
                    pass
        finally:
            for h in hooks:
                h.remove()
        return {n: a.h for n, a in acc.items()}

    def _expert_hessians(self, param: str, run: Callable[[int], None]) -> dict[str, torch.Tensor | None]:
        """Run ``run(batch_index)`` over all batches, collecting the per-expert Hessians of ``param``."""
        owner, _, leaf = param.rpartition(".")
        acc = ExpertHessians(self.model.get_submodule(owner), leaf)
        state = {"mask": None}

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            acc.add(hidden, index, state["mask"])
            raise _Stop

        handle = acc.module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for b, (_, mask) in enumerate(self.batches):
                state["mask"] = mask.to(self.device)
                try:
                    run(b)
                except _Stop:
                    pass
        finally:
            handle.remove()
        return acc.result(param)

    def _capture_layer_inputs(self) -> tuple[list[torch.Tensor], list[list[tuple[tuple | None, dict]]]]:
        """Inputs of the first decoder layer, and every layer's other call arguments, for every batch.

        Masks and position embeddings depend on the token ids only, so one pass records them for all layers;
        hidden states are kept for the first layer only (later ones are recomputed from compressed layers).
        """
        hidden: list[torch.Tensor] = []
        calls: list[list[tuple[tuple | None, dict]]] = [[] for _ in self.layers]

        def hook(index, args, kwargs):
            if index == 0:
                hidden.append(args[0] if args else kwargs["hidden_states"])
            calls[index].append((args[1:] if args else None,
                                 {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: hook(i, a, kw), with_kwargs=True)
                 for i, (_, layer) in enumerate(self.layers)]
        try:
            for batch in self.batches:
                self._forward(batch)
        finally:
            for h in hooks:
                h.remove()
        return hidden, calls

    @torch.no_grad()
    def run(self, each_group: Callable[[list[str], dict[str, torch.Tensor | None]], None], *,
            progress: bool = True) -> None:
        groups = self.groups()
        bar = tqdm(total=len(groups) + len(self.experts), desc="deltazip: layers", disable=not progress, leave=False)
        owner = {n: i for i, (lname, _) in enumerate(self.layers) for n in self.modules if n.startswith(lname + ".")}
        in_layers = [g for g in groups if all(n in owner for n in g)]
        first_layer_group = groups.index(in_layers[0]) if in_layers else len(groups)
        outside = [g for g in groups if g not in in_layers]

        def full_pass(group: list[str]) -> None:
            each_group(group, self._hessians(group, lambda b: self._forward(self.batches[b])))
            bar.update()

        for group in [g for g in outside if groups.index(g) < first_layer_group]:
            full_pass(group)
        if in_layers or self.experts:
            hidden, calls = self._capture_layer_inputs()
            for i, (lname, layer) in enumerate(self.layers):

                def run(b: int, i=i, layer=layer, xs=hidden) -> torch.Tensor:
                    return _call_layer(layer, xs[b], *calls[i][b])

                for group in [g for g in in_layers if owner[g[0]] == i]:
                    each_group(group, self._hessians(group, run))
                    bar.update()
                # The experts come after the layer's other targets (attention, a shared expert), which they follow
                # in the forward or run beside.
                for param in [p for p in self.experts if p.startswith(lname + ".")]:
                    hessians = self._expert_hessians(param, run)
                    each_group(list(hessians), hessians)
                    bar.update()
                hidden = [_call_layer(layer, hidden[b], *calls[i][b]) for b in range(len(hidden))]
        for group in [g for g in outside if groups.index(g) >= first_layer_group]:
            full_pass(group)
        bar.close()

"""Export a low-rank delta as a standard PEFT LoRA adapter that PEFT loads beside others and mixes in one batch.

What LoRA can hold is written as LoRA, exactly: low-rank weights as their factors, whole tables or matrices
stored exact as full-rank factors (``Δ = Δ · I``), changed biases as LoRA biases (``lora_bias=True``), changed
embedding rows as trainable tokens where a LoRA embedding cannot be used. Everything else (norm weights above
all) goes by ``norms=``: refused, dropped, or saved whole in ``modules_to_save`` (exact, but PEFT cannot mix
such an adapter with others in one batch).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import DeltaConfigError
from ..extract import as_out_in, is_conv1d, split_expert_key
from ..fingerprint import check_base
from ..layers import DeltaWrapper
from ..methods.lowrank import LowRankWeight
from ..model import DeltaModel
from ..storage import Delta
from ..utils.loading import load_model

logger = logging.getLogger(__name__)

NORM_POLICIES = ("error", "drop", "modules_to_save")
_PREFIX = "base_model.model."


@dataclass
class _Factors:
    """``Δ = scaling · B A`` of one module, plus its bias delta (a LoRA bias)."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scaling: float = 1.0
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def _full_rank(change: torch.Tensor) -> _Factors:
    """Exact factors of a whole matrix ``change`` ``[out, in]``, of rank ``min(out, in)``: ``Δ·I`` or ``I·Δ``."""
    out, k = change.shape
    if out >= k:
        return _Factors(torch.eye(k, dtype=change.dtype), change)
    return _Factors(change, torch.eye(out, dtype=change.dtype))


def _base_view(
    source: DeltaModel | None, base_model: PreTrainedModel | str | Path | None, delta: Delta
) -> tuple[dict[str, torch.Tensor], Any, PreTrainedModel]:
    """Unwrapped base state dict, a module-by-name lookup that sees through delta wrappers, and the model."""
    if base_model is None:
        if source is None:
            raise DeltaConfigError("export_peft_lora needs base_model=... when given a Delta (not a DeltaModel).")
        model, state = source.base_model, source.base_state_dict()  # checked when the delta was added
    else:
        model = load_model(base_model)
        # A base already wrapped by a DeltaModel names its weights "<module>.base_layer.<leaf>".
        state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
        check_base(
            delta.record.base_fingerprint,
            state,
            delta="the exported delta",
            base_name=delta.record.base_model_name_or_path,
        )

    def module(name: str) -> nn.Module:
        m = model.get_submodule(name)
        return m.base_layer if isinstance(m, DeltaWrapper) else m

    return state, module, model


def _split(delta: Delta, state: dict[str, torch.Tensor], module) -> tuple[dict[str, _Factors], dict[str, torch.Tensor]]:
    """The delta as LoRA factors per module, and the exact tensors LoRA cannot hold (parameter → fine-tuned value)."""
    factors = {name: _Factors(w.A, w.B, w.scaling) for name, w in delta.weights.items()}
    rest: dict[str, torch.Tensor] = {}
    # Weights first: a layer whose weight and bias both changed gets one set of factors carrying both.
    for param, value in sorted(delta.exact.items(), key=lambda kv: not kv[0].endswith(".weight")):
        owner, _, leaf = param.rpartition(".")
        layer = module(owner)
        change = value.float() - state[param].float()
        linear = isinstance(layer, nn.Linear) or is_conv1d(layer)
        if leaf == "weight" and (linear or isinstance(layer, nn.Embedding)) and owner not in factors:
            factors[owner] = _full_rank(as_out_in(change, is_conv1d(layer)))  # LoRA factors are [out, in]
        elif leaf == "bias" and linear:
            if owner not in factors:  # only the bias changed: zero factors carry it
                out_features, in_features = as_out_in(layer.weight, is_conv1d(layer)).shape
                factors[owner] = _Factors(torch.zeros(1, in_features), torch.zeros(out_features, 1))
            factors[owner].bias = change
        else:
            rest[param] = value
    return factors, rest


def _handle_rest(rest: dict[str, torch.Tensor], state: dict[str, torch.Tensor], norms: str) -> None:
    """Refuse or log what LoRA cannot hold, as ``norms`` says."""
    if not rest:
        return
    changes = {
        p: ((v.float() - state[p].float()).norm() / state[p].float().norm().clamp_min(1e-12)).item()
        for p, v in rest.items()
    }
    listed = ", ".join(f"{p} ({c:.1%})" for p, c in sorted(changes.items())[:4]) + (", ..." if len(rest) > 4 else "")
    if norms == "error":
        raise DeltaConfigError(
            f"LoRA cannot hold the {len(rest)} changed parameters of modules that are not linear layers or "
            f"embeddings (relative change: {listed}). PEFT keeps such modules whole in modules_to_save, and it "
            "cannot mix an adapter with modules_to_save with other adapters in one batch. Pass norms='drop' to "
            "leave them at the base's values (the adapter then mixes; see docs/lowrank.md for the measured cost), "
            "norms='modules_to_save' to keep them exactly (PEFT then runs one adapter per forward pass), or serve "
            "the delta with DeltaModel, which mixes it exactly."
        )
    if norms == "drop":
        logger.warning(
            "PEFT export: dropped %d changed parameters LoRA cannot hold; the adapter applies the base's "
            "values there (relative change dropped: %s)",
            len(rest),
            listed,
        )


def export_peft_lora(
    delta_model_or_delta: DeltaModel | Delta,
    base_model: PreTrainedModel | str | Path | None,
    folder: str | Path,
    *,
    delta_name: str = "default",
    norms: Literal["error", "drop", "modules_to_save"] = "error",
) -> Path:
    """Write a low-rank delta as a PEFT LoRA adapter folder that ``PeftModel.from_pretrained`` loads, that
    ``load_adapter`` adds beside other adapters and that ``generate(adapter_names=[...])`` mixes per row.

    Each ``LowRankWeight`` becomes ``lora_A``/``lora_B`` (``lora_alpha = r · scaling``; per-module ranks and
    alphas in ``rank_pattern``/``alpha_pattern``). A weight stored exact (a whole vocabulary table with
    ``compress_embeddings=False``) becomes full-rank factors, exact. Changed biases become LoRA biases
    (``lora_bias=True``, which PEFT applies per adapter). An embedding delta becomes ``lora_embedding_A/B``;
    PEFT has no LoRA bias on embeddings, so when biases changed too, or the table is stored whole, the changed
    rows go to ``trainable_token_indices`` instead (exact; the adapter then holds those rows whole). On a tied
    base the output head gets the embedding's change: the same factors as a target of its own, or (trainable
    tokens) PEFT's tying of the head to the embedding's new rows.

    Args:
        delta_model_or_delta: a ``DeltaModel`` (its delta ``delta_name`` is exported) or a ``Delta``.
        base_model: the base model (object, folder or Hub id); ``None`` uses the base inside the ``DeltaModel``.
        folder: output folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        delta_name: which delta of a ``DeltaModel`` to export.
        norms: what to do with changed parameters of other modules (norm weights), which LoRA cannot hold:
            ``"error"`` refuses, ``"drop"`` leaves the base's values (logged with the relative change),
            ``"modules_to_save"`` saves those modules whole (exact, but PEFT refuses to mix the adapter with
            others in one batch).

    Returns:
        The folder.

    Raises:
        BaseModelMismatchError: ``base_model`` is not the base the delta was compressed against.
        DeltaConfigError: the delta holds parts LoRA cannot express: non-low-rank weights (BitDelta,
            DeltaZip), rows of a grown vocabulary (PEFT cannot resize the base's embeddings), or changed norm
            weights with ``norms="error"``.

    >>> export_peft_lora(model, "org/base", "my-lora", norms="drop")  # doctest: +SKIP
    >>> peft_model = PeftModel.from_pretrained(base, "my-lora")  # doctest: +SKIP
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    if norms not in NORM_POLICIES:
        raise DeltaConfigError(f"norms must be one of {NORM_POLICIES}, got {norms!r}.")
    source = delta_model_or_delta if isinstance(delta_model_or_delta, DeltaModel) else None
    delta = source.get_delta(delta_name) if source is not None else delta_model_or_delta
    wrong = sorted(n for n, w in delta.weights.items() if not isinstance(w, LowRankWeight))
    if wrong:
        raise DeltaConfigError(
            f"Only low-rank deltas export to LoRA; {wrong[:3]} are {delta.weights[wrong[0]].method!r} weights. "
            "Compress with LowRankConfig(rank=...) to get an exportable delta."
        )
    experts = sorted(n for n in delta.weights if split_expert_key(n) is not None)
    if experts:
        raise DeltaConfigError(
            f"This delta holds per-expert matrices of fused Mixture-of-Experts parameters (e.g. {experts[0]!r}), "
            "which a PEFT LoRA adapter of nn.Linear layers cannot express. Serve it with DeltaModel, or compress "
            "with target_modules that leave the experts out."
        )
    if delta.new_rows:
        raise DeltaConfigError(
            f"This delta adds {next(iter(delta.new_rows.values())).shape[0]} vocabulary rows (to "
            f"{sorted(delta.new_rows)}); a PEFT adapter cannot grow the base's embeddings. Serve it with "
            "DeltaModel, or export a fine-tune that keeps the base tokenizer."
        )
    state, module, model = _base_view(source, base_model, delta)
    factors, rest = _split(delta, state, module)
    _handle_rest(rest, state, norms)
    lora_bias = any(f.bias is not None for f in factors.values())
    tensors: dict[str, torch.Tensor] = {}
    tokens: dict[str, list[int]] = {}
    tied_heads = {h: e for h, e in delta.tied.items() if e in factors}
    for name, f in sorted(factors.items()):
        if isinstance(module(name), nn.Embedding):
            exact = f"{name}.weight" in delta.exact
            if lora_bias or exact:
                # Trainable tokens hold the fine-tuned rows themselves, only those that changed.
                weight = state[f"{name}.weight"].float()
                change = f.scaling * (f.B.float() @ f.A.float())
                new = delta.exact[f"{name}.weight"].float() if exact else weight + change
                rows = (new != weight).any(dim=1).nonzero().flatten()
                tokens[name] = rows.tolist()
                tensors[f"{_PREFIX}{name}.token_adapter.trainable_tokens_delta"] = new[rows].to(weight.dtype)
                continue
            # PEFT embeddings: Δ = (lora_embedding_B @ lora_embedding_A)ᵀ, i.e. A_peft = Bᵀ, B_peft = Aᵀ.
            tensors[f"{_PREFIX}{name}.lora_embedding_A"] = f.B.T
            tensors[f"{_PREFIX}{name}.lora_embedding_B"] = f.A.T
            continue
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = f.A
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = f.B
        if lora_bias:  # one setting for the whole adapter: layers whose bias did not change add zeros
            bias = f.bias if f.bias is not None else torch.zeros(f.B.shape[0])
            tensors[f"{_PREFIX}{name}.lora_B.bias"] = bias.float() / f.scaling  # PEFT casts it to its layer
    lora = {n: f for n, f in factors.items() if n not in tokens}
    # A tied head whose embedding has LoRA factors gets the same factors as a target of its own. PEFT's
    # ensure_weight_tying would share them, but (peft 0.21) it ties only the first adapter: one added with
    # load_adapter finds the head already wrapped, ties "lm_head.base_layer" and leaves the head unchanged.
    for head, embed in tied_heads.items():
        if embed in lora and head not in lora:
            lora[head] = lora[embed]
            tensors[f"{_PREFIX}{head}.lora_A.weight"] = lora[embed].A
            tensors[f"{_PREFIX}{head}.lora_B.weight"] = lora[embed].B
    saved_modules = _modules_to_save(rest, state, module, tensors) if norms == "modules_to_save" else []
    ranks = {n: f.rank for n, f in lora.items()}
    alphas = {n: f.rank * f.scaling for n, f in lora.items()}
    default_rank = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    default_alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else default_rank
    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        target_modules=_target_names(model, list(lora)),
        rank_pattern={n: r for n, r in ranks.items() if r != default_rank},
        alpha_pattern={n: a for n, a in alphas.items() if a != default_alpha},
        lora_bias=lora_bias,
        trainable_token_indices=tokens or None,
        modules_to_save=saved_modules or None,
        base_model_name_or_path=delta.record.base_model_name_or_path,
        revision=delta.record.base_model_revision,
        inference_mode=True,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    # clone: a rank-1 factor and its transpose share memory, which safetensors refuses to write
    save_file(
        {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()},
        folder / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    logger.info(
        "Wrote a PEFT LoRA adapter (%d LoRA modules, r=%d, %d trainable-token tables) to %s",
        len(lora),
        default_rank,
        len(tokens),
        folder,
    )
    return folder


def _modules_to_save(
    rest: dict[str, torch.Tensor], state: dict[str, torch.Tensor], module, tensors: dict[str, torch.Tensor]
) -> list[str]:
    """Modules saved whole for ``rest`` (their tensors added to ``tensors``): unchanged parameters as the base's."""
    owners = sorted({p.rpartition(".")[0] for p in rest})
    for owner in owners:
        for leaf, _ in module(owner).named_parameters(recurse=False):
            full = f"{owner}.{leaf}"
            tensors[f"{_PREFIX}{full}"] = rest.get(full, state[full])
    return owners


def _target_names(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names when they select exactly ``names`` in ``model``; full module names otherwise."""
    leaves = sorted({n.rpartition(".")[2] for n in names})
    plain = {n.removesuffix(".base_layer") for n, _ in model.named_modules()}
    matched = {n for n in plain if n.rpartition(".")[2] in leaves}
    return leaves if matched == set(names) else sorted(names)

"""Export a low-rank delta as a standard PEFT LoRA adapter (``PeftModel.from_pretrained`` loads it)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import DeltaConfigError
from ..fingerprint import check_base
from ..layers import DeltaWrapper
from ..methods.lowrank import LowRankWeight
from ..model import DeltaModel
from ..storage import Delta
from ..utils.loading import load_model

logger = logging.getLogger(__name__)

def _base_view(source: DeltaModel | None, base_model: PreTrainedModel | str | Path | None,
               delta: Delta) -> tuple[dict[str, torch.Tensor], Any, PreTrainedModel]:
    """Unwrapped base state dict, a module-by-name lookup that sees through delta wrappers, and the model."""
    if base_model is None:
        if source is None:
            raise DeltaConfigError("export_peft_lora needs base_model=... when given a Delta (not a DeltaModel).")
        model, state = source.base_model, source.base_state_dict()  # checked when the delta was added
    else:
        model = load_model(base_model)
        # A base already wrapped by a DeltaModel names its weights "<module>.base_layer.<leaf>".
        state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
        check_base(delta.record.base_fingerprint, state, delta="the exported delta",
                   base_name=delta.record.base_model_name_or_path)

    def module(name: str) -> nn.Module:
        m = model.get_submodule(name)
        return m.base_layer if isinstance(m, DeltaWrapper) else m

    return state, module, model


def export_peft_lora(delta_model_or_delta: DeltaModel | Delta, base_model: PreTrainedModel | str | Path | None,
                     folder: str | Path, *, delta_name: str = "default") -> Path:
    """Write a low-rank delta as a standard PEFT LoRA adapter folder that ``PeftModel.from_pretrained`` loads.

    Each ``LowRankWeight`` becomes ``lora_A``/``lora_B`` (``lora_alpha = r · scaling``, so PEFT's ``alpha / r`` is
    the weight's scaling; per-module ranks and alphas go to ``rank_pattern``/``alpha_pattern``); an embedding
    delta becomes ``lora_embedding_A/B``, and on a base with tied embeddings PEFT's ``ensure_weight_tying``
    applies it to the output head too. Exact tensors go where PEFT can carry them: biases of LoRA-wrapped
    layers via ``bias="all"`` (PEFT then loads them into the base layers, and ``disable_adapter`` does not undo
    them), whole other modules (norms) via ``modules_to_save``.

    Args:
        delta_model_or_delta: a ``DeltaModel`` (its delta ``delta_name`` is exported) or a ``Delta``.
        base_model: the base model (object, folder or Hub id); ``None`` uses the base inside the ``DeltaModel``.
        folder: output folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        delta_name: which delta of a ``DeltaModel`` to export.

    Returns:
        The folder.

    Raises:
        BaseModelMismatchError: ``base_model`` is not the base the delta was compressed against.
        DeltaConfigError: the delta holds parts LoRA cannot express: non-low-rank weights (BitDelta,
            DeltaZip), or rows of a grown vocabulary (PEFT cannot resize the base's embeddings).

    >>> export_peft_lora(model, "org/base", "my-lora")  # doctest: +SKIP
    >>> peft_model = PeftModel.from_pretrained(base, "my-lora")  # doctest: +SKIP
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    source = delta_model_or_delta if isinstance(delta_model_or_delta, DeltaModel) else None
    delta = source.get_delta(delta_name) if source is not None else delta_model_or_delta
    wrong = sorted(n for n, w in delta.weights.items() if not isinstance(w, LowRankWeight))
    if wrong:
        raise DeltaConfigError(
            f"Only low-rank deltas export to LoRA; {wrong[:3]} are {delta.weights[wrong[0]].method!r} weights. "
            "Compress with LowRankConfig(rank=...) to get an exportable delta.")
    if delta.new_rows:
        raise DeltaConfigError(
            f"This delta adds {next(iter(delta.new_rows.values())).shape[0]} vocabulary rows (to "
            f"{sorted(delta.new_rows)}); a PEFT adapter cannot grow the base's embeddings. Serve it with "
            "DeltaModel, or export a fine-tune that keeps the base tokenizer.")
    state, module, model = _base_view(source, base_model, delta)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    prefix = "base_model.model."
    tied_heads = [h for h, e in delta.tied.items() if e in delta.weights]
    for name, w in delta.weights.items():
        ranks[name] = w.rank
        alphas[name] = w.rank * w.scaling
        if isinstance(module(name), nn.Embedding):
            # PEFT embeddings: Δ = (lora_embedding_B @ lora_embedding_A)ᵀ, i.e. A_peft = Bᵀ, B_peft = Aᵀ.
            tensors[f"{prefix}{name}.lora_embedding_A"] = w.B.T
            tensors[f"{prefix}{name}.lora_embedding_B"] = w.A.T
            for head in (h for h in tied_heads if delta.tied[h] == name):
                tensors[f"{prefix}{head}.lora_A.weight"] = w.A
                tensors[f"{prefix}{head}.lora_B.weight"] = w.B
        else:
            tensors[f"{prefix}{name}.lora_A.weight"] = w.A
            tensors[f"{prefix}{name}.lora_B.weight"] = w.B
    saved_modules: list[str] = []
    with_bias = False
    for param, value in sorted(delta.exact.items()):
        owner, _, leaf = param.rpartition(".")
        if owner in delta.weights:
            tensors[f"{prefix}{owner}.base_layer.{leaf}"] = value
            with_bias = True
        elif owner not in saved_modules:
            saved_modules.append(owner)
            # modules_to_save replaces the whole module: unchanged parameters travel as the base has them.
            for p_leaf, _ in module(owner).named_parameters(recurse=False):
                full = f"{owner}.{p_leaf}"
                tensors[f"{prefix}{full}"] = delta.exact.get(full, state[full])
    for head, embed in delta.tied.items():
        if embed in saved_modules:  # PEFT ties the head's saved copy to the embedding's and loads both
            tensors[f"{prefix}{head}.weight"] = tensors[f"{prefix}{embed}.weight"]
    default_rank = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {n: r for n, r in ranks.items() if r != default_rank}
    default_alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else default_rank
    alpha_pattern = {n: a for n, a in alphas.items() if a != default_alpha}
    targets = _target_names(model, list(delta.weights))
    options: dict[str, Any] = {}
    if tied_heads or any(e in saved_modules for e in delta.tied.values()):
        if "ensure_weight_tying" not in LoraConfig.__dataclass_fields__:
            raise DeltaConfigError("Exporting an embedding delta of a tied-embedding base needs peft >= 0.18 "
                                   "(ensure_weight_tying); run pip install -U peft.")
        options["ensure_weight_tying"] = True
    config = LoraConfig(
        r=default_rank, lora_alpha=default_alpha, rank_pattern=pattern, alpha_pattern=alpha_pattern,
        target_modules=targets, modules_to_save=saved_modules or None, bias="all" if with_bias else "none",
        base_model_name_or_path=delta.record.base_model_name_or_path, revision=delta.record.base_model_revision,
        inference_mode=True, **options,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    # clone: a rank-1 factor and its transpose share memory, which safetensors refuses to write
    save_file({k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()},
              folder / "adapter_model.safetensors", metadata={"format": "pt"})
    logger.info("Wrote a PEFT LoRA adapter (%d modules, r=%d) to %s", len(ranks), default_rank, folder)
    return folder


def _target_names(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names when they select exactly ``names`` in ``model``; full module names otherwise."""
    leaves = sorted({n.rpartition(".")[2] for n in names})
    plain = {n.removesuffix(".base_layer") for n, _ in model.named_modules()}
    matched = {n for n in plain if n.rpartition(".")[2] in leaves}
    return leaves if matched == set(names) else sorted(names)

"""Low-rank deltas: a truncated SVD of each delta matrix, ``Δ ≈ B A``, exportable as a PEFT LoRA adapter.

``Δ = U S Vᵀ`` is cut to the top ``r`` singular values and split evenly, ``B = U_r √S_r`` and
``A = √S_r V_rᵀ``, so both factors have the same dynamic range in 16-bit storage.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .._loading import load_model
from ..config import DeltaConfig
from ..errors import DeltaConfigError
from ..fingerprint import check_base
from .base import CompressedWeight, DeltaMethod, register_delta_method

if TYPE_CHECKING:
    from ..compress import CompressionContext
    from ..model import DeltaModel
    from ..storage import Delta

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class LowRankWeight(CompressedWeight):
    """Factors ``A`` ``[r, in]`` and ``B`` ``[out, r]`` with ``Δ ≈ scaling · B A``; ``apply(x) = (x Aᵀ) Bᵀ · scaling``.

    ``scaling`` is 1 for SVD deltas and LoRA's ``alpha / r`` for trained adapters. The maths is plain autograd-
    friendly PyTorch, so ``A``/``B`` may be trainable tensors (co-serving trains a LoRA as one of these).
    """

    method = "lowrank"

    def __init__(self, shape: tuple[int, int], A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0):
        super().__init__(shape)
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.scaling = float(scaling)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @classmethod
    def from_delta(cls, delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> LowRankWeight:
        """Truncated SVD of ``delta``: ``rank`` singular values, or the fewest that keep ``energy`` of ``Σ s²``
        (capped at ``rank`` when both are given)."""
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
        r = rank if rank is not None else len(s)
        if energy is not None:
            total = (s**2).sum()
            # Smallest r with cumulative energy >= target; an all-zero delta keeps rank 1 (PEFT needs r > 0).
            reached = int(((s**2).cumsum(0) < energy * total).sum()) + 1 if total > 0 else 1
            r = min(r, reached, len(s))
        root = s[:r].sqrt()
        return cls(tuple(delta.shape), (root.unsqueeze(1) * vh[:r]).to(dtype), (u[:, :r] * root).to(dtype))

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.B.float() @ self.A.float() * self.scaling).to(dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.B[index].float() @ self.A.float() * self.scaling).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = (x @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T
        return out if self.scaling == 1.0 else out * self.scaling

    def meta(self) -> dict[str, Any]:
        meta = {"shape": list(self.shape), "rank": self.rank}
        if self.scaling != 1.0:
            meta["scaling"] = self.scaling
        return meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LowRankWeight:
        return cls(tuple(meta["shape"]), tensors["A"], tensors["B"], meta.get("scaling", 1.0))


@dataclass
class LowRankConfig(DeltaConfig):
    """Truncated SVD of every delta matrix (a baseline, and the bridge to LoRA tooling).

    Args:
        rank: singular values kept per matrix; with ``energy`` also set, the largest rank allowed.
        energy: keep the smallest rank whose singular values hold this fraction of ``Σ s²`` (in ``(0, 1]``).
            Ranks then differ per matrix (exported with PEFT's ``rank_pattern``).
        factor_dtype: storage dtype of ``A`` and ``B``: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
    """

    rank: int | None = 16
    energy: float | None = None
    factor_dtype: str = "bfloat16"

    def validate(self) -> None:
        super().validate()
        if self.rank is None and self.energy is None:
            raise DeltaConfigError("LowRankConfig needs rank=... (e.g. 16) or energy=... (e.g. 0.9), or both.")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank <= 0):
            raise DeltaConfigError(f"rank must be a positive int, got {self.rank!r}.")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise DeltaConfigError(f"energy must be in (0, 1], e.g. 0.9; got {self.energy!r}.")
        if self.factor_dtype not in _DTYPES:
            raise DeltaConfigError(f"factor_dtype must be one of {sorted(_DTYPES)}, got {self.factor_dtype!r}.")


def compress_lowrank(ctx: CompressionContext) -> dict[str, CompressedWeight]:
    """Truncated SVD of every extracted delta matrix."""
    cfg: LowRankConfig = ctx.config
    deltas = ctx.extracted.compress
    if cfg.rank is not None and cfg.energy is None:
        for name, d in deltas.items():
            if cfg.rank > min(d.shape):
                raise DeltaConfigError(
                    f"rank={cfg.rank} exceeds min(out, in)={min(d.shape)} of {name!r} {tuple(d.shape)}; use "
                    f"rank <= {min(min(t.shape) for t in deltas.values())}, or energy=... to pick ranks per matrix.")
    dtype = _DTYPES[cfg.factor_dtype]
    return {
        name: LowRankWeight.from_delta(d, rank=cfg.rank, energy=cfg.energy, dtype=dtype)
        for name, d in tqdm(deltas.items(), desc="lowrank: SVD", disable=not ctx.progress, leave=False)
    }


register_delta_method(DeltaMethod(
    name="lowrank", config_class=LowRankConfig, weight_classes=(LowRankWeight,), compress=compress_lowrank,
))


# ===================================================================================================
# Export to a PEFT LoRA adapter
# ===================================================================================================


def _base_view(source: DeltaModel | None, base_model: PreTrainedModel | str | Path | None,
               delta: Delta) -> tuple[dict[str, torch.Tensor], Any, PreTrainedModel]:
    """Unwrapped base state dict, a module-by-name lookup that sees through delta wrappers, and the model."""
    from ..layers import _DeltaWrapper

    if base_model is None:
        if source is None:
            raise DeltaConfigError("export_peft_lora needs base_model=... when given a Delta (not a DeltaModel).")
        model, state = source.base_model, source._base_state  # checked against the delta when it was added
    else:
        model = load_model(base_model)
        # A base already wrapped by a DeltaModel names its weights "<module>.base_layer.<leaf>".
        state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
        holder = nn.Module()
        holder.state_dict = lambda: state  # the fingerprint reads plain parameter names
        check_base(delta.config.base_fingerprint, holder, delta="the exported delta",
                   base_name=delta.config.base_model_name_or_path)

    def module(name: str) -> nn.Module:
        m = model.get_submodule(name)
        return m.base_layer if isinstance(m, _DeltaWrapper) else m

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

    from ..model import DeltaModel

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
        base_model_name_or_path=delta.config.base_model_name_or_path, revision=delta.config.base_model_revision,
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

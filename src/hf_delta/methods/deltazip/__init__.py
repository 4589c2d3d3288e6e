"""DeltaZip: each delta matrix pruned (2:4 or unstructured) and quantised (2/3/4/8 bit) jointly, GPTQ-style.

For a linear layer with calibration inputs ``X`` the objective is ``min ||X (Δ − Δ̂)ᵀ||²``, whose Hessian is
``H = 2 XᵀX / n`` (plus ``damp · mean(diag H)`` on the diagonal). Columns are visited left to right; each
column is pruned (OBS saliency ``w² / [U]_jj²``, ``U`` the upper Cholesky factor of ``H⁻¹``) and quantised,
and its error ``e = (w − q) / U_jj`` is spread over the columns not yet visited: ``W[:, j:] -= e · U[j, j:]``
(applied lazily per block of columns). Layers are compressed in forward order, and each layer is calibrated
on the activations of the model whose earlier layers already carry their compressed deltas.

The embedding has no input activations, so vocabulary matrices are quantised round-to-nearest per row
(``embedding_method="rtn"``); ``"gptq"`` calibrates the output head's matrix on the head's inputs instead, be it
untied or tied to the embedding (then the one matrix serves both).

Experts of a fused Mixture-of-Experts parameter (``<parameter>[<expert>]`` deltas) are compressed one expert at a
time, in the layer walk after the layer's other targets, each on the tokens the router sends it (``calibrate.py``);
an expert no calibration token reaches, or any expert with ``use_hessian=False``, is pruned by magnitude and
quantised round to nearest.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch

from ...errors import CalibrationError, DeltaConfigError
from ...extract import as_out_in, is_conv1d, split_expert_key, vocab_module_names
from ...utils.memory import row_blocks
from ..base import CompressedWeight, CompressionContext, DeltaMethod
from ..registry import register_delta_method
from .calibrate import LayerCalibrator
from .config import DeltaZipConfig
from .gptq import QuantizedMatrix, inverse_hessian_factor, layout_of, prune_quantize
from .weight import LAYOUTS, DeltaZipWeight

if TYPE_CHECKING:
    from ...calibration import Batch

_CHUNK_VALUES = 1 << 22  # values quantised at once by round to nearest

__all__ = [
    "LAYOUTS",
    "DeltaZipConfig",
    "DeltaZipWeight",
    "QuantizedMatrix",
    "compress_deltazip",
    "inverse_hessian_factor",
    "prune_quantize",
    "quantize_delta",
]


def check_targets(cfg: DeltaZipConfig, deltas: dict[str, torch.Tensor], pruned: set[str]) -> None:
    """Shape constraints of the chosen layout on the actual target matrices, before any work."""
    for name, delta in deltas.items():
        k = delta.shape[1]
        if cfg.group_size is not None and k % cfg.group_size:
            raise DeltaConfigError(
                f"group_size={cfg.group_size} does not divide in_features={k} of {name!r}; choose a divisor of "
                f"{k} (e.g. {math.gcd(k, cfg.group_size)}) or group_size=None (per channel).")
        if cfg.pruning == "2:4" and name in pruned and k % 4:
            raise DeltaConfigError(
                f"sparsity='2:4' needs in_features divisible by 4, but {name!r} has {k}; use an unstructured "
                "sparsity such as 0.5, or exclude it from target_modules.")


def quantize_delta(cfg: DeltaZipConfig, delta: torch.Tensor, hessian: torch.Tensor | None, *, vocab: bool,
                   head: bool, as_linear: bool) -> tuple[DeltaZipWeight, torch.Tensor]:
    """One matrix's compressed delta and its dequantised value (what the model then carries).

    ``vocab``: an embedding or output-head matrix (its own bit width); ``head``: the head's matrix;
    ``as_linear``: calibrated like a linear layer, so pruned too (a vocabulary matrix calibrated as the head).
    """
    bits = cfg.bits
    if vocab:
        bits = (cfg.head_bits if head else None) or cfg.embedding_bits or cfg.bits
    sparsity = cfg.pruning if as_linear else None
    options = {"bits": bits, "group_size": cfg.group_size, "prune": cfg.prune, "damp": cfg.damp,
               "block_size": cfg.block_size}
    if hessian is None and sparsity is None:
        # Round to nearest: rows are independent, so a 32000-row vocabulary matrix is done in row chunks
        # (the solver's float32 work on the whole matrix was the peak of DeltaZip at 7B-class sizes).
        parts = [prune_quantize(delta[rows], None, **options)
                 for rows in row_blocks(delta.shape[0], delta.shape[1], values=_CHUNK_VALUES)]
        qm = QuantizedMatrix(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]),
                             None if parts[0].keep is None else torch.cat([p.keep for p in parts]))
    else:
        qm = prune_quantize(delta, hessian, sparsity=sparsity, **options)
    weight = DeltaZipWeight.from_quantized(qm.q, qm.scales, qm.keep, bits=bits, group_size=cfg.group_size,
                                           layout=layout_of(qm, sparsity, bits))
    return weight, qm.dequantize()


def _matrix(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The weight a delta applies to, as an ``[out, in]`` view (writes reach the model): a module's ``weight``
    (a ``Conv1D``'s is stored ``[in, out]``), or one expert's matrix of a fused parameter."""
    expert = split_expert_key(name)
    if expert is None:
        module = model.get_submodule(name)
        return as_out_in(module.weight.data, is_conv1d(module))
    return model.get_parameter(expert[0]).data[expert[1]]


def compress_deltazip(ctx: CompressionContext) -> dict[str, CompressedWeight]:
    """Compress every extracted delta: linear layers by OBS/GPTQ in forward order, vocabulary matrices by RTN
    (or, with ``embedding_method="gptq"``, the output head's matrix like a linear layer, tied or not)."""
    cfg: DeltaZipConfig = ctx.config
    deltas = ctx.extracted.compress
    embed, head = vocab_module_names(ctx.base)
    vocab = {n for n in deltas if n in (embed, head)}
    experts = {n for n in deltas if split_expert_key(n) is not None}
    # Delta → the module whose inputs calibrate it. A tied matrix has input activations only as the output
    # head, so it is calibrated there (its errors then reach the input embedding uncompensated).
    as_linear = {n: n for n in deltas if n not in vocab and n not in experts}
    head_matrix = ctx.extracted.tied.get(head, head)
    if cfg.embedding_method == "gptq" and head_matrix in deltas:
        as_linear[head_matrix] = head
    check_targets(cfg, deltas, set(as_linear) | experts)
    calibrated = {m: n for n, m in as_linear.items()} if cfg.use_hessian else {}  # module → its delta
    routed = sorted(experts) if cfg.use_hessian else []  # calibrated on the tokens routed to each expert
    batches: list[Batch] = []
    if calibrated or routed:
        batches = ctx.calibration(n=cfg.calibration_samples, seq_len=cfg.calibration_seq_len,
                                  batch_size=cfg.calibration_batch_size)
        if not batches:
            raise CalibrationError("The calibration set is empty; pass texts like the fine-tune's training data, "
                                   "or calibration=None to sample text from the fine-tune.")
    work = copy.deepcopy(ctx.finetuned).eval() if calibrated or routed else None
    base_weights = {n: _matrix(ctx.base, n) for n in deltas}
    if work is not None:
        for name, w in base_weights.items():  # start from the base; each layer gets its compressed delta in turn
            # A tied matrix calibrated as the head is compressed last, but the embedding is used first: until
            # then the decoder layers see the fine-tune's own embedding.
            if as_linear.get(name, name) == name:
                _matrix(work, name)[: w.shape[0]] = w.to(work.dtype)
    weights: dict[str, CompressedWeight] = {}

    def finish(name: str, hessian: torch.Tensor | None) -> None:
        weights[name], dequantized = quantize_delta(cfg, deltas[name], hessian, vocab=name in vocab,
                                                    head=name == head_matrix,
                                                    as_linear=name in as_linear or name in experts)
        if work is not None:
            base = base_weights[name]
            _matrix(work, name)[: base.shape[0]] = (base.float() + dequantized).to(work.dtype)

    def finish_group(modules: list[str], hessians: dict[str, torch.Tensor | None]) -> None:
        for module in modules:
            finish(calibrated.get(module, module), hessians[module])  # an expert key is its own delta

    for name in [n for n in deltas if n not in calibrated.values() and n not in routed]:
        finish(name, None)
    if calibrated or routed:
        LayerCalibrator(work, batches, list(calibrated), routed).run(finish_group, progress=ctx.progress)
    return {n: weights[n] for n in deltas}


register_delta_method(DeltaMethod(
    name="deltazip", config_class=DeltaZipConfig, weight_classes=(DeltaZipWeight,), compress=compress_deltazip,
))

"""DeltaZip's calibrated compression with one decoder layer in memory at a time (GPTQ's own order of work).

The calibration model is the fine-tune run layer by layer (``layerwise.py``) whose target matrices carry the
base's weight until their turn: the vocabulary matrices are quantised first (round to nearest) and written
back as base + compressed delta; then, layer by layer, each group of matrices that reads one input (q/k/v,
gate/up, ...) gets its Hessian from the current activations, is compressed and written back, and the layer's
output feeds the next. Only the current layer, the vocabulary matrices and the activations are resident. The
steps are those of the in-memory path (``methods/deltazip``), so the result is the same delta.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ..calibration import Batch
from ..extract import ExtractedDelta, as_out_in, pair_layout, split_tensor
from ..methods.base import CompressedWeight
from ..methods.deltazip import DeltaZipConfig, check_targets, quantize_delta
from ..methods.deltazip.calibrate import Hessian, call_groups, real_rows
from ..utils.memory import release_freed_memory
from .layerwise import LayerwiseModel
from .streaming import StreamedPair, _as_float, _read

logger = logging.getLogger(__name__)


def supports(config: DeltaZipConfig) -> bool:
    """Layer by layer covers calibrated linear layers and round-to-nearest vocabulary matrices."""
    return config.use_hessian and config.embedding_method == "rtn"


def _groups(layer: torch.nn.Module, prefix: str, targets: list[str], run) -> list[list[str]]:
    """The layer's targets grouped by shared input, in call order; any never called last (compressed without
    calibration, as the in-memory path does)."""
    groups = call_groups({n: layer.get_submodule(n[len(prefix) + 1:]) for n in targets}, run)
    called = {n for g in groups for n in g}
    unused = [n for n in targets if n not in called]
    return [*groups, unused] if unused else groups


def _hessians(layer: torch.nn.Module, prefix: str, group: list[str], run, masks: list[torch.Tensor]
              ) -> dict[str, torch.Tensor | None]:
    """``2 XᵀX / n`` of each module of ``group`` over the real tokens of every batch (``run(b)`` runs the layer)."""
    acc = {n: Hessian() for n in group}
    current = {"mask": None}
    hooks = [layer.get_submodule(n[len(prefix) + 1:]).register_forward_pre_hook(
        lambda _m, a, n=n: acc[n].add(real_rows(a[0], current["mask"]))) for n in group]
    try:
        for b, mask in enumerate(masks):
            current["mask"] = mask
            run(b)
    finally:
        for h in hooks:
            h.remove()
    return {n: a.h for n, a in acc.items()}


@torch.no_grad()
def stream_deltazip(pair: StreamedPair, ft_folder, config: DeltaZipConfig, batches: list[Batch], *,
                    progress: bool) -> tuple[ExtractedDelta, dict[str, CompressedWeight]]:
    """Compress the pair with DeltaZip, calibrated on ``batches``, one decoder layer at a time."""
    layout, out = pair_layout(pair.base, pair.finetuned, target_modules=config.target_modules,
                              compress_embeddings=config.compress_embeddings)
    state = pair.base.state_dict()
    head_matrix = out.tied.get(layout.head, layout.head)
    shapes = {n.rpartition(".")[0]: as_out_in(torch.empty(t.shape, device="meta"), n.rpartition(".")[0] in
                                              layout.transposed)
              for n, t in state.items() if n.endswith(".weight") and n.rpartition(".")[0] in layout.targets}
    check_targets(config, shapes, set(shapes))
    model = LayerwiseModel(ft_folder, ckpt=pair.ft_ckpt)
    weights: dict[str, CompressedWeight] = {}

    def base_weight(module: str) -> torch.Tensor:
        return _read(pair.base_ckpt, pair.base, f"{module}.weight")

    # Everything but the linear targets: exact tensors, new vocabulary rows, vocabulary deltas (round to nearest,
    # written into the calibration model as base + compressed delta, as the in-memory path does first).
    linear = {f"{t}.weight" for t in layout.targets}
    for name in [n for n in state if not layout.skips(n) and n not in linear]:
        large = name.rpartition(".")[0] in layout.vocab_modules  # read in its own dtype; its delta is fp32
        exact, new_rows = set(out.exact), set(out.new_rows)
        found = split_tensor(layout, name, _read(pair.base_ckpt, pair.base, name, as_float=not large),
                             _read(pair.ft_ckpt, pair.finetuned, name, as_float=not large), out)
        _as_float(out.exact, exact)
        _as_float(out.new_rows, new_rows)
        if not found:
            continue
        [(module, delta)] = found  # a vocabulary matrix: the only kind split_tensor returns here
        weights[module], dequantized = quantize_delta(config, delta, None, vocab=True, head=module == head_matrix,
                                                      as_linear=False)
        del delta
        target = model.model.get_submodule(module).weight
        rows = dequantized.shape[0]
        target.data[:rows] = base_weight(module)[:rows]
        target.data[:rows] += dequantized
        del dequantized
        release_freed_memory()
    inputs = [model.first_layer_inputs(b) for b in batches]
    model.drop_outside_layers()  # the vocabulary matrices were needed for those inputs only
    hidden = [h for h, _, _ in inputs]
    masks = [mask for _, mask in batches]
    for i in tqdm(range(len(model.layers)), desc="deltazip: layers", disable=not progress, leave=False):
        prefix = model.layer_name(i)
        with model.layer(i) as layer:
            targets = sorted(n for n in layout.targets if n.startswith(prefix + "."))
            for name in targets:  # the base's weight until its compressed delta is written
                layer.get_submodule(name[len(prefix) + 1:]).weight.data.copy_(base_weight(name))

            def run(b: int, layer=layer, hidden=hidden) -> torch.Tensor:
                return model.call_layer(layer, hidden[b], inputs[b])

            for group in _groups(layer, prefix, targets, lambda run=run: run(0)):
                hessians = _hessians(layer, prefix, group, run, masks)
                for name in group:
                    b_w, f_w = base_weight(name), _read(pair.ft_ckpt, pair.finetuned, f"{name}.weight")
                    out.kinds[name] = "linear"
                    flip = name in layout.transposed  # Conv1D: stored [in, out], compressed [out, in]
                    weights[name], dequantized = quantize_delta(config, as_out_in(f_w - b_w, flip).contiguous(),
                                                                hessians[name], vocab=False, head=False,
                                                                as_linear=True)
                    layer.get_submodule(name[len(prefix) + 1:]).weight.data.copy_(b_w + as_out_in(dequantized, flip))
                release_freed_memory()
            hidden = [run(b) for b in range(len(batches))]
        release_freed_memory()
    order = [n.rpartition(".")[0] for n in state if n.rpartition(".")[0] in weights]
    return out, {n: weights[n] for n in dict.fromkeys(order)}

"""BitDelta: each delta matrix as sign bits times a scale (per matrix or per output row).

``Δ ≈ Σ_p scale_p ⊙ sign(R_p)`` where ``R_0 = Δ`` and ``R_{p+1} = R_p − scale_p ⊙ sign(R_p)`` (residual
passes). For fixed signs the L2-optimal scale is ``mean(|R_p|)`` over the matrix (or over each row).
Scale distillation then trains only the scales so the compressed model's logits match the fine-tune's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..calibration import Batch
from ..config import DeltaConfig
from ..errors import DeltaConfigError, DeltaFormatError
from ..packing import pack_1bit_u8, packed_width, unpack_signs
from ..utils.logits import softcap_logits
from ..utils.memory import CHUNK_VALUES, release_freed_memory, row_blocks
from ..utils.progress import progress_range
from ._dispatch import IdentityCache, kernels_forced, stacked_slots, use_kernels
from .base import CompressedWeight, CompressionContext, DeltaMethod
from .registry import register_delta_method

_CHUNK_VALUES = CHUNK_VALUES  # a module attribute, so tests can make the blocks small


class _SignMatmul(torch.autograd.Function):
    """``x @ unpack(signs)ᵀ`` whose backward unpacks the signs again rather than saving the dense ±1 matrix.

    Both directions unpack a block of output rows at a time: a 32000-row output head's dense ±1 matrix (plus the
    int64 indices the unpacking reads) would otherwise be ~0.2 GB at every step of scale distillation.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, signs: torch.Tensor, in_features: int) -> torch.Tensor:
        ctx.save_for_backward(signs)
        ctx.in_features = in_features
        out = x.new_empty(*x.shape[:-1], signs.shape[0])
        for rows in row_blocks(signs.shape[0], in_features, values=_CHUNK_VALUES):
            out[..., rows] = x @ unpack_signs(signs[rows], in_features, x.dtype).T
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (signs,) = ctx.saved_tensors
        # The blocks' products are summed in float32: adding bf16 partial products would round once per block.
        total = None
        for rows in row_blocks(signs.shape[0], ctx.in_features, values=_CHUNK_VALUES):
            part = grad[..., rows].float() @ unpack_signs(signs[rows], ctx.in_features, torch.float32)
            total = part if total is None else total.add_(part)
        return total.to(grad.dtype), None, None


class BitDeltaWeight(CompressedWeight):
    """Packed signs ``[passes, out, ceil(in / 8)]`` (uint8) and fp32 scales ``[passes, out or 1]``."""

    method = "bitdelta"

    def __init__(self, shape: tuple[int, int], signs: torch.Tensor, scales: torch.Tensor):
        super().__init__(shape)
        self.register_buffer("signs", signs)
        self.register_buffer("scales", scales)

    @property
    def passes(self) -> int:
        return self.signs.shape[0]

    @classmethod
    def from_delta(cls, delta: torch.Tensor, *, per_row: bool = False, passes: int = 1) -> BitDeltaWeight:
        """Compress a dense ``[out, in]`` delta with ``passes`` sign masks (1 = plain BitDelta).

        Rows are processed in chunks of about ``_CHUNK_VALUES`` values, so the float32 work of a 32000-row
        vocabulary matrix stays a few tens of MB instead of several times the matrix (a 7B model's head).
        """
        out_f, in_f = delta.shape
        chunks = row_blocks(out_f, in_f, values=_CHUNK_VALUES)
        signs = torch.empty(passes, out_f, packed_width(in_f, 1), dtype=torch.uint8, device=delta.device)
        scales = torch.empty(passes, out_f if per_row else 1, dtype=torch.float32, device=delta.device)
        for p in range(passes):
            total = torch.zeros((), dtype=torch.float64, device=delta.device)
            for rows in chunks:
                # This pass's residual: the delta minus what the earlier passes already represent.
                residual = delta[rows].to(torch.float32, copy=True)  # worked on in place below
                for q in range(p):
                    scale = scales[q, rows] if per_row else scales[q]
                    residual -= scale.unsqueeze(-1) * unpack_signs(signs[q, rows], in_f)
                signs[p, rows] = pack_1bit_u8(residual >= 0)
                mag = residual.abs_()
                if per_row:
                    scales[p, rows] = mag.mean(dim=1)
                else:
                    total += mag.sum(dtype=torch.float64)
            if not per_row:
                scales[p] = (total / max(delta.numel(), 1)).float()
        return cls(tuple(delta.shape), signs, scales)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=torch.float32, device=self.signs.device)
        for p in range(self.passes):
            out += self.scales[p].unsqueeze(-1) * unpack_signs(self.signs[p], self.shape[1])
        return out.to(dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.zeros((*index.shape, self.shape[1]), dtype=torch.float32, device=self.signs.device)
        for p in range(self.passes):
            scale = self.scales[p][index] if self.scales.shape[1] > 1 else self.scales[p]
            out += scale.unsqueeze(-1) * unpack_signs(self.signs[p][index], self.shape[1])
        return out.to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        # Scale after the matmul: x @ signᵀ is exact in the activation dtype's accumulation, then one multiply.
        # Under autograd (scale distillation) the ±1 matrix is re-unpacked in the backward instead of being
        # kept for it: a 7B model would otherwise hold every layer's dense sign matrix until the backward.
        grad = torch.is_grad_enabled() and x.requires_grad
        out = None
        for p in range(self.passes):
            signs = _SignMatmul.apply(x, self.signs[p], self.shape[1]) if grad else \
                x @ unpack_signs(self.signs[p], self.shape[1], x.dtype).T
            y = signs * self.scales[p].to(x.dtype)
            out = y if out is None else out + y
        return out

    def _kernel_scales(self) -> torch.Tensor:
        scales = self.scales.float()
        return scales.expand(self.passes, self.shape[0]) if scales.shape[1] == 1 else scales

    def add_to_rows(self, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None) -> None:
        if not use_kernels(x, self.scales):
            super().add_to_rows(x, out, rows)  # CPU, or autograd (scale distillation; the kernel has no backward)
            return
        from hf_delta.kernels import bitdelta_matmul

        # Fused: the kernel reads the packed bits once, picks this delta's rows by slot (0 = this delta,
        # -1 = skip) and adds scale ⊙ (x @ signᵀ) straight into the base output; no gather, no dense delta.
        slots, plan = stacked_slots([rows], x.shape[0], x.device)
        bitdelta_matmul(x.contiguous(), out, slots, self.signs.unsqueeze(0), self._kernel_scales().unsqueeze(0),
                        plan=plan, backend="triton" if kernels_forced() else "auto")

    def slot_format(self) -> tuple[int, int]:
        # Every BitDelta weight has a resident buffer: its tensors' shapes (passes, per-row or per-matrix
        # scales) and dtypes, which the buffer key includes, are its whole format.
        return self.shape

    @classmethod
    def add_to_rows_resident(cls, resident: dict[str, torch.Tensor], index: list[int],
                             weights: list[CompressedWeight], x: torch.Tensor, out: torch.Tensor,
                             rows: list[torch.Tensor], slot_plan: Callable[[], tuple[torch.Tensor, Any]]) -> bool:
        # Resident weights never need a gradient (the buffer refuses those), so only x decides the kernel.
        if use_kernels(x):
            from hf_delta.kernels import bitdelta_matmul

            # One launch for every delta of the layer: the kernel reads the buffer's rows by each row's slot.
            slots, plan = slot_plan()
            bitdelta_matmul(x.contiguous(), out, slots, resident["signs"], resident["scales"].float(), plan=plan,
                            backend="triton" if kernels_forced() else "auto")
            return True
        if len(weights) > 1 and resident["signs"].shape[1] == 1:
            cls._batched_resident(resident, index, weights, x, out, rows)
            return True
        return False

    @staticmethod
    def _batched_resident(resident: dict[str, torch.Tensor], index: list[int], weights: list[CompressedWeight],
                          x: torch.Tensor, out: torch.Tensor, rows: list[torch.Tensor]) -> None:
        """The CPU serving path (one sign pass): one unpack of the deltas' resident signs and one batched matmul
        over rows gathered per delta replace a Python loop of small operations."""
        plan = _ROW_PLANS.get(rows, (x.shape[0],), lambda: _RowPlan(rows, x.shape[0]))
        for d in plan.alone:
            weights[d].add_to_rows(x, out, rows[d])
        if plan.together:
            features_out, features_in = weights[0].shape
            slots = [index[d] for d in plan.together]
            if slots == list(range(slots[0], slots[0] + len(slots))):  # consecutive slots (the usual case): a view
                chosen = slice(slots[0], slots[0] + len(slots))
            else:
                chosen = torch.tensor(slots, device=x.device)
            signs = unpack_signs(resident["signs"][chosen, 0], features_in, x.dtype)  # [D, out, in]
            gathered = torch.cat([x, x.new_zeros(1, features_in)])[plan.index]  # padding rows read zeros
            scales = resident["scales"][chosen, 0].to(x.dtype).unsqueeze(1)
            y = (torch.bmm(gathered, signs.transpose(1, 2)) * scales).reshape(-1, features_out)
            out.index_add_(0, plan.targets, y.index_select(0, plan.sources).to(out.dtype))

    def meta(self) -> dict[str, Any]:
        return {"shape": list(self.shape)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BitDeltaWeight:
        shape, signs, scales = tuple(meta["shape"]), tensors["signs"], tensors["scales"]
        ok = (
            len(shape) == 2
            and signs.dtype == torch.uint8
            and signs.dim() == 3
            and tuple(signs.shape[1:]) == (shape[0], packed_width(shape[1], 1))
            and scales.dim() == 2
            and scales.shape[0] == signs.shape[0]
            and scales.shape[1] in (1, shape[0])
        )
        if not ok:
            raise DeltaFormatError(
                f"BitDelta tensors do not fit a {list(shape)} matrix: signs {signs.dtype} {list(signs.shape)}, "
                f"scales {list(scales.shape)} (expected uint8 [passes, {shape[0]}, ceil(in / 8)] and "
                "[passes, 1 or out]). The delta repo is corrupt; re-download or re-save it."
            )
        return cls(shape, signs, scales)


class _RowPlan:
    """How rows of a mixed batch are gathered per delta (padded to the busiest one) and scattered back.

    A delta with many more rows than the others (a popular one, or a prompt being prefilled) runs alone:
    padding every other delta to its row count would multiply the batched matmul's work.
    """

    def __init__(self, rows: list[torch.Tensor], n: int):
        counts = [len(r) for r in rows]
        limit = max(8, 2 * sorted(counts)[len(counts) // 2])
        self.alone = [d for d, c in enumerate(counts) if c > limit]
        self.together = [d for d, c in enumerate(counts) if c <= limit]
        if len(self.together) < 2:
            self.alone, self.together = list(range(len(rows))), []
            return
        self.index = torch.nn.utils.rnn.pad_sequence([rows[d] for d in self.together], batch_first=True,
                                                     padding_value=n)  # [D, most rows]
        valid = (self.index < n).reshape(-1)
        self.sources = valid.nonzero().squeeze(1)
        self.targets = self.index.reshape(-1)[self.sources]


_ROW_PLANS = IdentityCache()


@dataclass
class BitDeltaConfig(DeltaConfig):
    """BitDelta: 1-bit signs and scales, then scale distillation.

    Args:
        scale: ``"row"`` (one scale per output row, the default) or ``"matrix"`` (one per matrix, as the paper).
            Per-row scales cost 4 bytes a row and matter on small models: rows a fine-tune never touched
            (unused vocabulary) get a zero scale instead of ±scale noise.
        residual_passes: extra sign masks fitted to what the previous passes left (0 = plain BitDelta);
            each pass adds one bit per weight and recovers more of the fine-tune.
        distill_steps: Adam steps of scale distillation (0 skips it: "BitDelta-initial").
        distill_lr: Adam step size of scale distillation, relative to each matrix's mean scale (so the same
            value suits deltas of any magnitude; 0.1 ≈ the paper's 1e-4 on 7B-model deltas).
        distill_samples / distill_seq_len / distill_batch_size: calibration set size and shape.
    """

    scale: str = "row"
    residual_passes: int = 0
    distill_steps: int = 200
    distill_lr: float = 0.1
    distill_samples: int = 64
    distill_seq_len: int = 128
    distill_batch_size: int = 8

    def validate(self) -> None:
        super().validate()
        if self.scale not in ("matrix", "row"):
            raise DeltaConfigError(f"BitDeltaConfig.scale must be 'matrix' or 'row', got {self.scale!r}.")
        if self.residual_passes < 0 or self.distill_steps < 0:
            raise DeltaConfigError("residual_passes and distill_steps must be >= 0.")
        if self.distill_lr <= 0:
            raise DeltaConfigError(f"distill_lr must be positive, got {self.distill_lr}.")


def compress_bitdelta_matrix(delta: torch.Tensor, kind: str, cfg: BitDeltaConfig) -> BitDeltaWeight:
    """Sign + scale of one delta matrix (``kind`` does not matter to BitDelta)."""
    return BitDeltaWeight.from_delta(delta, per_row=cfg.scale == "row", passes=1 + cfg.residual_passes)


def compress_bitdelta(ctx: CompressionContext) -> dict[str, CompressedWeight]:
    """Sign + scale of every extracted delta matrix."""
    items = ctx.extracted.compress.items()
    return {
        name: compress_bitdelta_matrix(delta, ctx.extracted.kinds.get(name, "linear"), ctx.config)
        for name, delta in tqdm(items, desc="bitdelta: signs", disable=not ctx.progress, leave=False)
    }


def _checksum(tensors) -> float:
    """Sum of every value in float64, a chunk at a time (no float64 copy of a whole vocabulary matrix)."""
    return float(sum(chunk.double().sum() for t in tensors for chunk in t.detach().reshape(-1).split(_CHUNK_VALUES)))


@contextlib.contextmanager
def _recomputed_layers(model: nn.Module) -> Iterator[None]:
    """Decoder layers whose activations are recomputed in the backward instead of kept (gradient checkpointing).

    Kept activations grow with depth (~80 MB a layer for 4 x 128 tokens at hidden 2048), the largest part of
    distillation's memory beyond the base itself. transformers' own switch needs train mode, which would also
    turn dropout on, so each layer's forward is wrapped here, in eval mode, and restored afterwards.
    """
    get_decoder = getattr(getattr(model, "base_model", model), "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if get_decoder is not None else None
    wrapped = list(layers) if isinstance(layers, nn.ModuleList) else []
    for layer in wrapped:
        layer.forward = lambda *a, _f=layer.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    try:
        yield
    finally:
        for layer in wrapped:
            del layer.forward


def _head_path(model: nn.Module, batch: Batch) -> tuple[nn.Module, nn.Module, int] | None:
    """``(decoder, head, vocabulary)`` when the model's logits are its soft-capped output head applied to its
    decoder's output (checked on one sequence: it must give the very logits of the model's forward), else ``None``
    (models that scale or mix logits otherwise: the loss then runs on the whole logits)."""
    base = getattr(model, "base_model", model)
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if head is None or decoder is None or decoder is base:
        return None
    ids, mask = (t[:1].to(model.device) for t in batch)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        split = softcap_logits(head(hidden), base.config)
    return (decoder, head, whole.shape[-1]) if torch.equal(whole, split) else None


def _block_loss(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor, config: Any) -> torch.Tensor:
    logits = softcap_logits(head(hidden), config).float()
    return ((logits - target[:, : logits.shape[-1]]) ** 2).sum()


def _distill_loss(model: nn.Module, path: tuple[nn.Module, nn.Module, int] | None, ids: torch.Tensor,
                  mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the student's and the teacher's logits on the real tokens.

    With a ``path``, the output head and the loss run a block of tokens at a time, each block recomputed in the
    backward: the whole step's logits (and their copies in float32, the difference, the gradients) are never
    held at once, ~0.7 GB for 512 tokens at a 32000-word vocabulary.
    """
    real = mask.bool()
    if path is None:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        return ((logits[real] - target[real][:, : logits.shape[-1]]) ** 2).mean()
    decoder, head, vocabulary = path
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[real]
    tokens = real.reshape(-1).nonzero().squeeze(1)
    flat_target = target.reshape(-1, target.shape[-1])
    config = model.base_model.config
    total = sum(checkpoint(_block_loss, head, hidden[block], flat_target[tokens[block]], config, use_reentrant=False)
                for block in row_blocks(len(tokens), vocabulary, values=_CHUNK_VALUES))
    return total / (len(tokens) * vocabulary)


def distill_scales(model: nn.Module, ctx: CompressionContext) -> list[float]:
    """Train only the scales so the student's logits match the fine-tune's on real (unpadded) tokens.

    ``model`` is the ``DeltaModel`` that holds the new delta as ``"default"``.

    Returns the loss history. Everything but the scales is frozen, and this is checked afterwards.
    """
    cfg: BitDeltaConfig = ctx.config
    if cfg.distill_steps == 0:
        return []
    batches = ctx.calibration(n=cfg.distill_samples, seq_len=cfg.distill_seq_len,
                              batch_size=cfg.distill_batch_size)
    # The teacher first: a streamed one runs the fine-tune layer by layer, best before the student's weights
    # are touched (a memory-mapped base becomes resident only then).
    teacher = ctx.teacher_logits(batches)
    weights = [w for w in model.get_delta("default").weights.values() if isinstance(w, BitDeltaWeight)]
    frozen = [p for p in model.parameters()] + [w.signs for w in weights]
    before = _checksum(frozen)
    for w in weights:
        w.scales = nn.Parameter(w.scales.detach().clone())
    groups = [{"params": [w.scales], "lr": cfg.distill_lr * float(w.scales.detach().abs().mean()) or cfg.distill_lr}
              for w in weights]
    opt = torch.optim.Adam(groups)
    order = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.set_delta("default")
    path = _head_path(model, batches[0])
    try:
        with _recomputed_layers(model):
            for _ in progress_range(cfg.distill_steps, desc="bitdelta: scale distillation",
                                  disable=not ctx.progress):
                index = int(torch.randint(len(batches), (1,), generator=order))
                ids, mask = (t.to(model.device) for t in batches[index])
                loss = _distill_loss(model, path, ids, mask, teacher(index).to(model.device))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                release_freed_memory()  # each step unpacks every layer's signs: keep the heap from growing
    finally:
        for w in weights:
            w.scales = w.scales.detach()
    if _checksum(frozen) != before:
        raise RuntimeError("Scale distillation changed weights other than the scales; this is a bug in hf_delta.")
    return losses


register_delta_method(DeltaMethod(
    name="bitdelta", config_class=BitDeltaConfig, weight_classes=(BitDeltaWeight,),
    compress=compress_bitdelta, refine=distill_scales,
    compress_matrix=compress_bitdelta_matrix, data_free=lambda cfg: cfg.distill_steps == 0,
))

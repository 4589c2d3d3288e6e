"""Delta-aware layers: one shared base module, any number of resident deltas, a delta chosen per row.

Every wrapped module reads the current routing from one ``DeltaRouting`` object owned by the model:
either one active delta for the whole batch, or a slot index per row (or per token), ``-1`` = base only.

Semantics of a mixed batch, for each row ``r`` with delta ``d = slot[r]``:
``y[r] = base(x[r]) + Δ_d(x[r])`` for linear layers (compressed delta, exact bias difference, extra output
columns of a grown vocabulary), ``y[r] = module(x[r]; θ_d)`` for modules whose parameters a delta replaces.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DeltaNotFoundError, UnsupportedArchitectureError
from .extract import as_out_in, is_conv1d
from .methods.base import CompressedWeight
from .slots import SlotBuffer, buffer_key

BASE_SLOT = -1


class DeltaRouting:
    """Which delta each row uses in the current forward pass (shared by every delta-aware layer).

    ``capacity``: the slots each layer's resident buffers allocate up front (the serving engine sets its
    device slots here); 0 = buffers grow by doubling as deltas are attached.
    """

    def __init__(self) -> None:
        self.slots: list[str | None] = []  # slot id -> delta name (None = freed slot)
        self.active: str | None = None
        self.disabled = False
        self.capacity = 0
        self._row_slots: torch.Tensor | None = None
        # Every wrapped layer of one forward pass asks for the same routes and slot vectors: computed once per
        # input shape (and buffer layout), not once per layer.
        self._plans: dict[tuple, object] = {}

    @property
    def row_slots(self) -> torch.Tensor | None:
        """The slot of each row (or token) of the current forward pass; ``None`` = the active delta everywhere."""
        return self._row_slots

    @row_slots.setter
    def row_slots(self, value: torch.Tensor | None) -> None:
        self._row_slots = value
        self._plans = {}

    @contextlib.contextmanager
    def use(self, row_slots: torch.Tensor | None) -> Iterator[None]:
        """Within this block rows use ``row_slots``; the previous routing comes back afterwards, errors too."""
        previous = self._row_slots
        self.row_slots = row_slots
        try:
            yield
        finally:
            self.row_slots = previous

    def slot_of(self, name: str) -> int:
        if name not in self.slots:
            raise DeltaNotFoundError(f"No delta named {name!r} is loaded; loaded: {[s for s in self.slots if s]}.")
        return self.slots.index(name)

    def add(self, name: str) -> int:
        if None in self.slots:
            slot = self.slots.index(None)
            self.slots[slot] = name
        else:
            slot = len(self.slots)
            self.slots.append(name)
        return slot

    def routes(self, lead_shape: torch.Size, device: torch.device) -> list[tuple[str, torch.Tensor | None]]:
        """``(delta name, flat row indices)`` pairs; indices are ``None`` when the delta covers every row."""
        if self.disabled:
            return []
        if self._row_slots is None:
            return [] if self.active is None else [(self.active, None)]
        key = ("routes", tuple(lead_shape), device)
        if key not in self._plans:
            self._plans[key] = self._split(lead_shape, device)
        return self._plans[key]

    def slot_plan(self, lead_shape: torch.Size, device: torch.device, lut: tuple[int, ...],
                  num_slots: int) -> tuple[torch.Tensor, object]:
        """The buffer slot of each flat row (``lut[routing slot]``, ``-1`` for base rows) and its kernel tile plan
        over ``num_slots`` buffer slots; built once per forward pass for each distinct ``lut``, which every layer
        holding the same deltas in the same slots shares."""
        key = ("slots", tuple(lead_shape), device, lut, num_slots)
        if key not in self._plans:
            from hf_delta.kernels import plan_bitdelta_batch

            table = torch.tensor((*lut, BASE_SLOT), dtype=torch.int32, device=device)
            slots = table[self._flat(lead_shape, device)]  # a base row's -1 picks the trailing BASE_SLOT
            self._plans[key] = (slots, plan_bitdelta_batch(slots, num_slots))
        return self._plans[key]

    def _flat(self, lead_shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The routing slot of every flat row (or token) of an input with leading dims ``lead_shape``."""
        key = ("flat", tuple(lead_shape), device)
        if key in self._plans:
            return self._plans[key]
        idx = self._row_slots.to(device)
        if idx.dim() > 1 and idx.numel() == math.prod(lead_shape):
            idx = idx.reshape(lead_shape)  # per-token slots seen by a block that flattens its tokens (MoE)
        if idx.shape[0] != lead_shape[0]:
            if not idx.shape[0] or lead_shape[0] % idx.shape[0]:
                raise ValueError(
                    f"Got {idx.shape[0]} delta names for a batch of {lead_shape[0]} rows; pass one name per "
                    "row (\"__base__\" for the base model)."
                )
            idx = idx.repeat_interleave(lead_shape[0] // idx.shape[0], dim=0)  # beams / return sequences
        while idx.dim() < len(lead_shape):
            idx = idx.unsqueeze(-1)
        self._plans[key] = idx.expand(lead_shape).reshape(-1)
        return self._plans[key]

    def _split(self, lead_shape: torch.Size, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        flat = self._flat(lead_shape, device)
        present = torch.unique(flat).tolist()
        if len(present) == 1 and present[0] != BASE_SLOT:  # one delta for every row: no gather or scatter
            return [(self.slots[present[0]], None)]
        return [(self.slots[slot], (flat == slot).nonzero().squeeze(1)) for slot in present if slot != BASE_SLOT]


class DeltaParts:
    """What one delta holds for one module: a compressed weight and/or exact tensors and new vocab rows.

    A plain slotted object, not an ``nn.Module``: a model with hundreds of resident deltas would otherwise
    carry thousands of modules, whose Python bookkeeping outweighs a small delta's tensors.
    """

    __slots__ = ("_exact", "new_rows", "weight")

    def __init__(self, weight: CompressedWeight | None = None, exact: dict[str, torch.Tensor] | None = None,
                 new_rows: torch.Tensor | None = None):
        self.weight = weight
        self._exact = dict(exact or {})
        self.new_rows = new_rows

    @property
    def exact_names(self) -> list[str]:
        return sorted(self._exact)

    def exact(self) -> dict[str, torch.Tensor]:
        return self._exact

    def apply_(self, fn) -> DeltaParts:
        """Apply a tensor function (``.to(device)``, casts) to every tensor held, in place."""
        if self.weight is not None:
            self.weight._apply(fn)
        self._exact = {k: fn(v) for k, v in self._exact.items()}
        if self.new_rows is not None:
            self.new_rows = fn(self.new_rows)
        return self


class DeltaWrapper(nn.Module):
    def __init__(self, base_layer: nn.Module, routing: DeltaRouting):
        super().__init__()
        self.base_layer = base_layer
        self.deltas: dict[str, DeltaParts] = {}
        object.__setattr__(self, "routing", routing)  # shared state, not a submodule

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for parts in self.deltas.values():  # model.to(device) moves resident deltas too
            parts.apply_(fn)
        return self

    def check(self, parts: DeltaParts) -> None:
        """Raise ``UnsupportedArchitectureError`` if ``parts`` cannot be applied to this module exactly."""

    def attach(self, name: str, parts: DeltaParts, slot: int) -> None:
        """Hold ``parts`` as delta ``name``, whose rows carry routing slot ``slot``."""
        self.deltas[name] = parts

    def detach(self, name: str) -> None:
        """Stop holding delta ``name`` (nothing happens if it is not held)."""
        self.deltas.pop(name, None)

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight of embeddings and heads
        return self.base_layer.weight

    def _named_routes(self, lead_shape: torch.Size, device: torch.device):
        for name, rows in self.routing.routes(lead_shape, device):
            if name in self.deltas:
                yield name, self.deltas[name], rows

    def _routes(self, lead_shape: torch.Size, device: torch.device):
        for _, parts, rows in self._named_routes(lead_shape, device):
            yield parts, rows


def _take(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def _call_with(module: nn.Module, params: dict[str, torch.Tensor], *args, **kwargs):
    """``module``'s own forward with some parameters replaced (the others are its own)."""
    return torch.func.functional_call(module, params, args, kwargs, strict=False)


def _check_affine(module: nn.Module) -> None:
    """Refuse a linear subclass whose own forward is not ``x @ Wᵀ + b``: a compressed delta adds ``x @ Δᵀ`` to
    that forward, which is exact only for an affine one. Checked once, on random inputs."""
    from transformers.pytorch_utils import Conv1D

    if type(module).forward in (nn.Linear.forward, Conv1D.forward):
        return
    weight = as_out_in(module.weight, is_conv1d(module))
    probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        expected = F.linear(probe, weight, module.bias)
        got = module(probe)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-5):
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} is a linear layer whose forward is not x @ Wᵀ + b, so a delta cannot be added "
            "to its output exactly. Leave it out of target_modules (its changed weight is then stored whole) or "
            "merge the fine-tune instead."
        )


class DeltaLinear(DeltaWrapper):
    """A linear layer (``nn.Linear`` or ``Conv1D``) plus per-row deltas; the output may widen for a delta with a
    grown vocabulary.

    The base output is the wrapped module's own forward; a compressed delta adds ``x @ Δᵀ`` (``Δ`` is
    ``[out, in]`` whatever the module's storage layout), an exact weight runs the module with that weight.

    A compressed weight whose format has a resident buffer (``CompressedWeight.slot_format``) lives in a slot of
    this layer's buffer of that format while attached (``hf_delta.slots``): a mixed batch's kernel reads the
    buffer with a slot per row, built once per forward pass by the routing, and nothing is stacked per call.
    """

    def __init__(self, base_layer: nn.Module, routing: DeltaRouting):
        super().__init__(base_layer, routing)
        self._buffers_by_format: dict[tuple, SlotBuffer] = {}
        self._format_of: dict[str, tuple] = {}  # resident delta name -> its buffer's key

    def check(self, parts: DeltaParts) -> None:
        if "weight" not in parts.exact_names and not getattr(self, "_affine", False):
            _check_affine(self.base_layer)  # only added contributions need it: a replaced weight runs the module
            self._affine = True

    def attach(self, name: str, parts: DeltaParts, slot: int) -> None:
        super().attach(name, parts, slot)
        self._make_resident(name, slot)

    def detach(self, name: str) -> None:
        key = self._format_of.pop(name, None)
        if key is not None:
            buffer = self._buffers_by_format[key]
            buffer.clear(name)
            if not len(buffer) and not self.routing.capacity:  # no configured slots to keep: free the memory
                del self._buffers_by_format[key]
        super().detach(name)

    def resident_buffer(self, name: str) -> SlotBuffer | None:
        """The slot buffer delta ``name``'s compressed weight lives in here, or ``None`` (the per-delta path)."""
        key = self._format_of.get(name)
        return None if key is None else self._buffers_by_format[key]

    def _make_resident(self, name: str, slot: int) -> None:
        weight = self.deltas[name].weight
        key = buffer_key(weight) if isinstance(weight, CompressedWeight) else None
        if key is None:
            return
        buffer = self._buffers_by_format.get(key)
        if buffer is None:
            buffer = self._buffers_by_format[key] = SlotBuffer(weight, self.routing.capacity)
        buffer.write(name, slot, weight, capacity=self.routing.capacity)
        self._format_of[name] = key

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)  # every delta's tensors moved or cast: views of the old buffers no more
        resident = sorted((slot, name) for buffer in self._buffers_by_format.values()
                          for name, slot in buffer.resident())
        self._buffers_by_format, self._format_of = {}, {}
        for slot, name in resident:  # written again in the same order: layers keep sharing slot vectors
            self._make_resident(name, slot)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        y = base(x)
        routes = list(self._named_routes(x.shape[:-1], x.device))
        if not routes:
            return y
        lead, out_features = x.shape[:-1], y.shape[-1]
        xf = x.reshape(-1, x.shape[-1])
        # Deltas that replace the weight (a grown or untargeted matrix) run the module with their own tensors.
        replaced = {id(p): _call_with(base, {k: v.to(x.dtype) for k, v in p.exact().items()}, _take(xf, rows))
                    for _, p, rows in routes if "weight" in p.exact_names}
        width = max([out_features] + [out_features + len(p.new_rows) for _, p, _ in routes if p.new_rows is not None]
                    + [out.shape[-1] for out in replaced.values()])
        yf = y.reshape(-1, out_features)
        if width > yf.shape[-1]:
            # Rows of deltas without these tokens must never pick them: lowest logit, not -inf (no NaN).
            yf = F.pad(yf, (0, width - yf.shape[-1]), value=torch.finfo(yf.dtype).min)
        else:
            yf = yf.clone()
        head = yf[:, :out_features]
        # Compressed weights of one kind are applied together: a kind may batch its deltas into one operation;
        # those of one resident buffer read it directly.
        batched: dict[type[CompressedWeight], tuple[list[CompressedWeight], list[torch.Tensor | None]]] = {}
        resident: dict[tuple, tuple[list[str], list[CompressedWeight], list[int], list[torch.Tensor]]] = {}
        for name, parts, rows in routes:
            exact = parts.exact()
            if id(parts) in replaced:
                out = replaced[id(parts)]
                yf[slice(None) if rows is None else rows, : out.shape[-1]] = out.to(yf.dtype)
                continue
            if parts.weight is not None:
                key = self._format_of.get(name) if rows is not None else None
                slot = None if key is None else self._buffers_by_format[key].holds(name, parts.weight)
                if slot is None:
                    weights, weight_rows = batched.setdefault(type(parts.weight), ([], []))
                else:
                    names, weights, index, weight_rows = resident.setdefault(key, ([], [], [], []))
                    names.append(name)
                    index.append(slot)
                weights.append(parts.weight)
                weight_rows.append(rows)
            if "bias" in exact:
                bias = (exact["bias"] - (base.bias if base.bias is not None else 0)).to(yf.dtype)
                if rows is None:
                    head += bias
                else:
                    head[rows] += bias
            if parts.new_rows is not None:
                extra = _take(xf, rows) @ parts.new_rows.to(x.dtype).T
                cols = slice(out_features, out_features + extra.shape[-1])
                if rows is None:
                    yf[:, cols] = extra
                else:
                    yf[rows, cols] = extra
        for key, (names, weights, index, weight_rows) in resident.items():
            buffer = self._buffers_by_format[key]
            lut = buffer.lut(names, len(self.routing.slots))
            plan = functools.partial(self.routing.slot_plan, lead, x.device, lut, buffer.capacity)
            if not buffer.kind.add_to_rows_resident(buffer.tensors, index, weights, xf, head, weight_rows, plan):
                group = batched.setdefault(buffer.kind, ([], []))
                group[0].extend(weights)
                group[1].extend(weight_rows)
        for kind, (weights, weight_rows) in batched.items():
            kind.add_to_rows_many(weights, xf, head, weight_rows)
        return yf.reshape(*lead, width)


class DeltaEmbedding(DeltaWrapper):
    """The token embedding plus per-row deltas, including rows of tokens a fine-tune added.

    Each row's output is the wrapped module's own forward (a subclass may scale, as Gemma's does) on the rows
    of its table that the row's tokens use: the base's for ``__base__`` rows, ``base + Δ`` (or the delta's
    exact table, or its added rows) for the others.
    """

    def __init__(self, base_layer: nn.Module, routing: DeltaRouting):
        super().__init__(base_layer, routing)
        if getattr(base_layer, "max_norm", None) is not None:
            raise UnsupportedArchitectureError(
                f"{type(base_layer).__name__} has max_norm={base_layer.max_norm}: its forward renormalises the "
                "whole table, so a delta's rows cannot be applied exactly. Merge the fine-tune instead, or keep "
                "the embedding out of the delta (compress_embeddings=False leaves it unchanged only if the "
                "fine-tune did not change it)."
            )

    def _lookup(self, table: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """The wrapped module's forward on ``ids`` of a table whose rows ``table(used)`` gives (rows are gathered
        first: ``ids`` may exceed the base vocabulary, and no vocabulary-sized table is read or cast per delta)."""
        used, local = torch.unique(ids, return_inverse=True)
        proxy = self.__dict__.get("_proxy")
        if proxy is None:
            # A shallow copy that owns its parameter slots, with no padding index: a padding index only shapes
            # gradients, and must not exceed the gathered table.
            proxy = copy.copy(self.base_layer)
            proxy._parameters = dict(proxy._parameters)
            proxy.padding_idx = None
            self.__dict__["_proxy"] = proxy
        return _call_with(proxy, {"weight": table(used)}, local)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        vocab = base.num_embeddings
        routes = list(self._routes(ids.shape, ids.device))
        grown = ids >= vocab
        y = base(ids.clamp(max=vocab - 1))
        if not routes and not bool(grown.any()):
            return y
        flat_ids = ids.reshape(-1)
        yf = y.reshape(-1, y.shape[-1]).clone()
        covered = torch.zeros_like(flat_ids, dtype=torch.bool)
        for parts, rows in routes:
            r = torch.arange(len(flat_ids), device=ids.device) if rows is None else rows
            rid = flat_ids[r]
            covered[r] = True
            exact = parts.exact()
            if "weight" in exact:
                table = exact["weight"]
                self._check_range(rid, table.shape[0])
                yf[r] = self._lookup(lambda used, t=table: t[used].to(yf.dtype), rid).to(yf.dtype)
                continue
            self._check_range(rid, vocab + (len(parts.new_rows) if parts.new_rows is not None else 0))
            yf[r] = self._lookup(lambda used, p=parts: self._rows(p, used, yf.dtype), rid).to(yf.dtype)
        if bool((grown.reshape(-1) & ~covered).any()):
            self._check_range(flat_ids[~covered], vocab)
        return yf.reshape(*ids.shape, -1)

    def _rows(self, parts: DeltaParts, used: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The fine-tuned table's rows ``used``: base + Δ for base tokens, the delta's own rows for added ones."""
        vocab = self.base_layer.num_embeddings
        old = used < vocab
        rows = self.base_layer.weight[used.clamp(max=vocab - 1)].to(dtype)
        if parts.weight is not None and bool(old.any()):
            rows[old] = rows[old] + parts.weight.rows(used[old], dtype)
        if parts.new_rows is not None and bool((~old).any()):
            rows[~old] = parts.new_rows[used[~old] - vocab].to(dtype)
        return rows

    @staticmethod
    def _check_range(ids: torch.Tensor, limit: int) -> None:
        if ids.numel() and int(ids.max()) >= limit:
            raise IndexError(
                f"Token id {int(ids.max())} is outside the vocabulary ({limit} tokens) of the delta used for "
                "this row. Tokenize each prompt with the tokenizer of the delta it runs on."
            )


class DeltaRowSelect(DeltaWrapper):
    """A module called with arguments of its own (position embeddings: ``position_ids``, an attention mask)
    whose parameters a delta replaces exactly: the module runs once per delta on the whole batch, with that
    delta's parameters, and each row keeps its own delta's result.

    An output of batch size 1 (positions shared by every row) is first expanded to the routed batch.
    """

    def forward(self, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(*args, **kwargs)
        slots = self.routing.row_slots
        if slots is not None and y.shape[0] == 1 and len(slots) > 1:
            y = y.expand(len(slots), *y.shape[1:])
        routes = list(self._routes(y.shape[:-1], y.device))
        if not routes:
            return y
        yf = y.reshape(-1, y.shape[-1]).clone()
        for parts, rows in routes:
            params = {k: v.to(y.dtype) for k, v in parts.exact().items()}
            out = _call_with(self.base_layer, params, *args, **kwargs).to(y.dtype)
            out = out.expand(y.shape).reshape(yf.shape)
            if rows is None:
                yf = out.clone()
            else:
                yf[rows] = out[rows]
        return yf.reshape(y.shape)


class DeltaOverride(DeltaWrapper):
    """Any other module (norms, routers, ...) whose parameters a delta replaces, evaluated per row.

    The module's output may be a tuple (a Mixture-of-Experts router returns logits, weights and indices); each
    of its tensors must hold one entry per input row, as a row-wise module's do.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs):
        routes = list(self._routes(x.shape[:-1], x.device))
        if len(routes) > 1 and not (args or kwargs) and self._scaled_by_weight(x, routes):
            return self._scaled_forward(x, routes)
        y = self.base_layer(x, *args, **kwargs)
        if not routes:
            return y
        xf = x.reshape(-1, x.shape[-1])
        outputs = y if isinstance(y, tuple) else (y,)
        flat = [self._per_row(o, xf.shape[0]).clone() for o in outputs]
        for parts, rows in routes:
            params = {k: v.to(x.dtype) for k, v in parts.exact().items()}
            out = torch.func.functional_call(self.base_layer, params, (_take(xf, rows), *args), kwargs)
            for whole, part in zip(flat, out if isinstance(out, tuple) else (out,), strict=True):
                if rows is None:
                    whole.copy_(part.reshape(whole.shape))
                else:
                    whole[rows] = part.reshape(len(rows), -1).to(whole.dtype)
        done = tuple(f.reshape(o.shape) for f, o in zip(flat, outputs, strict=True))
        return done if isinstance(y, tuple) else done[0]

    def _per_row(self, out: torch.Tensor, rows: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.numel() % max(rows, 1):
            raise TypeError(
                f"{type(self.base_layer).__name__} returned {type(out).__name__} "
                f"{tuple(getattr(out, 'shape', ()))} for {rows} input rows, not one entry per row, so a delta "
                "cannot replace its parameters row by row; exclude it from the delta (its parameters then stay "
                "the base's) or open an issue with the model class."
            )
        return out.reshape(rows, -1)

    def _scaled_by_weight(self, x: torch.Tensor, routes: list[tuple[DeltaParts, torch.Tensor | None]]) -> bool:
        """Whether the module computes ``weight * f(x)`` exactly (RMSNorm-style) and the deltas replace only
        ``weight``: then a mixed batch needs one ``f(x)`` for every row instead of one module call per delta."""
        if any(rows is None or parts.exact_names != ["weight"] for parts, rows in routes):
            return False
        known = self.__dict__.get("_weight_scaled")
        if known is None:  # probed once per module, on random values in the input's dtype
            weight = getattr(self.base_layer, "weight", None)
            known = False
            if isinstance(weight, torch.Tensor) and weight.dim() == 1:
                gen = torch.Generator().manual_seed(0)
                probe = torch.randn(3, weight.shape[0], generator=gen).to(x.device, x.dtype)
                other = torch.randn(weight.shape, generator=gen).to(weight.device, weight.dtype)
                with torch.no_grad():
                    unit = self._call({"weight": torch.ones_like(weight)}, probe)
                    known = torch.equal(self._call({"weight": other}, probe), other.to(unit.dtype) * unit)
            self.__dict__["_weight_scaled"] = known
        return known

    def _call(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.base_layer, params, (x,))

    def _scaled_forward(self, x: torch.Tensor, routes: list[tuple[DeltaParts, torch.Tensor | None]]) -> torch.Tensor:
        base_weight = self.base_layer.weight
        unit = self._call({"weight": torch.ones_like(base_weight)}, x)
        flat = unit.reshape(-1, unit.shape[-1])
        table = torch.stack([base_weight.to(flat.dtype)] + [p.exact()["weight"].to(flat.dtype) for p, _ in routes])
        which = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        for k, (_, rows) in enumerate(routes, start=1):
            which[rows] = k
        return (table[which] * flat).reshape(unit.shape)


def wrapper_for(module: nn.Module, *, token_embedding: bool = False) -> type[DeltaWrapper]:
    """The wrapper class that can host deltas of ``module`` (``token_embedding``: the model's input embedding)."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return DeltaLinear
    if token_embedding and isinstance(module, nn.Embedding):
        return DeltaEmbedding
    if isinstance(module, nn.Embedding):  # positions, token types: looked up with ids of their own
        return DeltaRowSelect
    return DeltaOverride

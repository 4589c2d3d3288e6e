"""``DeltaModel``: many compressed fine-tunes resident beside one base model, PEFT-style."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from ._version import __version__
from .errors import ArchitectureMismatchError, DeltaNotFoundError
from .extract import as_out_in, is_conv1d, split_expert_key, vocab_module_names
from .fingerprint import check_base
from .layers import BASE_SLOT, DeltaParts, DeltaRouting, DeltaWrapper
from .layers_moe import ExpertDeltas, wrapper_for
from .methods.base import CompressedWeight
from .storage import GENERATION_CONFIG, Delta
from .utils.loading import load_model
from .utils.memory import release_freed_memory

logger = logging.getLogger(__name__)

BASE_NAME = "__base__"


def _owner(key: str) -> str:
    """The module a delta key applies to: the key itself, or the experts module of an expert's matrix."""
    expert = split_expert_key(key)
    return key if expert is None else expert[0].rpartition(".")[0]


class DeltaModel(nn.Module):
    """A base causal LM with any number of compressed deltas loaded beside it.

    Switching deltas copies no weights: every delta stays compressed in memory and is applied on the fly,
    per batch (``set_delta``) or per row (``generate(..., delta_names=[...])``).

    >>> model = DeltaModel.from_pretrained("org/base-model", "org/my-finetune-delta")  # doctest: +SKIP
    >>> model.load_delta("org/other-delta", delta_name="other")  # doctest: +SKIP
    >>> model.generate(**batch, delta_names=["default", "other"])  # doctest: +SKIP
    """

    def __init__(self, base_model: PreTrainedModel):
        super().__init__()
        self.base_model = base_model
        self.routing = DeltaRouting()
        self.deltas: dict[str, Delta] = {}
        self._wrapped: dict[str, DeltaWrapper] = {}
        # References, not copies: the fingerprint check and merges read the base's own tensors.
        self._base_state = dict(base_model.state_dict())
        for p in base_model.parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        base_model: str | Path | PreTrainedModel,
        delta_id: str | Path,
        delta_name: str = "default",
        *,
        revision: str | None = None,
        base_revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        ignore_base_mismatch: bool = False,
        dtype: torch.dtype | str | None = "auto",
        device_map: str | dict[str, Any] | None = None,
    ) -> DeltaModel:
        """Load ``base_model`` (object, folder or Hub id) and put the delta ``delta_id`` on it.

        Args:
            base_model: the base model, or where to load it from.
            delta_id: a delta repo: local folder or Hub repo id.
            delta_name: the name the delta gets on this model.
            revision: revision (branch, tag or commit) of the *delta* repo.
            base_revision: revision of the *base* model repo, when ``base_model`` is loaded here.
            token, cache_dir, local_files_only: passed to ``huggingface_hub`` (``HF_HUB_OFFLINE`` is honoured).
            ignore_base_mismatch: apply the delta even if the base's fingerprint differs from the recorded one.
            dtype: dtype to load the base in, as in transformers: ``"auto"`` (default) keeps the checkpoint's
                (bf16 for most LLMs); an object is used as is.
            device_map: where to put the base's layers, as in transformers (``"cuda"``, ``"auto"``, a dict);
                each delta is placed beside the layer it applies to.

        Raises:
            BaseModelMismatchError: the delta was made against another base.
            DeltaFormatError: the repo is not a valid delta repo.
        """
        extra = {"device_map": device_map} if device_map is not None else {}
        base = load_model(base_model, revision=base_revision, dtype=dtype, cache_dir=cache_dir, token=token,
                          local_files_only=local_files_only, **extra)
        model = cls(base)
        model.load_delta(delta_id, delta_name, revision=revision, token=token, cache_dir=cache_dir,
                         local_files_only=local_files_only, ignore_base_mismatch=ignore_base_mismatch)
        return model

    def load_delta(
        self,
        delta_id: str | Path,
        delta_name: str = "default",
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        ignore_base_mismatch: bool = False,
    ) -> Delta:
        """Load another delta (folder or Hub id) under ``delta_name``; it becomes active if none is."""
        from .hub import resolve_delta_folder

        folder = resolve_delta_folder(delta_id, revision=revision, token=token, cache_dir=cache_dir,
                                      local_files_only=local_files_only)
        delta = Delta.from_folder(folder)
        self.add_delta(delta_name, delta, ignore_base_mismatch=ignore_base_mismatch, source=str(delta_id))
        return delta

    def add_delta(self, delta_name: str, delta: Delta, *, ignore_base_mismatch: bool = False,
                  source: str | None = None) -> None:
        """Attach an in-memory ``Delta`` under ``delta_name``; it becomes active if none is.

        All or nothing: every tensor is first moved to the base's device, and only then installed in the
        layers; a failure at any point (a mismatched base, out of memory) leaves the model as it was. The
        caller's ``delta`` keeps its values: ``get_delta(delta_name)`` returns the attached copy, whose
        weights are the very objects the layers use. A compressed weight with a resident slot buffer
        (``hf_delta.slots``) is copied into a slot of its layer's buffer and its tensors become views of it;
        a weight already on the base's device is shared with ``delta`` (as its tensors were before), so
        ``delta``'s tensors become those views too, and get copies of their own back when it is deleted.
        """
        if delta_name == BASE_NAME:
            raise ValueError(f"{BASE_NAME!r} is reserved for 'no delta'; choose another delta_name.")
        if delta_name in self.deltas:
            raise ValueError(f"A delta named {delta_name!r} is already loaded; delete_delta it first or pick "
                             "another name.")
        check_base(delta.record.base_fingerprint, self._base_state, delta=source or delta_name,
                   base_name=delta.record.base_model_name_or_path, ignore_mismatch=ignore_base_mismatch)
        self._check_fits(delta, source or delta_name)
        attached, parts = self._moved_parts(delta)
        appended = None not in self.routing.slots
        slot = self.routing.add(delta_name)
        try:
            self._install(delta_name, parts, delta.tied, slot)
        except BaseException:
            if appended:
                self.routing.slots.pop()
            else:
                self.routing.slots[slot] = None
            raise
        self.deltas[delta_name] = attached
        if self.routing.active is None:
            self.routing.active = delta_name
        # Attaching copied the packed tensors into slot buffers (which may have grown): give back the heap
        # the loaded copies and the smaller buffers leave, or a 7B base with four deltas holds ~0.7 GB of them.
        release_freed_memory()

    def _device_of(self, module: str) -> torch.device:
        """Where the base's ``module`` lives (layers of one model may sit on several devices: device_map)."""
        param = next(self.base_module(module).parameters(), None)
        return self.device if param is None else param.device

    def _moved_parts(self, delta: Delta) -> tuple[Delta, dict[str, DeltaParts]]:
        """A copy of ``delta`` whose weights sit beside their layers, and its parts per module (nothing
        installed yet; the caller's tensors are not moved in place)."""
        weights = {key: weight.moved_to(self._device_of(_owner(key))) for key, weight in delta.weights.items()}
        # One weight object can sit in one slot buffer only (its tensors are views of that slot): a weight that
        # another attached delta already holds (the same Delta attached twice) gets an object of its own.
        held = {id(w) for d in self.deltas.values() for w in d.weights.values()}
        weights = {key: w.shallow_copy() if id(w) in held else w for key, w in weights.items()}
        per_module: dict[str, dict[str, Any]] = {}
        experts: dict[str, dict[str, dict[int, CompressedWeight]]] = {}  # experts module → leaf → expert → Δ
        for key, w in weights.items():
            expert = split_expert_key(key)
            if expert is None:
                per_module[key] = {"weight": w}
            else:
                module, _, leaf = expert[0].rpartition(".")
                experts.setdefault(module, {}).setdefault(leaf, {})[expert[1]] = w
        per_module.update({module: {"weight": ExpertDeltas(m)} for module, m in experts.items()})
        for param, value in delta.exact.items():
            module, _, leaf = param.rpartition(".")
            per_module.setdefault(module, {}).setdefault("exact", {})[leaf] = value.to(self._device_of(module))
        for module, rows in delta.new_rows.items():
            per_module.setdefault(module, {})["new_rows"] = rows.to(self._device_of(module))
        parts = {module: DeltaParts(**kw) for module, kw in per_module.items()}
        return dataclasses.replace(delta, weights=weights), parts

    def _install(self, delta_name: str, parts: dict[str, DeltaParts], tied: dict[str, str], slot: int) -> None:
        """Put ``parts`` into the layers (wrapping them as needed) for rows of routing slot ``slot``; undone
        completely if anything fails."""
        targets = [(module, p) for module, p in parts.items()]
        # One object: a tied head shares its embedding's delta.
        targets += [(head, parts[embed]) for head, embed in tied.items() if embed in parts]
        created = [module for module, _ in targets if module not in self._wrapped]
        try:
            for module, p in targets:
                wrapper = self._wrap(module)
                wrapper.check(p)
                wrapper.attach(delta_name, p, slot)
        except BaseException:
            for wrapper in self._wrapped.values():
                wrapper.detach(delta_name)
            for module in created:
                if module in self._wrapped:
                    self._unwrap(module)
            raise

    def _check_fits(self, delta: Delta, name: str) -> None:
        """Raise ``ArchitectureMismatchError`` if a tensor of ``delta`` has no counterpart of its shape here."""

        def expect(key: str, shape: tuple[int | None, ...], *, more_rows: bool = False) -> None:
            base = self._base_state.get(key)
            if base is None:
                raise ArchitectureMismatchError(
                    f"Delta {name!r} has a tensor for {key!r}, which this base model does not have: the delta was "
                    "made for another architecture."
                )
            # Vocabulary tables of a grown vocabulary may have more rows than the base's (None: any number).
            rows_ok = shape[0] is None or (shape[0] >= base.shape[0] if more_rows else shape[0] == base.shape[0])
            if len(shape) != base.dim() or shape[1:] != base.shape[1:] or not rows_ok:
                raise ArchitectureMismatchError(
                    f"Delta {name!r} holds {key!r} with shape {shape}, but the base model's is "
                    f"{tuple(base.shape)}: the delta was made for another architecture."
                )

        vocab = {f"{m}.weight" for m in vocab_module_names(self.base_model) if m is not None}
        for key, weight in delta.weights.items():
            expert = split_expert_key(key)
            if expert is None:
                if f"{key}.weight" not in self._base_state:
                    expect(f"{key}.weight", tuple(weight.shape))  # raises: the base has no such module
                # Deltas are [out, in]; a Conv1D stores its weight [in, out].
                expect(f"{key}.weight", tuple(weight.shape)[:: -1 if is_conv1d(self.base_module(key)) else 1])
                continue
            param, index = expert
            experts = self._base_state.get(param)
            if experts is None or experts.dim() != 3 or index >= experts.shape[0]:
                raise ArchitectureMismatchError(
                    f"Delta {name!r} has a matrix for expert {index} of {param!r}, which this base model does not "
                    "have: the delta was made for another architecture (or another number of experts)."
                )
            expect(param, (experts.shape[0], *weight.shape))
        for module, rows in delta.new_rows.items():
            expect(f"{module}.weight", (None, *rows.shape[1:]))
        for key, value in delta.exact.items():
            expect(key, tuple(value.shape), more_rows=key in vocab)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's own tensors under their plain names (``model.layers.0.mlp.up_proj.weight``, not
        the wrapped ``...up_proj.base_layer.weight``). References, not copies: do not modify them."""
        return dict(self._base_state)

    def base_module(self, name: str) -> nn.Module:
        """The base's module ``name``, seen through any delta wrapper around it."""
        module = self.base_model.get_submodule(name)
        return module.base_layer if isinstance(module, DeltaWrapper) else module

    def attached_tensors(self) -> list[torch.Tensor]:
        """Every delta tensor attached to the layers (a tensor a tied head shares appears once per layer)."""
        out: list[torch.Tensor] = []
        for wrapper in self._wrapped.values():
            for parts in wrapper.deltas.values():
                if parts.weight is not None:
                    out.extend(parts.weight.buffers())
                out.extend(parts.exact().values())
                if parts.new_rows is not None:
                    out.append(parts.new_rows)
        return out

    def _wrap(self, name: str) -> DeltaWrapper:
        if name in self._wrapped:
            return self._wrapped[name]
        parent_name, _, leaf = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
        module = getattr(parent, leaf)
        embed, _ = vocab_module_names(self.base_model)
        wrapper = wrapper_for(module, token_embedding=name == embed)(module, self.routing)
        setattr(parent, leaf, wrapper)
        self._wrapped[name] = wrapper
        return wrapper

    # ----------------------------------------------------------------------------------------- PEFT-style API
    @property
    def active_delta(self) -> str | None:
        """Name of the delta applied when no per-row ``delta_names`` are given."""
        return self.routing.active

    def list_deltas(self) -> list[str]:
        return list(self.deltas)

    def get_delta(self, delta_name: str) -> Delta:
        if delta_name not in self.deltas:
            raise DeltaNotFoundError(f"No delta named {delta_name!r}; loaded: {self.list_deltas()}.")
        return self.deltas[delta_name]

    def set_delta(self, delta_name: str) -> None:
        """Make ``delta_name`` the active delta (``"__base__"`` for none). No weights are copied."""
        if delta_name == BASE_NAME:
            self.routing.active = None
            return
        self.get_delta(delta_name)
        self.routing.active = delta_name

    def delete_delta(self, delta_name: str) -> None:
        """Remove a delta and free its memory."""
        self.get_delta(delta_name)
        for wrapper in self._wrapped.values():
            wrapper.detach(delta_name)
        del self.deltas[delta_name]
        self.routing.slots[self.routing.slot_of(delta_name)] = None
        if self.routing.active == delta_name:
            self.routing.active = next(iter(self.deltas), None)

    @contextlib.contextmanager
    def disable_delta(self) -> Iterator[None]:
        """Within this block the model is the plain base."""
        previous, self.routing.disabled = self.routing.disabled, True
        try:
            yield
        finally:
            self.routing.disabled = previous

    @contextlib.contextmanager
    def route(self, delta_names: Sequence[str | None] | None) -> Iterator[None]:
        """Within this block row ``i`` of every batch uses ``delta_names[i]`` (``"__base__"``/None = base)."""
        if delta_names is None:
            yield
            return
        slots = [BASE_SLOT if n in (None, BASE_NAME) else self.routing.slot_of(n) for n in delta_names]
        with self.routing.use(torch.tensor(slots, dtype=torch.long, device=self.device)):
            yield

    def forward(self, *args: Any, delta_names: Sequence[str | None] | None = None, **kwargs: Any):
        with self.route(delta_names):
            return self.base_model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, delta_names: Sequence[str | None] | None = None, **kwargs: Any):
        """``base_model.generate``; with ``delta_names`` each row of the batch uses its own delta.

        A delta's own ``generation_config.json`` (carried in its repo, e.g. a chat fine-tune's end-of-turn
        token) applies like the fine-tune's would, unless ``generation_config`` is given. In a batch that
        mixes deltas, their end-of-sequence tokens are pooled: a row may stop at any of them.
        """
        if "generation_config" not in kwargs:
            config = self._generation_config(delta_names)
            if config is not None:
                kwargs["generation_config"] = config
        with self.route(delta_names):
            return self.base_model.generate(*args, **kwargs)

    def _generation_config(self, delta_names: Sequence[str | None] | None) -> GenerationConfig | None:
        if delta_names is None:
            names = [] if self.routing.disabled or self.active_delta is None else [self.active_delta]
        else:
            names = list(dict.fromkeys(n for n in delta_names if n not in (None, BASE_NAME)))
        carried = [json.loads(self.get_delta(n).files[GENERATION_CONFIG]) for n in names
                   if GENERATION_CONFIG in self.get_delta(n).files]
        if not carried:
            return None
        config = copy.deepcopy(self.base_model.generation_config)
        if len(names) == 1:
            config.update(**carried[0])
            return config
        eos: list[int] = []
        for source in [config.to_dict(), *carried]:
            ids = source.get("eos_token_id")
            eos += [i for i in (ids if isinstance(ids, list) else [ids]) if i is not None and i not in eos]
        config.eos_token_id = eos
        return config

    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    # ------------------------------------------------------------------------------------ merging and saving
    def delta_weight(self, module: str, delta_name: str | None = None) -> torch.Tensor:
        """The dense fine-tuned weight of ``module`` under a delta (base + decompressed delta)."""
        name = delta_name or self.active_delta
        parts = self._wrapped[module].deltas[name]
        base_w = self._base_state[f"{module}.weight"]
        exact = parts.exact()
        if "weight" in exact:
            return exact["weight"].to(base_w.dtype)
        rows = base_w.shape[0]
        w = base_w.float()
        if parts.weight is not None:
            w = w + as_out_in(parts.weight.to_dense(torch.float32), is_conv1d(self.base_module(module)))
        if parts.new_rows is not None:
            w = torch.cat([w[:rows], parts.new_rows.float()])
        return w.to(base_w.dtype)

    def _unwrap(self, name: str) -> None:
        parent_name, _, leaf = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
        setattr(parent, leaf, self._wrapped.pop(name).base_layer)

    def unload(self) -> PreTrainedModel:
        """Remove every wrapper and return the untouched base model."""
        for name in list(self._wrapped):
            self._unwrap(name)
        self.deltas.clear()
        self.routing.slots.clear()
        self.routing.active = None
        return self.base_model

    @torch.no_grad()
    def merge_and_unload(self, delta_name: str | None = None) -> PreTrainedModel:
        """Fold one delta (default: the active one) into the base weights and return a plain model."""
        name = delta_name or self.active_delta
        delta = self.get_delta(name)
        merged: dict[str, torch.Tensor] = {}
        for module, wrapper in self._wrapped.items():
            if name not in wrapper.deltas or module in delta.tied:
                continue
            parts = wrapper.deltas[name]
            merged.update({f"{module}.{leaf}": v for leaf, v in parts.exact().items()})
            if isinstance(parts.weight, ExpertDeltas):
                for leaf in parts.weight.matrices:
                    key = f"{module}.{leaf}"
                    merged[key] = parts.weight.merged(leaf, parts.exact().get(leaf, self._base_state[key]))
            elif parts.weight is not None or parts.new_rows is not None:
                merged[f"{module}.weight"] = self.delta_weight(module, name)
        model = self.unload()
        if delta.vocab_size and delta.vocab_size != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(delta.vocab_size, mean_resizing=False)
        for key, value in merged.items():
            param = model.get_parameter(key)
            param.data = value.to(param.dtype).clone()
        if delta.tied:
            model.tie_weights()
        return model

    def save_pretrained(self, folder: str | Path, *, delta_name: str | None = None) -> None:
        """Save one delta (default: the active one) as a delta repo folder."""
        self.get_delta(delta_name or self.active_delta).save_pretrained(folder)

    def push_to_hub(self, repo_id: str, *, delta_name: str | None = None, token: str | None = None,
                    private: bool | None = None, revision: str | None = None,
                    commit_message: str = "Upload delta with hf_delta") -> str:
        """Upload one delta as a Hub model repo (created if needed); returns the commit URL/sha."""
        from .hub import push_delta_to_hub

        return push_delta_to_hub(self.get_delta(delta_name or self.active_delta), repo_id, token=token,
                                 private=private, revision=revision, commit_message=commit_message)

    def extra_repr(self) -> str:
        return f"deltas={self.list_deltas()}, active={self.active_delta!r}, hf_delta={__version__}"

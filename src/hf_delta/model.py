"""``DeltaModel``: many compressed fine-tunes resident beside one base model, PEFT-style."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from . import __version__
from ._loading import load_model
from .errors import ArchitectureMismatchError, DeltaNotFoundError
from .extract import vocab_module_names
from .fingerprint import check_base
from .layers import BASE_SLOT, DeltaParts, DeltaRouting, _DeltaWrapper, wrapper_for
from .storage import GENERATION_CONFIG, Delta

logger = logging.getLogger(__name__)

BASE_NAME = "__base__"


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
        self._wrapped: dict[str, _DeltaWrapper] = {}
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
        dtype: torch.dtype | None = None,
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
            dtype: dtype to load the base in (default float32 for a path/id; an object is used as is).

        Raises:
            BaseModelMismatchError: the delta was made against another base.
            DeltaFormatError: the repo is not a valid delta repo.
        """
        base = load_model(base_model, revision=base_revision, dtype=dtype or torch.float32,
                          cache_dir=cache_dir, token=token, local_files_only=local_files_only)
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
        """Attach an in-memory ``Delta`` under ``delta_name``."""
        if delta_name == BASE_NAME:
            raise ValueError(f"{BASE_NAME!r} is reserved for 'no delta'; choose another delta_name.")
        if delta_name in self.deltas:
            raise ValueError(f"A delta named {delta_name!r} is already loaded; delete_delta it first or pick "
                             "another name.")
        check_base(delta.config.base_fingerprint, self._base_state_model(), delta=source or delta_name,
                   base_name=delta.config.base_model_name_or_path, ignore_mismatch=ignore_base_mismatch)
        self._check_fits(delta, source or delta_name)  # before anything is wrapped: all or nothing
        device = next(self.base_model.parameters()).device
        per_module: dict[str, dict[str, Any]] = {}
        for module, weight in delta.weights.items():
            per_module.setdefault(module, {})["weight"] = weight
        for param, value in delta.exact.items():
            module, _, leaf = param.rpartition(".")
            per_module.setdefault(module, {}).setdefault("exact", {})[leaf] = value
        for module, rows in delta.new_rows.items():
            per_module.setdefault(module, {})["new_rows"] = rows
        made: dict[str, DeltaParts] = {}
        for module, kw in per_module.items():
            made[module] = DeltaParts(**kw).apply_(lambda t: t.to(device))
            self._wrap(module).deltas[delta_name] = made[module]
        for head, embed in delta.tied.items():
            if embed in made:
                self._wrap(head).deltas[delta_name] = made[embed]  # one object: a tied head shares its delta
        self.deltas[delta_name] = delta
        self.routing.add(delta_name)
        if self.routing.active is None:
            self.routing.active = delta_name

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
        for module, weight in delta.weights.items():
            expect(f"{module}.weight", tuple(weight.shape))
        for module, rows in delta.new_rows.items():
            expect(f"{module}.weight", (None, *rows.shape[1:]))
        for key, value in delta.exact.items():
            expect(key, tuple(value.shape), more_rows=key in vocab)

    def _base_state_model(self) -> nn.Module:
        holder = nn.Module()
        holder.state_dict = lambda: self._base_state  # the fingerprint reads the unwrapped names
        return holder

    def _wrap(self, name: str) -> _DeltaWrapper:
        if name in self._wrapped:
            return self._wrapped[name]
        parent_name, _, leaf = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
        module = getattr(parent, leaf)
        wrapper = wrapper_for(module)(module, self.routing)
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
            if delta_name in wrapper.deltas:
                del wrapper.deltas[delta_name]
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
        device = next(self.base_model.parameters()).device
        previous = self.routing.row_slots
        self.routing.row_slots = torch.tensor(slots, dtype=torch.long, device=device)
        try:
            yield
        finally:
            self.routing.row_slots = previous

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
        w = base_w.float() + parts.weight.to_dense(torch.float32) if parts.weight is not None else base_w.float()
        if parts.new_rows is not None:
            w = torch.cat([w[:rows], parts.new_rows.float()])
        return w.to(base_w.dtype)

    def unload(self) -> PreTrainedModel:
        """Remove every wrapper and return the untouched base model."""
        for name, wrapper in self._wrapped.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, leaf, wrapper.base_layer)
        self._wrapped.clear()
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
            if parts.weight is not None or parts.new_rows is not None:
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

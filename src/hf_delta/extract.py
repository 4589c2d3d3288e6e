"""Pair a base model with a fine-tune and split their difference into what each storage path needs.

* ``compress``: dense fp32 deltas of target linear layers (and, by default, of the embedding and output
  head over the base vocabulary) that a method will compress;
* ``exact``: fine-tuned values stored as they are (norm weights, biases, any other changed tensor): small,
  and exact storage costs nothing noticeable;
* ``new_rows``: rows of a grown vocabulary, which have no base row to take a delta from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from .errors import ArchitectureMismatchError, DeltaConfigError


@dataclass
class ExtractedDelta:
    """The difference between a fine-tune and its base, split by storage path (see module docstring)."""

    compress: dict[str, torch.Tensor] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    exact: dict[str, torch.Tensor] = field(default_factory=dict)
    new_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    base_vocab_size: int = 0
    vocab_size: int = 0


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def vocab_module_names(model: PreTrainedModel) -> tuple[str | None, str | None]:
    """Names of the input embedding and the output head (``None`` where absent)."""
    return _module_name(model, model.get_input_embeddings()), _module_name(model, model.get_output_embeddings())


def is_tied(model: PreTrainedModel) -> bool:
    """Whether the output head shares its weight with the input embedding."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def select_target_modules(model: PreTrainedModel, target_modules: str | list[str]) -> list[str]:
    """Linear layers matched by ``target_modules`` (PEFT rules); the output head is never among them."""
    _, head = vocab_module_names(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]
    if target_modules == "all-linear":
        chosen = linears
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise DeltaConfigError(f"target_modules {target_modules!r} is not a valid regex: {err}") from err
        chosen = [n for n in linears if pattern.fullmatch(n)]
    else:
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not chosen:
        raise DeltaConfigError(
            f"target_modules={target_modules!r} matches no linear layer. Linear layers look like "
            f"{linears[:3]}; use 'all-linear', suffixes such as ['q_proj', 'v_proj'], or a regex."
        )
    return chosen


def _check_pair(base: PreTrainedModel, finetuned: PreTrainedModel) -> None:
    if base.config.model_type != finetuned.config.model_type:
        raise ArchitectureMismatchError(
            f"The base is a {base.config.model_type!r} model but the fine-tune is {finetuned.config.model_type!r};"
            " a delta needs a fine-tune of this very base."
        )
    b, f = base.state_dict(), finetuned.state_dict()
    if set(b) != set(f):
        extra = sorted(set(f) ^ set(b))[:5]
        raise ArchitectureMismatchError(
            f"The base and the fine-tune have different parameters (e.g. {extra}); they are not the same "
            "architecture (check num_hidden_layers and the model class)."
        )


@dataclass
class PairLayout:
    """How each parameter of a base/fine-tune pair is stored; read from the two models (meta ones will do)."""

    targets: set[str]
    embed: str | None
    head: str | None
    tied: bool
    vocab_modules: set[str]
    compress_embeddings: bool

    def skips(self, name: str) -> bool:
        """A tied output head's weight: it is the embedding's, handled there."""
        return self.tied and name.rpartition(".")[0] == self.head


def pair_layout(base: PreTrainedModel, finetuned: PreTrainedModel, *, target_modules: str | list[str] = "all-linear",
                compress_embeddings: bool = True) -> tuple[PairLayout, ExtractedDelta]:
    """Check that the two models pair, and lay out their parameters; returns an empty ``ExtractedDelta`` with
    the vocabulary sizes and ties filled in, for :func:`split_tensor` to fill."""
    _check_pair(base, finetuned)
    embed, head = vocab_module_names(base)
    tied = is_tied(finetuned) and is_tied(base)
    layout = PairLayout(targets=set(select_target_modules(base, target_modules)), embed=embed, head=head, tied=tied,
                        vocab_modules={embed} | ({head} if head and not tied else set()),
                        compress_embeddings=compress_embeddings)
    base_vocab = base.get_input_embeddings().weight.shape[0]
    out = ExtractedDelta(base_vocab_size=base_vocab, vocab_size=finetuned.get_input_embeddings().weight.shape[0])
    if tied and head:
        out.tied[head] = embed
    if out.vocab_size < base_vocab:
        raise ArchitectureMismatchError(
            f"The fine-tune's vocabulary ({out.vocab_size}) is smaller than the base's ({base_vocab}); only "
            "grown vocabularies are supported."
        )
    return layout, out


def _difference(f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``f − b`` in float32 with one float32 temporary (16-bit inputs are cast element by element)."""
    delta = f.to(torch.float32, copy=True)
    delta -= b
    return delta


def split_tensor(layout: PairLayout, name: str, b: torch.Tensor, f: torch.Tensor,
                 out: ExtractedDelta) -> tuple[str, torch.Tensor] | None:
    """File one parameter of the pair: exact tensors and new vocabulary rows go into ``out``; a matrix to
    compress is returned as ``(module, fp32 delta)`` (and its kind recorded in ``out.kinds``)."""
    module, _, leaf = name.rpartition(".")
    if layout.skips(name):
        return None
    if module in layout.vocab_modules and leaf == "weight":
        if f.shape[1:] != b.shape[1:] or f.shape[0] < b.shape[0]:
            raise ArchitectureMismatchError(f"{name}: base shape {tuple(b.shape)} vs fine-tune {tuple(f.shape)}.")
        if not layout.compress_embeddings:
            out.exact[name] = f.detach().clone()  # the whole table, new rows included
            return None
        out.kinds[module] = "embedding" if module == layout.embed else "linear"
        if f.shape[0] > b.shape[0]:
            out.new_rows[module] = f[b.shape[0] :].detach().clone()
        return module, _difference(f[: b.shape[0]], b)
    if f.shape != b.shape:
        raise ArchitectureMismatchError(
            f"{name}: base shape {tuple(b.shape)} vs fine-tune {tuple(f.shape)}; these models do not pair."
        )
    if module in layout.targets and leaf == "weight":
        out.kinds[module] = "linear"
        return module, _difference(f, b)
    if f.is_floating_point() and not torch.equal(f, b):
        out.exact[name] = f.detach().clone()
    return None


def extract_delta(
    base: PreTrainedModel,
    finetuned: PreTrainedModel,
    *,
    target_modules: str | list[str] = "all-linear",
    compress_embeddings: bool = True,
) -> ExtractedDelta:
    """Split ``finetuned − base`` into compressible deltas, exact tensors and new vocabulary rows."""
    layout, out = pair_layout(base, finetuned, target_modules=target_modules, compress_embeddings=compress_embeddings)
    fstate = finetuned.state_dict()
    for name, b in base.state_dict().items():
        found = split_tensor(layout, name, b, fstate[name], out)
        if found is not None:
            out.compress[found[0]] = found[1]
    return out

"""Pair a base model with a fine-tune and split their difference into what each storage path needs.

* ``compress``: dense fp32 deltas of target linear layers (and, by default, of the embedding and output
  head over the base vocabulary) that a method will compress; a fused Mixture-of-Experts parameter
  (``experts.gate_up_proj`` ``[E, out, in]``) gives one matrix per expert, keyed ``<parameter>[<expert>]``;
* ``exact``: fine-tuned values stored as they are (norm weights, biases, any other changed tensor): small,
  and exact storage costs nothing noticeable;
* ``new_rows``: rows of a grown vocabulary, which have no base row to take a delta from.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .errors import ArchitectureMismatchError, DeltaConfigError, UnsupportedArchitectureError


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


_EXPERT_KEY = re.compile(r"^(?P<param>.+)\[(?P<expert>\d+)\]$")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 Mixture-of-Experts block whose experts are two 3-D parameters ``gate_up_proj``
    ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` applied as ``down · act(gate) ⊙ up`` (Mixtral, Qwen2-MoE,
    Qwen3-MoE, ...). Transposed, biased or ungated layouts are not recognised: their parameters stay exact."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
        and down.dim() == 3 and gate_up.shape[0] == down.shape[0] and gate_up.shape[2] == down.shape[1]
        and gate_up.shape[1] == 2 * down.shape[2] and not getattr(module, "is_transposed", False)
        and not getattr(module, "has_bias", False) and getattr(module, "has_gate", True)
    )


def expert_parameters(model: nn.Module) -> list[str]:
    """Names of the fused expert parameters of ``model`` (``...mlp.experts.gate_up_proj``, ``...down_proj``)."""
    return [f"{n}.{leaf}" for n, m in model.named_modules() if is_fused_experts(m) for leaf in ("gate_up_proj",
                                                                                                 "down_proj")]


def expert_key(param: str, expert: int) -> str:
    """The delta key of one expert's matrix of a fused parameter: ``model.layers.0.mlp.experts.down_proj[3]``."""
    return f"{param}[{expert}]"


def split_expert_key(key: str) -> tuple[str, int] | None:
    """``(parameter name, expert)`` of an expert key, ``None`` for a module name."""
    found = _EXPERT_KEY.match(key)
    return None if found is None else (found["param"], int(found["expert"]))


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2 family): a linear layer whose weight is stored
    transposed, ``[in_features, out_features]``."""
    return isinstance(module, Conv1D)


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2 family: a linear layer stored ``[in, out]``)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def transposed_modules(model: nn.Module, names: Iterable[str]) -> set[str]:
    """Those of ``names`` whose weight is stored ``[in, out]`` (``Conv1D``): their deltas are kept ``[out, in]``."""
    modules = dict(model.named_modules())
    return {n for n in names if n in modules and is_conv1d(modules[n])}  # fused expert parameters are not modules


def as_out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A layer's weight (or weight delta) seen as ``[out_features, in_features]``, the layout deltas use."""
    return weight.T if transposed else weight


def select_target_modules(model: PreTrainedModel, target_modules: str | list[str]) -> list[str]:
    """Linear layers (``nn.Linear`` and ``Conv1D``) and fused expert parameters matched by ``target_modules``
    (PEFT rules, ``"all-linear"`` takes the experts too); the output head is never among them."""
    _, head = vocab_module_names(model)
    linears = [n for n, m in model.named_modules() if _is_linear(m) and n != head]
    linears += expert_parameters(model)
    if not linears:
        kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n and not list(m.children())})
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no linear layer (nn.Linear or Conv1D) besides its output head, so there "
            f"is nothing to compress: its layers are {kinds}. hf_delta compresses linear layers only."
        )
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
    transposed: set[str]
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
    targets = select_target_modules(base, target_modules)
    layout = PairLayout(targets=set(targets), transposed=transposed_modules(base, targets), embed=embed, head=head,
                        tied=tied,
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
                 out: ExtractedDelta) -> list[tuple[str, torch.Tensor]]:
    """File one parameter of the pair: exact tensors and new vocabulary rows go into ``out``; the matrices to
    compress are returned as ``(key, fp32 delta)`` pairs (kinds recorded in ``out.kinds``): one for a linear or
    vocabulary module, one per expert for a fused expert parameter, none otherwise."""
    module, _, leaf = name.rpartition(".")
    if layout.skips(name):
        return []
    if module in layout.vocab_modules and leaf == "weight":
        if f.shape[1:] != b.shape[1:] or f.shape[0] < b.shape[0]:
            raise ArchitectureMismatchError(f"{name}: base shape {tuple(b.shape)} vs fine-tune {tuple(f.shape)}.")
        if not layout.compress_embeddings:
            out.exact[name] = f.detach().clone()  # the whole table, new rows included
            return []
        out.kinds[module] = "embedding" if module == layout.embed else "linear"
        if f.shape[0] > b.shape[0]:
            out.new_rows[module] = f[b.shape[0] :].detach().clone()
        return [(module, _difference(f[: b.shape[0]], b))]
    if f.shape != b.shape:
        raise ArchitectureMismatchError(
            f"{name}: base shape {tuple(b.shape)} vs fine-tune {tuple(f.shape)}; these models do not pair."
        )
    if module in layout.targets and leaf == "weight":
        out.kinds[module] = "linear"
        delta = _difference(f, b)
        return [(module, as_out_in(delta, module in layout.transposed).contiguous())]
    if name in layout.targets:  # a fused expert parameter: each expert's matrix is compressed on its own
        keys = [expert_key(name, e) for e in range(b.shape[0])]
        out.kinds.update(dict.fromkeys(keys, "linear"))
        return [(key, _difference(f[e], b[e])) for e, key in enumerate(keys)]
    if f.is_floating_point() and not torch.equal(f, b):
        out.exact[name] = f.detach().clone()
    return []


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
        out.compress.update(split_tensor(layout, name, b, fstate[name], out))
    return out

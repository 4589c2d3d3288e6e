"""A causal LM run one decoder layer at a time from its checkpoint, so that a model too large for memory can
still produce its outputs (BitDelta's distillation teacher).

The model is built with its parameters on the meta device and its buffers real (rotary frequencies); the
modules outside the decoder layers (embedding, final norm, output head: small) are loaded from the checkpoint,
and each decoder layer is loaded, run over every calibration batch, and dropped before the next. The maths is
the loaded model's: same modules, same float32 weights, same call arguments.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..calibration import Batch
from ..utils.checkpoint import Checkpoint
from ..utils.logits import softcap_logits
from ..utils.memory import release_freed_memory, row_blocks

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Ends a forward pass once the first decoder layer's inputs are seen."""


def supports(model: PreTrainedModel) -> bool:
    """Whether ``model`` (parameters on the meta device will do) can run layer by layer here: one layer type (one
    attention mask for all) and its decoder layers in ``decoder.layers``."""
    if len(set(getattr(model.config, "layer_types", None) or ["one"])) > 1:
        return False
    return isinstance(getattr(model.get_decoder(), "layers", None), nn.ModuleList)


def supports_teacher(model: PreTrainedModel) -> bool:
    """Whether ``final_hidden`` and ``logits`` give ``model``'s own outputs: after its layers the decoder has
    no parameters but ``decoder.norm``'s (OPT's ``final_layer_norm`` and ``project_out``, Phi's
    ``final_layernorm`` would be skipped)."""
    if not supports(model):
        return False
    decoder = model.get_decoder()
    known = [decoder.layers, getattr(decoder, "norm", None), model.get_input_embeddings()]
    ids = {id(p) for module in known if module is not None for p in module.parameters()}
    return all(id(p) in ids for p in decoder.parameters())


def _decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder.layers list; it cannot be run layer by layer.")
    return layers


class LayerwiseModel:
    """``folder``'s causal LM with at most one decoder layer in memory at a time (float32, on ``device``).

    >>> teacher = LayerwiseModel("path/to/finetune")  # doctest: +SKIP
    >>> hidden = teacher.final_hidden(batches)  # doctest: +SKIP
    """

    def __init__(self, folder, *, ckpt: Checkpoint | None = None, device: torch.device | str = "cpu"):
        self.ckpt = ckpt or Checkpoint(folder)
        self.device = torch.device(device)
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config)
        self.model.eval()
        for module in self.model.modules():  # rotary frequencies and the like; the weights come one layer at a time
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)
        if not supports(self.model):
            raise ValueError(f"{config.model_type} mixes layer types or has no decoder.layers list; it is not run "
                             "layer by layer.")
        self.layers = _decoder_layers(self.model)
        layer_params = {id(p) for p in self.layers.parameters()}
        self._shared = [n for n, p in self.model.named_parameters(remove_duplicate=False) if id(p) not in layer_params]
        prefix = {id(layer): i for i, layer in enumerate(self.layers)}
        self._layer_prefix = {}
        for name, module in self.model.named_modules():
            if id(module) in prefix:
                self._layer_prefix[prefix[id(module)]] = name
        for name in self._shared:
            self._load(name)
        self.model.tie_weights()

    def _load(self, name: str) -> None:
        """Put parameter ``name`` (a float32 copy from the checkpoint) into the model."""
        module_name, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        source = name if name in self.ckpt else None
        if source is None:  # a tied output head: tie_weights() makes it the embedding's
            return
        tensor = self.ckpt.get(source).to(self.device)
        module._parameters[leaf] = nn.Parameter(tensor.float() if tensor.is_floating_point() else tensor,
                                                requires_grad=False)

    def layer_name(self, index: int) -> str:
        """The module name of decoder layer ``index`` (``model.layers.3``)."""
        return self._layer_prefix[index]

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its weights loaded (float32) for the block; dropped afterwards."""
        layer, prefix = self.layers[index], self._layer_prefix[index]
        names = [n for n, _ in layer.named_parameters()]
        for n in names:
            self._load(f"{prefix}.{n}")
        try:
            yield layer
        finally:
            for n in names:
                module_name, _, leaf = n.rpartition(".")
                module = layer.get_submodule(module_name) if module_name else layer
                old = module._parameters[leaf]
                module._parameters[leaf] = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"),
                                                        requires_grad=False)

    def first_layer_inputs(self, batch: Batch) -> tuple[torch.Tensor, tuple, dict]:
        """The first decoder layer's hidden states and other call arguments for ``batch`` (masks and position
        embeddings depend on the tokens only: every layer is called with the same ones)."""
        seen: dict = {}

        def hook(_module, args, kwargs):
            seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            seen["args"], seen["kwargs"] = args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        ids, mask = (t.to(self.device) for t in batch)
        try:
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen["hidden"], seen["args"], seen["kwargs"]

    @staticmethod
    def call_layer(layer: nn.Module, hidden: torch.Tensor, inputs: tuple[torch.Tensor, tuple, dict]) -> torch.Tensor:
        """Run ``layer`` on ``hidden`` with the other arguments ``first_layer_inputs`` recorded."""
        _, args, kwargs = inputs
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def final_hidden(self, batches: list[Batch], *, progress: bool = True) -> list[torch.Tensor]:
        """The final norm's output for each batch (what the output head reads), computed layer by layer."""
        if not supports_teacher(self.model):
            raise ValueError(f"{type(self.model).__name__} has modules between its layers and its output head other "
                             "than decoder.norm; its outputs cannot be computed layer by layer.")
        inputs = [self.first_layer_inputs(b) for b in batches]
        hidden = [h for h, _, _ in inputs]
        for i in tqdm(range(len(self.layers)), desc="teacher: layers", disable=not progress, leave=False):
            with self.layer(i) as layer:
                hidden = [self.call_layer(layer, hidden[b], inputs[b]) for b in range(len(inputs))]
            release_freed_memory()
        norm = getattr(self.model.get_decoder(), "norm", None)
        return [norm(h) if norm is not None else h for h in hidden]

    def keep_head_only(self) -> None:
        """Drop every loaded weight but the output head's (all that ``logits`` needs once hidden states exist).

        A linear head goes back to the checkpoint's dtype (exactly: it was loaded from it), and ``logits`` converts a
        block of its rows at a time: a 32000 x 4096 head is 0.5 GB in float32, held through scale distillation.
        """
        head = self.model.get_output_embeddings()
        self._drop_loaded(keep=head)
        if type(head) is nn.Linear:
            stored = self.ckpt.info(self._head_source()).dtype
            head.weight = nn.Parameter(head.weight.detach().to(stored), requires_grad=False)
            release_freed_memory()

    def _head_source(self) -> str:
        """The checkpoint key the output head's weight came from (the embedding's, when they are tied)."""
        head = self.model.get_output_embeddings()
        names = [n for n, p in self.model.named_parameters(remove_duplicate=False) if p is head.weight]
        return next(n for n in names if n in self.ckpt)

    def drop_outside_layers(self) -> None:
        """Drop the embedding, final norm and head once the first layer's inputs are captured (layer-by-layer
        calibration needs only the decoder layers after that)."""
        self._drop_loaded(keep=None)

    def _drop_loaded(self, *, keep: nn.Module | None) -> None:
        kept = {id(p) for p in keep.parameters()} if keep is not None else set()
        for module in self.model.modules():
            for leaf, param in list(module._parameters.items()):
                if param is not None and id(param) not in kept and param.device.type != "meta":
                    module._parameters[leaf] = nn.Parameter(
                        torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)
        release_freed_memory()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits (float32) from ``final_hidden``'s output: the head and any soft-capping."""
        head = self.model.get_output_embeddings()
        if type(head) is not nn.Linear or head.weight.dtype == torch.float32:
            return softcap_logits(head(hidden), self.model.config).float()
        hidden = hidden.float()
        out = hidden.new_empty(*hidden.shape[:-1], head.out_features)
        for rows in row_blocks(head.out_features, head.in_features):
            bias = None if head.bias is None else head.bias[rows].float()
            out[..., rows] = nn.functional.linear(hidden, head.weight[rows].float(), bias)
        return softcap_logits(out, self.model.config)

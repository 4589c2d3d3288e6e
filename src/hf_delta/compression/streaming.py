"""Data-free compression straight from two checkpoints, one tensor at a time.

Both models are built on the meta device (structure only, no weights) to know which parameters are target
matrices, vocabulary tables or exact tensors; then each parameter is read from the two safetensors
checkpoints, its delta computed in float32, compressed and dropped. Peak memory is a few copies of the
largest matrix plus the compressed result, whatever the number of layers. The result is the same delta,
bit for bit, as compressing the two models loaded in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from ..config import DeltaConfig
from ..extract import ExtractedDelta, pair_layout, split_tensor
from ..fingerprint import base_fingerprint
from ..methods.base import CompressedWeight, DeltaMethod
from ..utils.checkpoint import Checkpoint
from ..utils.memory import release_freed_memory
from .memory import STREAM_BYTES_PER_VALUE, check_fits

logger = logging.getLogger(__name__)


@dataclass
class StreamedPair:
    """A base/fine-tune pair as meta models beside their checkpoints."""

    base: PreTrainedModel
    finetuned: PreTrainedModel
    base_ckpt: Checkpoint
    ft_ckpt: Checkpoint

    def generation_configs(self, base_folder: Path, ft_folder: Path) -> tuple[GenerationConfig, GenerationConfig]:
        def load(folder: Path, model: PreTrainedModel) -> GenerationConfig:
            try:
                return GenerationConfig.from_pretrained(folder)
            except OSError:  # no generation_config.json: what the model derives from its config
                return GenerationConfig.from_model_config(model.config)

        return load(base_folder, self.base), load(ft_folder, self.finetuned)


def _meta_model(folder: Path) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def open_pair(base_folder: Path, ft_folder: Path) -> StreamedPair | None:
    """The pair ready to stream, or ``None`` (logged) when a checkpoint cannot be read tensor by tensor:
    no safetensors, or parameter names that transformers converts on load (then the models are loaded)."""
    if not (Checkpoint.has_safetensors(base_folder) and Checkpoint.has_safetensors(ft_folder)):
        logger.info("No safetensors checkpoint in both folders: loading the models instead of streaming")
        return None
    pair = StreamedPair(_meta_model(base_folder), _meta_model(ft_folder), Checkpoint(base_folder),
                        Checkpoint(ft_folder))
    for model, ckpt in ((pair.base, pair.base_ckpt), (pair.finetuned, pair.ft_ckpt)):
        missing = [n for n in model.state_dict() if n not in ckpt and not _tied_head(model, n)]
        if missing:
            logger.info("Checkpoint names differ from the model's (e.g. %s): loading the models instead of "
                        "streaming", missing[:3])
            return None
    return pair


def _tied_head(model: PreTrainedModel, name: str) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight and name.endswith(".weight") \
        and model.get_submodule(name.rpartition(".")[0]) is head


def _read(ckpt: Checkpoint, model: PreTrainedModel, name: str, *, as_float: bool = True) -> torch.Tensor:
    """A parameter's tensor, floating ones in float32 (as the model loaded in float32 holds them) unless
    ``as_float=False`` keeps the checkpoint's dtype (a large matrix whose float32 delta is taken next)."""
    if name not in ckpt and _tied_head(model, name):
        name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    t = ckpt.get(name)
    return t.float() if as_float and t.is_floating_point() else t


def _as_float(tensors: dict[str, torch.Tensor], before: set[str]) -> None:
    """Entries added since ``before`` in float32, as the in-memory path stores them."""
    for key in set(tensors) - before:
        if tensors[key].is_floating_point():
            tensors[key] = tensors[key].float()


def fingerprint(pair: StreamedPair) -> dict:
    """The base's fingerprint, as the loaded model's would be, from ``pair.base_ckpt``."""
    found = base_fingerprint(pair.base, read=lambda name: _read(pair.base_ckpt, pair.base, name))
    release_freed_memory()
    return found


def stream_compress(pair: StreamedPair, method: DeltaMethod, config: DeltaConfig, *,
                    device: torch.device, progress: bool) -> tuple[ExtractedDelta, dict[str, CompressedWeight]]:
    """Compress every target matrix of the pair with ``method.compress_matrix``, one parameter at a time."""
    layout, out = pair_layout(pair.base, pair.finetuned, target_modules=config.target_modules,
                              compress_embeddings=config.compress_embeddings)
    names = [n for n in pair.base.state_dict() if not layout.skips(n)]
    largest = max(pair.base_ckpt.info(n).numel for n in names if n in pair.base_ckpt)
    check_fits(STREAM_BYTES_PER_VALUE * largest, what=f"Streaming {config.method} compression",
               advice="Free some memory; streaming needs a few copies of the largest matrix "
                      f"({largest / 1e6:.0f}M values).")
    weights: dict[str, CompressedWeight] = {}
    bar = tqdm(names, desc=f"{config.method}: streaming", unit="tensor", disable=not progress)
    for name in bar:
        module, _, leaf = name.rpartition(".")
        large = name in layout.targets or (leaf == "weight" and (module in layout.targets
                                                                 or module in layout.vocab_modules))
        b = _read(pair.base_ckpt, pair.base, name, as_float=not large)
        f = _read(pair.ft_ckpt, pair.finetuned, name, as_float=not large)
        exact, new_rows = set(out.exact), set(out.new_rows)
        found = split_tensor(layout, name, b, f, out)
        _as_float(out.exact, exact)
        _as_float(out.new_rows, new_rows)
        del b, f
        for key, delta in found:  # one matrix, or one per expert of a fused expert parameter
            weights[key] = method.compress_matrix(delta.to(device), out.kinds[key], config).moved_to("cpu")
        del found
        release_freed_memory()
    return out, weights

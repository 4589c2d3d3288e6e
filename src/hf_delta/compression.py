"""``compress(base, finetuned, config)``: from two models to a ``DeltaModel`` holding the compressed delta.

(The module is ``compression``, not ``compress``, so the function ``hf_delta.compress`` does not shadow it.)
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ._version import __version__
from .config import CompressionRecord, DeltaConfig
from .extract import extract_delta
from .fingerprint import base_fingerprint
from .methods import get_method
from .methods.base import CompressionContext
from .model import DeltaModel
from .storage import GENERATION_CONFIG, TOKENIZER_FILES, Delta
from .utils.loading import load_model, load_tokenizer

logger = logging.getLogger(__name__)


def _carried_files(base_tok, ft_tok, base: PreTrainedModel, ft: PreTrainedModel) -> dict[str, bytes]:
    """Tokenizer and generation-config files of the fine-tune, when they differ from the base's."""
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if ft_tok is not None and (
            base_tok is None
            or ft_tok.get_vocab() != base_tok.get_vocab()
            or ft_tok.chat_template != base_tok.chat_template
            or ft_tok.all_special_tokens != base_tok.all_special_tokens
        ):
            ft_tok.save_pretrained(tmp)
            files.update({f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.name in TOKENIZER_FILES})
        b, f = base.generation_config.to_dict(), ft.generation_config.to_dict()
        b.pop("transformers_version", None)
        f.pop("transformers_version", None)
        if b != f:
            ft.generation_config.save_pretrained(tmp)
            files[GENERATION_CONFIG] = (Path(tmp) / GENERATION_CONFIG).read_bytes()
    return files


def compress(
    base: str | Path | PreTrainedModel,
    finetuned: str | Path | PreTrainedModel,
    config: DeltaConfig,
    calibration: Sequence[str] | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    base_revision: str | None = None,
    revision: str | None = None,
    progress: bool = True,
) -> DeltaModel:
    """Compress ``finetuned − base`` with the method of ``config``; returns the base with the delta on it.

    Args:
        base: the base model (object, folder or Hub id).
        finetuned: the fine-tuned model (object, folder or Hub id).
        config: a method config, e.g. ``BitDeltaConfig()`` or ``DeltaZipConfig(bits=4)``.
        calibration: texts for methods that calibrate (BitDelta's scale distillation, DeltaZip's Hessians);
            ``None`` samples text from the fine-tune itself (data-free).
        tokenizer: the fine-tune's tokenizer (loaded from ``finetuned`` when it is a path or id).
        base_revision / revision: revisions of the base and fine-tune repos when loading by id.

    >>> from hf_delta import BitDeltaConfig, compress
    >>> model = compress("org/base", "org/finetune", BitDeltaConfig())  # doctest: +SKIP
    >>> model.save_pretrained("my-delta")  # doctest: +SKIP
    """
    config = copy.deepcopy(config)  # the delta owns its settings; the caller's object stays untouched
    config.validate()
    method = get_method(config.method)
    base_model = load_model(base, revision=base_revision)
    ft_model = load_model(finetuned, revision=revision)
    if tokenizer is None and not isinstance(finetuned, PreTrainedModel):
        tokenizer = load_tokenizer(finetuned, revision=revision)
    base_tok = None if isinstance(base, PreTrainedModel) else load_tokenizer(base, revision=base_revision)
    extracted = extract_delta(base_model, ft_model, target_modules=config.target_modules,
                              compress_embeddings=config.compress_embeddings)
    record = CompressionRecord(
        base_model_name_or_path=str(base) if not isinstance(base, PreTrainedModel)
        else base_model.config._name_or_path or None,
        base_model_revision=base_revision,
        base_fingerprint=base_fingerprint(base_model),
        library_version=__version__,
    )
    ctx = CompressionContext(base_model, ft_model, tokenizer, extracted, config, calibration, progress)
    with torch.random.fork_rng(devices=[]):  # seed compression without touching the caller's RNG state
        torch.manual_seed(config.seed)
        weights = method.compress(ctx)
    delta = Delta(config=config, record=record, weights=weights, exact=extracted.exact, new_rows=extracted.new_rows,
                  tied=extracted.tied, vocab_size=extracted.vocab_size,
                  files=_carried_files(base_tok, tokenizer, base_model, ft_model))
    model = DeltaModel(base_model)
    model.add_delta("default", delta)
    if method.refine is not None:
        method.refine(model, ctx)
    return model

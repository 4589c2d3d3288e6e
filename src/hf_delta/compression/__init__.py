"""``compress(base, finetuned, config)``: from two models to a ``DeltaModel`` holding the compressed delta;
``compress_delta`` for the ``Delta`` alone, in bounded memory.

Data-free settings (BitDelta without distillation, low-rank) stream the two safetensors checkpoints tensor by
tensor (``streaming.py``); the others load both models (float32) and hand the method a ``CompressionContext``.
(The package is ``compression``, not ``compress``, so the function ``hf_delta.compress`` does not shadow it.)
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from .._version import __version__
from ..calibration import Batch, tokenize_calibration
from ..config import CompressionRecord, DeltaConfig
from ..errors import ModelLoadError
from ..extract import expert_parameters, extract_delta
from ..fingerprint import base_fingerprint
from ..methods import get_method
from ..methods.base import CompressionContext, DeltaMethod
from ..methods.deltazip import DeltaZipConfig
from ..methods.registry import registered_methods
from ..model import DeltaModel
from ..storage import GENERATION_CONFIG, TOKENIZER_FILES, Delta
from ..utils.checkpoint import Checkpoint
from ..utils.loading import load_model, load_tokenizer, resolve_model_folder
from ..utils.memory import mapped_large_blocks
from . import deltazip_stream, layerwise, streaming
from .memory import IN_MEMORY_BYTES_PER_PARAMETER, check_fits, distillation_bytes

logger = logging.getLogger(__name__)


def _carried_files(base_tok, ft_tok, base_gen: GenerationConfig, ft_gen: GenerationConfig) -> dict[str, bytes]:
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
        b, f = base_gen.to_dict(), ft_gen.to_dict()
        b.pop("transformers_version", None)
        f.pop("transformers_version", None)
        if b != f:
            ft_gen.save_pretrained(tmp)
            files[GENERATION_CONFIG] = (Path(tmp) / GENERATION_CONFIG).read_bytes()
    return files


def _tokenizer_or_none(folder: str | Path, revision: str | None = None) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer; a checkpoint without one (weights only) carries no tokenizer files."""
    try:
        return load_tokenizer(folder, revision=revision)
    except ModelLoadError:
        logger.info("No tokenizer in %s: the delta carries no tokenizer files", folder)
        return None


def _refine(method: DeltaMethod, model: DeltaModel, ctx: CompressionContext) -> None:
    """Run the method's refinement (BitDelta: scale distillation) and log its loss history."""
    losses = method.refine(model, ctx)
    if losses:
        logger.info("%s refinement: loss %.6g -> %.6g over %d steps", ctx.config.method, losses[0], losses[-1],
                    len(losses), extra={"refine_losses": list(losses)})


def _record(base: str | Path | PreTrainedModel, base_revision: str | None, fingerprint: dict,
            name_of_object: str | None = None) -> CompressionRecord:
    return CompressionRecord(
        base_model_name_or_path=str(base) if not isinstance(base, PreTrainedModel) else name_of_object or None,
        base_model_revision=base_revision,
        base_fingerprint=fingerprint,
        library_version=__version__,
    )


def _stream(base, finetuned, config: DeltaConfig, method: DeltaMethod, calibration, *, tokenizer, base_revision,
            revision, device, progress, hub: dict[str, Any]) -> Delta | DeltaModel | None:
    """Compression from the two checkpoints, or ``None`` when they or the setting cannot be streamed.

    Data-free settings give the ``Delta``. A method that refines its matrix-wise result (BitDelta's scale
    distillation) gets the base loaded once in its own dtype and the fine-tune's outputs computed layer by
    layer (``layerwise.py``), never the fine-tune as a second model; that needs calibration texts (sampling
    text from the fine-tune would need it loaded)."""
    if isinstance(base, PreTrainedModel) or isinstance(finetuned, PreTrainedModel):
        return None
    refines = method.compress_matrix is not None and method.refine is not None and calibration is not None
    layered = isinstance(config, DeltaZipConfig) and deltazip_stream.supports(config) and calibration is not None
    if not (method.streams(config) or refines or layered):
        return None
    base_folder = resolve_model_folder(base, revision=base_revision, **hub)
    ft_folder = resolve_model_folder(finetuned, revision=revision, **hub)
    pair = streaming.open_pair(base_folder, ft_folder)
    if pair is None or (not method.streams(config) and not (layerwise.supports(pair.finetuned) if layered
                                                             else layerwise.supports_teacher(pair.finetuned))):
        return None
    if layered and expert_parameters(pair.base):  # fused experts are compressed by the in-memory path only
        return None
    tokenizer = tokenizer or _tokenizer_or_none(ft_folder)
    if layered and tokenizer is None:
        return None
    if not (method.streams(config) or layered):
        _check_distillation_fits(pair, config, device)
    logger.info("Streaming %s compression from the checkpoints", config.method)
    record = _record(base, base_revision, streaming.fingerprint(pair))
    with torch.random.fork_rng(devices=[]):  # seed compression without touching the caller's RNG state
        torch.manual_seed(config.seed)
        if layered:
            batches = tokenize_calibration(calibration, tokenizer, seq_len=config.calibration_seq_len,
                                           batch_size=config.calibration_batch_size)
            extracted, weights = deltazip_stream.stream_deltazip(pair, ft_folder, config, batches,
                                                                 progress=progress)
        else:
            extracted, weights = streaming.stream_compress(pair, method, config, device=device, progress=progress)
    files = _carried_files(_tokenizer_or_none(base_folder), tokenizer, *pair.generation_configs(base_folder, ft_folder))
    delta = Delta(config=config, record=record, weights=weights, exact=extracted.exact, new_rows=extracted.new_rows,
                  tied=extracted.tied, vocab_size=extracted.vocab_size, files=files)
    if method.streams(config) or layered:
        return delta
    placement = {} if device.type == "cpu" else {"device_map": str(device)}
    model = DeltaModel(load_model(base_folder, dtype="auto", **placement))
    model.add_delta("default", delta)

    def teacher(batches: list[Batch]) -> Callable[[int], torch.Tensor]:
        finetune = layerwise.LayerwiseModel(ft_folder, ckpt=pair.ft_ckpt, device=device)
        hidden = finetune.final_hidden(batches, progress=progress)
        finetune.keep_head_only()
        return lambda i: finetune.logits(hidden[i])

    ctx = CompressionContext(None, None, tokenizer, extracted, config, calibration, progress, teacher=teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        _refine(method, model, ctx)
    return model


def _check_distillation_fits(pair: streaming.StreamedPair, config: DeltaConfig, device: torch.device) -> None:
    """Before streaming, check that the base, its delta and the teacher's cache fit where distillation runs."""
    head = pair.finetuned.get_output_embeddings().weight
    stored = pair.ft_ckpt.info(next(iter(pair.ft_ckpt.keys()))).dtype
    needed = distillation_bytes(pair.base_ckpt.nbytes(), tokens=config.distill_samples * config.distill_seq_len,
                                hidden=head.shape[1], head_bytes=head.numel() * stored.itemsize)
    check_fits(needed, what=f"Scale distillation ({config.distill_samples} x {config.distill_seq_len} tokens)",
               device=device,
               advice="Use BitDeltaConfig(distill_steps=0) (data-free: streams the checkpoints in a few GB), "
                      "fewer distill_samples, compress(..., device='cuda') on a GPU that holds the base, or a "
                      "machine with more memory.")


def _in_memory(base, finetuned, config: DeltaConfig, method: DeltaMethod, calibration, *, tokenizer, base_revision,
               revision, progress, hub: dict[str, Any]) -> DeltaModel:
    """Both models loaded in float32; the method gets a ``CompressionContext``; returns the base with the delta."""
    base_model = load_model(base, revision=base_revision, **hub)
    ft_model = load_model(finetuned, revision=revision, **hub)
    if tokenizer is None and not isinstance(finetuned, PreTrainedModel):
        # Weights only (or a checkpoint that cannot stream, e.g. MoE experts saved per expert): a data-free setting
        # needs no tokenizer; one that calibrates says so (CompressionContext.calibration).
        tokenizer = _tokenizer_or_none(finetuned, revision)
    # A base without tokenizer files (weights only) is compared as "no tokenizer", as when streaming.
    base_tok = None if isinstance(base, PreTrainedModel) else _tokenizer_or_none(base, base_revision)
    extracted = extract_delta(base_model, ft_model, target_modules=config.target_modules,
                              compress_embeddings=config.compress_embeddings)
    record = _record(base, base_revision, base_fingerprint(base_model), base_model.config._name_or_path)
    ctx = CompressionContext(base_model, ft_model, tokenizer, extracted, config, calibration, progress)
    with torch.random.fork_rng(devices=[]):  # seed compression without touching the caller's RNG state
        torch.manual_seed(config.seed)
        weights = method.compress(ctx)
    delta = Delta(config=config, record=record, weights=weights, exact=extracted.exact, new_rows=extracted.new_rows,
                  tied=extracted.tied, vocab_size=extracted.vocab_size,
                  files=_carried_files(base_tok, tokenizer, base_model.generation_config, ft_model.generation_config))
    model = DeltaModel(base_model)
    model.add_delta("default", delta)
    if method.refine is not None:
        _refine(method, model, ctx)
    return model


def _check_in_memory_fits(base, finetuned, method: DeltaMethod, config: DeltaConfig) -> None:
    """Before loading two float32 models, check that they fit (folders only: a Hub id is sized after download)."""
    if isinstance(base, PreTrainedModel) or isinstance(finetuned, PreTrainedModel):
        return
    folder = Path(str(finetuned)).expanduser()
    if not (folder.is_dir() and Checkpoint.has_safetensors(folder)):
        return
    ckpt = Checkpoint(folder)
    parameters = sum(ckpt.info(n).numel for n in ckpt.keys())
    streams = [n for n in registered_methods() if get_method(n).compress_matrix is not None]
    settings = ", ".join(f"{k}={v!r}" for k, v in config.to_dict().items() if k != "method")
    check_fits(IN_MEMORY_BYTES_PER_PARAMETER * parameters, what=f"{type(config).__name__}({settings})",
               advice="Settings that need calibration load both models in float32. Data-free settings stream the "
                      f"checkpoints in a few GB (methods {streams}: e.g. BitDeltaConfig(distill_steps=0)), or run "
                      "on a machine with more memory.")


def _compress(base, finetuned, config: DeltaConfig, calibration, *, tokenizer, base_revision, revision, device,
              progress, hub: dict[str, Any]) -> Delta | DeltaModel:
    """The streamed ``Delta`` when the setting and the checkpoints allow it, else the in-memory ``DeltaModel``."""
    config = copy.deepcopy(config)  # the delta owns its settings; the caller's object stays untouched
    config.validate()
    method = get_method(config.method)
    with mapped_large_blocks():  # compression allocates and frees tensors of every size up to a whole matrix
        streamed = _stream(base, finetuned, config, method, calibration, tokenizer=tokenizer,
                           base_revision=base_revision, revision=revision, device=torch.device(device or "cpu"),
                           progress=progress, hub=hub)
        if streamed is not None:
            return streamed
        _check_in_memory_fits(base, finetuned, method, config)
        return _in_memory(base, finetuned, config, method, calibration, tokenizer=tokenizer,
                          base_revision=base_revision, revision=revision, progress=progress, hub=hub)


def compress_delta(
    base: str | Path | PreTrainedModel,
    finetuned: str | Path | PreTrainedModel,
    config: DeltaConfig,
    calibration: Sequence[str] | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    base_revision: str | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Delta:
    """Compress ``finetuned − base`` into a ``Delta`` (save it with ``save_pretrained``), without keeping a model.

    Data-free settings (``BitDeltaConfig(distill_steps=0)``, ``LowRankConfig``) of two safetensors checkpoints
    (folders or Hub ids) are streamed tensor by tensor: peak memory is a few copies of the largest matrix plus
    the result, so a 7B fine-tune compresses in a few GB. Other settings load both models (see ``compress``).

    Args:
        base, finetuned, config, calibration, tokenizer, base_revision, revision: as for :func:`compress`.
        device: where deltas are computed (``"cpu"`` by default; ``"cuda"`` is faster where there is one).
        progress: show a progress bar (with the time left) per tensor or step.
        token, cache_dir, local_files_only: passed to ``huggingface_hub`` for Hub ids.

    Raises:
        InsufficientMemoryError: the machine cannot hold what the setting needs (checked before any work).

    >>> from hf_delta import BitDeltaConfig, compress_delta
    >>> delta = compress_delta("org/base", "org/finetune", BitDeltaConfig(distill_steps=0))  # doctest: +SKIP
    >>> delta.save_pretrained("my-delta")  # doctest: +SKIP
    """
    hub = {"token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
    done = _compress(base, finetuned, config, calibration, tokenizer=tokenizer, base_revision=base_revision,
                     revision=revision, device=device, progress=progress, hub=hub)
    return done if isinstance(done, Delta) else done.get_delta("default")


def compress(
    base: str | Path | PreTrainedModel,
    finetuned: str | Path | PreTrainedModel,
    config: DeltaConfig,
    calibration: Sequence[str] | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    base_revision: str | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> DeltaModel:
    """Compress ``finetuned − base`` with the method of ``config``; returns the base with the delta on it.

    Args:
        base: the base model (object, folder or Hub id).
        finetuned: the fine-tuned model (object, folder or Hub id).
        config: a method config, e.g. ``BitDeltaConfig()`` or ``DeltaZipConfig(bits=4)``; it is copied, never
            modified.
        calibration: texts for methods that calibrate (BitDelta's scale distillation, DeltaZip's Hessians);
            ``None`` samples text from the fine-tune itself (data-free).
        tokenizer: the fine-tune's tokenizer (loaded from ``finetuned`` when it is a path or id).
        base_revision / revision: revisions of the base and fine-tune repos when loading by id.
        device: where deltas are computed, and where scale distillation from checkpoints runs (the base, the
            layer-by-layer teacher and the steps; see :func:`compress_delta`).

    Data-free settings stream the checkpoints (:func:`compress_delta`) and then load the base in its own
    dtype; the others load both models in float32.

    >>> from hf_delta import BitDeltaConfig, compress
    >>> model = compress("org/base", "org/finetune", BitDeltaConfig())  # doctest: +SKIP
    >>> model.save_pretrained("my-delta")  # doctest: +SKIP
    """
    done = _compress(base, finetuned, config, calibration, tokenizer=tokenizer, base_revision=base_revision,
                     revision=revision, device=device, progress=progress, hub={})
    if isinstance(done, DeltaModel):
        return done
    model = DeltaModel(load_model(base, revision=base_revision, dtype="auto"))
    model.add_delta("default", done)
    return model

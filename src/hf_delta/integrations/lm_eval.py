"""lm-evaluation-harness on a delta: the ``hf-delta`` model type.

Importing this module registers ``DeltaLM`` with lm-eval as ``hf-delta``. ``DeltaLM`` is lm-eval's own ``hf``
model (``HFLM``: its tokenisation, batching, truncation and scoring) driving a ``DeltaModel``: every batch lm-eval
builds goes through one forward pass with a per-row delta name (``DeltaModel.route``), so a delta scores exactly
like its merged fine-tune would, without merging, and ``delta_name="__base__"`` scores the base.

lm-eval 0.4.13 resolves ``--model`` before it runs any user code: it discovers no installed plugin and
``--include_path`` only adds task folders. So the command line goes through this module, which registers the
model type and hands the arguments to lm-eval's own CLI::

    hf-delta lm-eval --model hf-delta --model_args base=org/base,delta=org/delta --tasks hellaswag

>>> import lm_eval  # doctest: +SKIP
>>> from hf_delta.integrations.lm_eval import DeltaLM
>>> lm = DeltaLM(base="org/base", delta="org/finetune-delta", batch_size=16)  # doctest: +SKIP
>>> lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import MissingDependencyError, ModelLoadError
from ..model import BASE_NAME, DeltaModel
from ..storage import TOKENIZER_FILES
from ..utils.loading import load_model, load_tokenizer

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # only lm-eval itself missing lands here; its own import errors name their module
    if err.name is None or not err.name.startswith("lm_eval"):
        raise
    raise MissingDependencyError(
        "hf_delta.integrations.lm_eval needs lm-evaluation-harness: pip install 'hf_delta[eval]'."
    ) from err

logger = logging.getLogger(__name__)

MODEL_TYPE = "hf-delta"


@register_model(MODEL_TYPE)
class DeltaLM(HFLM):
    """lm-eval's ``hf`` model on a base with a delta, or on the base alone (``delta_name="__base__"``).

    Args:
        base: the base model (folder, Hub id or loaded model); not needed with ``model``.
        delta: the delta repo (folder or Hub id) to load on ``base`` under ``delta_name``.
        delta_name: the delta every request is scored with; ``"__base__"`` scores the base (a ``delta`` given
            too is then loaded as ``"default"`` and left unused).
        model: an already loaded ``DeltaModel`` (its deltas stay loaded; ``delta_name`` picks one).
        tokenizer: defaults to the delta's own tokenizer when its repo carries one, else the base's.
        revision: revision of the delta repo; ``base_revision``: of the base.
        dtype: dtype to load the base in (``"auto"``: the checkpoint's).
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``...; a CUDA device on a machine without one falls back to the
            CPU with a warning (lm-eval's CLI asks for ``cuda:0`` by default).
        local_files_only, ignore_base_mismatch: as in ``DeltaModel.from_pretrained``.
        **kwargs: lm-eval's ``hf`` options (``batch_size``, ``max_length``, ``add_bos_token``, ...).

    Raises:
        ModelLoadError: neither ``base`` nor ``model`` is given, or the tokenizer does not fit the model.
        DeltaNotFoundError: ``delta_name`` is not a delta of ``model``.
    """

    def __init__(
        self,
        base: str | Path | PreTrainedModel | None = None,
        delta: str | Path | None = None,
        delta_name: str = "default",
        *,
        model: DeltaModel | None = None,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        revision: str | None = None,
        base_revision: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        local_files_only: bool = False,
        ignore_base_mismatch: bool = False,
        **kwargs: Any,
    ) -> None:
        if model is None:
            model = _load(
                base,
                delta,
                delta_name,
                revision=revision,
                base_revision=base_revision,
                dtype=dtype,
                device=device,
                local_files_only=local_files_only,
                ignore_base_mismatch=ignore_base_mismatch,
            )
        if delta_name != BASE_NAME:
            model.get_delta(delta_name)  # raises DeltaNotFoundError naming the loaded ones
        tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else _own_tokenizer(model, delta_name, base)
        _check_vocabulary(model, delta_name, tokenizer)
        # HFLM sets itself up on the plain transformers model (config, device, eval mode, tokenizer); the
        # forward passes and generation then go through the DeltaModel around it (see _model_call).
        with _no_retying(model.base_model):
            super().__init__(pretrained=model.base_model, tokenizer=tokenizer, **kwargs)
        self._model = model
        self.delta_name = delta_name
        self.base, self.delta_source = base, delta

    def _rows(self, batch: int) -> list[str]:
        return [self.delta_name] * batch

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        with self._model.route(self._rows(inps.shape[0])):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        # DeltaModel.generate routes the rows and applies the delta's own generation config (its end-of-turn).
        return super()._model_generate(
            context, max_length, stop, delta_names=self._rows(context.shape[0]), **generation_kwargs
        )

    def get_model_info(self) -> dict[str, Any]:
        """What results record about the model (lm-eval's ``hf`` asks the Hub for a commit; this does not)."""
        return {
            "model_num_parameters": sum(p.numel() for p in self._model.base_model.parameters()),
            "model_dtype": str(self._model.base_model.dtype),
            "base": str(self.base) if isinstance(self.base, str | Path) else type(self.base).__name__,
            "delta": None if self.delta_source is None else str(self.delta_source),
            "delta_name": self.delta_name,
        }


@contextlib.contextmanager
def _no_retying(base: PreTrainedModel) -> Iterator[None]:
    """Make HFLM's ``tie_weights()`` call a no-op: the loaded base is tied already, and with a tied head wrapped by
    a delta, re-tying would try to put the embedding's parameter onto the wrapper (a KeyError)."""
    base.tie_weights = lambda *args, **kwargs: None  # an instance attribute hides the method
    try:
        yield
    finally:
        del base.tie_weights


def _load(
    base: str | Path | PreTrainedModel | None,
    delta: str | Path | None,
    delta_name: str,
    *,
    revision: str | None,
    base_revision: str | None,
    dtype: str | torch.dtype,
    device: str | None,
    local_files_only: bool,
    ignore_base_mismatch: bool,
) -> DeltaModel:
    if base is None:
        raise ModelLoadError(
            "DeltaLM needs base=... (the base model: folder, Hub id or loaded model) or "
            "model=... (a loaded DeltaModel)."
        )
    if delta is None and delta_name != BASE_NAME:
        raise ModelLoadError(
            f"DeltaLM(delta_name={delta_name!r}) needs delta=... (the delta repo: folder or Hub "
            f"id); pass delta_name={BASE_NAME!r} to evaluate the base alone."
        )
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device=%r asked for but CUDA is not available: evaluating on the CPU.", device)
        device = "cpu"
    placement = {"device_map": device} if device not in (None, "cpu") else {}
    model = DeltaModel(
        load_model(base, revision=base_revision, dtype=dtype, local_files_only=local_files_only, **placement)
    )
    if delta is not None:
        model.load_delta(
            delta,
            "default" if delta_name == BASE_NAME else delta_name,
            revision=revision,
            local_files_only=local_files_only,
            ignore_base_mismatch=ignore_base_mismatch,
        )
    return model


def _own_tokenizer(
    model: DeltaModel, delta_name: str, base: str | Path | PreTrainedModel | None
) -> PreTrainedTokenizerBase:
    """The delta's tokenizer when its repo carries one (a chat fine-tune's template, added tokens), else the base's."""
    files = {} if delta_name == BASE_NAME else model.get_delta(delta_name).files
    carried = {name: data for name, data in files.items() if name in TOKENIZER_FILES}
    if carried:
        with tempfile.TemporaryDirectory() as folder:
            for name, data in carried.items():
                (Path(folder) / name).write_bytes(data)
            return load_tokenizer(folder)
    source = base if isinstance(base, str | Path) else model.base_model.name_or_path
    if not source:
        raise ModelLoadError(
            "The base model object has no name_or_path to load its tokenizer from: pass tokenizer=... to DeltaLM."
        )
    return load_tokenizer(source)


def _check_vocabulary(model: DeltaModel, delta_name: str, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = model.base_model.get_input_embeddings().weight.shape[0]
    if delta_name != BASE_NAME:
        rows = model.get_delta(delta_name).vocab_size or rows  # a fine-tune may have grown the vocabulary
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"The tokenizer has {len(tokenizer)} tokens but {delta_name!r} has only {rows} "
            "embedding rows: it does not belong to this model. Pass the fine-tune's tokenizer= ."
        )


def lm_eval_scores(
    model: PreTrainedModel | DeltaModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    *,
    delta_name: str | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | float | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """Run lm-eval ``tasks`` on a plain model (lm-eval's ``hf``) or a ``DeltaModel`` (``hf-delta``; its active delta
    unless ``delta_name``); returns ``{"task:metric": value}`` (``"metric (filter)"`` for filtered metrics).

    Args:
        include_path: folders of task YAML files (e.g. from ``write_zoo_tasks``) besides lm-eval's own.
        limit: at most this many documents per task (a fraction: that share of them).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if isinstance(model, DeltaModel):
        name = delta_name or model.active_delta or BASE_NAME
        lm = DeltaLM(model=model, delta_name=name, tokenizer=tokenizer, batch_size=batch_size)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    paths = [include_path] if isinstance(include_path, str | Path) else list(include_path or [])
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads a float as a fraction of the documents
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, verbosity="WARNING"
    )["results"]
    scores = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, kept = key.partition(",")
            if kept and not metric.endswith("_stderr") and isinstance(value, int | float):
                scores[f"{task}:{metric}" if kept == "none" else f"{task}:{metric} ({kept})"] = float(value)
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's command line (``lm-eval run ...`` or its legacy form) with ``--model hf-delta`` available."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0

"""Load causal LMs and tokenizers the way users pass them: objects, local folders or Hub ids."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)


def _looks_local(name: str | Path) -> bool:
    s = str(name)
    return isinstance(name, Path) or s.startswith((".", "/", "~")) or s.count("/") > 1 or Path(s).exists()


def load_model(
    model: str | Path | PreTrainedModel,
    *,
    revision: str | None = None,
    dtype: torch.dtype | str | None = torch.float32,
    **kwargs: Any,
) -> PreTrainedModel:
    """Return ``model`` itself, or load it from a local folder or Hub id with ``AutoModelForCausalLM``
    (``dtype="auto"``: the checkpoint's own dtype)."""
    if isinstance(model, PreTrainedModel):
        return model
    if _looks_local(model) and not Path(model).expanduser().is_dir():
        raise ModelLoadError(
            f"Model directory {str(model)!r} does not exist. Pass an existing folder written by "
            "save_pretrained, a Hub repo id such as 'org/name', or a loaded model object."
        )
    try:
        return AutoModelForCausalLM.from_pretrained(str(model), revision=revision, dtype=dtype, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"Could not load a causal LM from {str(model)!r}: {err}") from err


def load_tokenizer(
    source: str | Path | PreTrainedTokenizerBase, *, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """Return ``source`` itself, or load its tokenizer with ``AutoTokenizer``."""
    if isinstance(source, PreTrainedTokenizerBase):
        return source
    try:
        return AutoTokenizer.from_pretrained(str(source), revision=revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"Could not load a tokenizer from {str(source)!r}: {err}. Save the tokenizer next to the model "
            "(tokenizer.save_pretrained(folder)) or pass tokenizer=... explicitly."
        ) from err


def check_tokenizer_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str = "") -> None:
    """Raise when the tokenizer can emit ids the model has no embedding row for (they do not belong together)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"The tokenizer{f' of {name}' if name else ''} has {len(tokenizer)} tokens but the model's "
            f"embedding has only {rows} rows: this tokenizer does not belong to this model. Load the "
            "tokenizer saved with the model, or call model.resize_token_embeddings(len(tokenizer))."
        )


def load_model_and_tokenizer(
    path: str | Path, *, revision: str | None = None, dtype: torch.dtype | None = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its own tokenizer from one place, checking that they belong together."""
    model = load_model(path, revision=revision, dtype=dtype)
    tokenizer = load_tokenizer(path, revision=revision)
    check_tokenizer_fits(model, tokenizer, name=str(path))
    return model, tokenizer


# What a model folder needs for streaming compression: the config, the safetensors and the tokenizer.
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model_folder(
    model: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder holding ``model``: the folder itself, or its Hub snapshot (config, safetensors, tokenizer)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if _looks_local(model):
        raise ModelLoadError(
            f"Model directory {str(model)!r} does not exist. Pass an existing folder written by "
            "save_pretrained, a Hub repo id such as 'org/name', or a loaded model object."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), revision=revision, token=token, cache_dir=cache_dir,
                                      local_files_only=local_files_only, allow_patterns=_MODEL_FILES))
    except Exception as err:  # the client raises many types (not found, offline, gated); all mean the same here
        raise ModelLoadError(f"Could not download model {str(model)!r} from the Hub: {err}") from err

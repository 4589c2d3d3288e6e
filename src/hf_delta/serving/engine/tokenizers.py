"""The tokenizer, chat template and end-of-sequence ids of each served model (a delta's own when it carries them)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ...errors import DeltaLoadError, InvalidRequestError
from ...model import BASE_NAME
from ...utils.loading import load_tokenizer


class DeltaTokenizers:
    """Per-model tokenizers and EOS ids, loaded on first use and cached (thread-safe).

    Args:
        base_tokenizer: the base's tokenizer (every delta without its own uses it).
        base_eos: the base's ``generation_config.eos_token_id``.
        folder_of: a delta name → its (downloaded) repo folder.
    """

    def __init__(self, base_tokenizer: PreTrainedTokenizerBase, base_eos: int | list[int] | None,
                 folder_of: Callable[[str], Path]):
        self.base_tokenizer = base_tokenizer
        self._base_eos = base_eos
        self._folder_of = folder_of
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._eos: dict[str, frozenset[int]] = {}
        self._lock = threading.Lock()

    def forget(self, name: str) -> None:
        """Drop what is cached for ``name`` (its repo changed)."""
        with self._lock:
            self._tokenizers.pop(name, None)
            self._eos.pop(name, None)

    def eos_ids(self, name: str) -> frozenset[int]:
        """The EOS ids of resolved model ``name`` (``get`` must have run for it)."""
        return self._eos[name]

    def get(self, name: str) -> PreTrainedTokenizerBase:
        """The tokenizer of resolved model ``name`` (``"__base__"`` or a delta name)."""
        with self._lock:
            if name in self._tokenizers:
                return self._tokenizers[name]
        tokenizer, generation_eos = self.base_tokenizer, self._base_eos
        if name != BASE_NAME:
            folder = self._folder_of(name)
            if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
                try:
                    tokenizer = load_tokenizer(folder)
                except Exception as err:
                    raise DeltaLoadError(f"The tokenizer of delta {name!r} could not be loaded: {err}") from err
            if (folder / "generation_config.json").is_file():
                try:
                    generation_eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
                except (OSError, ValueError) as err:
                    raise DeltaLoadError(f"generation_config.json of delta {name!r} is unreadable: {err}") from err
        eos = eos_from(tokenizer, generation_eos)
        with self._lock:
            self._tokenizers[name], self._eos[name] = tokenizer, eos
        return tokenizer


def eos_from(tokenizer: PreTrainedTokenizerBase, generation_eos: int | list[int] | None) -> frozenset[int]:
    """The tokenizer's EOS id together with the generation config's (one id or a list)."""
    ids = set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    ids.add(tokenizer.eos_token_id)
    return frozenset(i for i in ids if i is not None)


def render_chat(tokenizer: PreTrainedTokenizerBase, model: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """``messages`` through ``tokenizer``'s chat template, ending with the assistant's turn."""
    if not tokenizer.chat_template:
        raise InvalidRequestError(f"Model {model!r} has no chat template; use the completions API.")
    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except Exception as err:  # template errors are the request's fault
        raise InvalidRequestError(f"The chat template of {model!r} rejected these messages: {err}") from err


def encode(tokenizer: PreTrainedTokenizerBase, model: str, prompt: str | Sequence[int], *,
           add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``prompt`` (ids are checked against the vocabulary; ``model`` names it in errors)."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    ids = [int(t) for t in prompt]
    if any(t < 0 or t >= len(tokenizer) for t in ids):
        raise InvalidRequestError(f"Prompt token ids must be in [0, {len(tokenizer)}) for model {model!r}.")
    return ids

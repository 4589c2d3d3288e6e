"""Delta repos on the Hugging Face Hub: resolve/download, upload, and the model card."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .config import CONFIG_NAME, FORMAT_VERSION
from .errors import DeltaFormatError
from .storage import GENERATION_CONFIG, TOKENIZER_FILES, WEIGHTS_INDEX_NAME, Delta

logger = logging.getLogger(__name__)

_ALLOW = [CONFIG_NAME, "delta_model*.safetensors", WEIGHTS_INDEX_NAME, "README.md", GENERATION_CONFIG,
          *TOKENIZER_FILES]


def resolve_delta_folder(
    delta_id: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder holding the delta repo ``delta_id`` (a folder already, or downloaded from the Hub).

    Downloads go through ``huggingface_hub``'s cache, so ``HF_HUB_OFFLINE=1`` and ``local_files_only`` work.
    """
    path = Path(delta_id).expanduser()
    if path.is_dir():
        return path
    if isinstance(delta_id, Path) or str(delta_id).startswith((".", "/", "~")):
        raise DeltaFormatError(f"Delta folder {str(delta_id)!r} does not exist.")
    try:
        validate_repo_id(str(delta_id))
    except HFValidationError as err:
        raise DeltaFormatError(
            f"{str(delta_id)!r} is neither an existing folder nor a valid Hub repo id ({err})."
        ) from err
    try:
        folder = snapshot_download(str(delta_id), revision=revision, token=token, cache_dir=cache_dir,
                                   local_files_only=local_files_only, allow_patterns=_ALLOW)
    except RevisionNotFoundError as err:
        raise DeltaFormatError(f"Revision {revision!r} of delta repo {delta_id!r} does not exist.") from err
    except RepositoryNotFoundError as err:
        raise DeltaFormatError(
            f"Delta repo {delta_id!r} is not a local folder and was not found on the Hub (or you lack access: "
            "pass token=...)."
        ) from err
    except (LocalEntryNotFoundError, EntryNotFoundError) as err:
        raise DeltaFormatError(
            f"Delta repo {delta_id!r} is not in the local cache and the Hub cannot be reached (offline mode?). "
            "Download it once with network access or unset HF_HUB_OFFLINE."
        ) from err
    if not (Path(folder) / CONFIG_NAME).is_file():
        raise DeltaFormatError(
            f"Repo {delta_id!r} has no {CONFIG_NAME}: it is not an hf_delta delta repo (is it the base model "
            "or a PEFT adapter? load those with transformers/peft)."
        )
    return Path(folder)


def _is_repo_id(name: str | None) -> bool:
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def model_card(delta: Delta, *, repo_id: str | None = None) -> str:
    """A Hub model card with the metadata that makes the repo findable (library, base, tags).

    ``base_model`` is only set when the base was given as a Hub id: the Hub rejects local paths there.
    """
    c, record = delta.config, delta.record
    base = record.base_model_name_or_path or "unknown"
    base_line = f"base_model: {base}\n" if _is_repo_id(record.base_model_name_or_path) else ""
    size_mb = delta.nbytes() / 1e6
    return f"""---
library_name: hf_delta
{base_line}pipeline_tag: text-generation
tags:
- hf_delta
- delta-compression
- {c.method}
---

# {c.method} delta of a fine-tune of `{base}`

This repo holds only the *difference* between a fine-tuned model and its base, compressed with
**{c.method}** ({size_mb:.2f} MB of tensors). Load it on the base with hf_delta:

```python
from hf_delta import DeltaModel

model = DeltaModel.from_pretrained("{base}", "{repo_id or "<this repo id>"}")
```

Base revision: `{record.base_model_revision or "main"}` · format version {FORMAT_VERSION} ·
hf_delta {record.library_version}.
"""


def push_delta_to_hub(
    delta: Delta,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload delta with hf_delta",
) -> str:
    """Create ``repo_id`` if needed and upload the delta repo in one commit; returns the commit sha."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        delta.save_pretrained(Path(tmp) / "delta")
        (Path(tmp) / "delta" / "README.md").write_text(model_card(delta, repo_id=repo_id))
        info = api.upload_folder(folder_path=Path(tmp) / "delta", repo_id=repo_id, revision=revision,
                                 commit_message=commit_message)
    return info.oid

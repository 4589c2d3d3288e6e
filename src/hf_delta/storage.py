"""The delta repo on disk: ``delta_config.json`` + ``delta_model.safetensors`` (+ tokenizer files).

Tensor names inside the safetensors file:

* ``<module>::<buffer>`` — a compressed weight's packed tensors as ``saved_tensors()`` encodes them for disk
  (``config.modules["weights"][<module>]`` says its type and any disk encoding, e.g. compact 2:4 metadata);
* ``exact::<parameter>`` — a fine-tuned tensor stored as it is;
* ``new_rows::<module>`` — rows of a grown vocabulary.

``delta_config.json`` records the SHA-256 of each weight file (format 3); loading checks them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file

from .config import CONFIG_NAME, FORMAT_VERSION, CompressionRecord, DeltaConfig
from .errors import DeltaFormatError
from .methods import get_method, weight_class_for
from .methods.base import CompressedWeight
from .utils.checkpoint import write_safetensors
from .utils.checksums import bytes_checksum, file_checksum
from .utils.io import atomic_directory, atomic_write_text
from .utils.sizes import tensor_bytes

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "delta_model.safetensors"
WEIGHTS_INDEX_NAME = "delta_model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json")
GENERATION_CONFIG = "generation_config.json"


@dataclass
class Delta:
    """One compressed fine-tune, ready to be applied to its base.

    Attributes:
        config: the method's settings (this delta's own copy).
        record: what compression recorded about the base (checked when the delta is applied).
        weights: module name → compressed delta of that module's weight.
        exact: parameter name → fine-tuned tensor stored as it is (norms, biases, ...).
        new_rows: module name → rows of a grown vocabulary (embedding / output head).
        tied: output-head module name → embedding module name when they share a weight.
        vocab_size: the fine-tune's vocabulary size.
        files: tokenizer/generation-config file name → bytes, carried when they differ from the base.
        format_version: the repo format it was read from (saving always writes today's).
    """

    config: DeltaConfig
    record: CompressionRecord = field(default_factory=CompressionRecord)
    weights: dict[str, CompressedWeight] = field(default_factory=dict)
    exact: dict[str, torch.Tensor] = field(default_factory=dict)
    new_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    vocab_size: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as held in memory, under its repo name."""
        return self._named({m: dict(w.named_buffers()) for m, w in self.weights.items()})

    def _named(self, weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Repo names of the weights' tensors (``module`` → ``buffer`` → tensor), the exact tensors and new rows."""
        out = {f"{module}::{buf}": t for module, buffers in weights.items() for buf, t in buffers.items()}
        out.update({f"exact::{k}": v for k, v in self.exact.items()})
        out.update({f"new_rows::{k}": v for k, v in self.new_rows.items()})
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def nbytes(self) -> int:
        """Bytes of all delta tensors (what it costs to keep this delta resident)."""
        return tensor_bytes(self.tensors().values())

    def save_pretrained(self, folder: str | Path, *, max_shard_size: int | str = "5GB") -> None:
        """Write the delta repo to ``folder``; a failure leaves any previous content untouched."""
        saved = {m: w.saved_tensors() for m, w in self.weights.items()}
        modules = {
            "weights": {m: {"type": w.method, **saved[m][1], **({"setting": w.setting} if w.setting else {})}
                        for m, w in self.weights.items()},
            "tied": self.tied,
            "vocab_size": self.vocab_size,
        }
        # A delta read from an older repo is written in today's format.
        config = {**self.config.to_dict(), **self.record.to_dict(), "format_version": FORMAT_VERSION,
                  "modules": modules}
        tensors = self._named({m: t for m, (t, _) in saved.items()})
        split = split_torch_state_dict_into_shards(
            tensors, filename_pattern="delta_model{suffix}.safetensors", max_shard_size=max_shard_size
        )
        with atomic_directory(folder) as tmp:
            config["checksums"] = {
                filename: write_safetensors(tmp / filename, {n: tensors[n] for n in names}, metadata={"format": "pt"})
                for filename, names in split.filename_to_tensors.items()
            }
            if split.is_sharded:
                index = {"metadata": {"total_size": tensor_bytes(tensors.values())},
                         "weight_map": split.tensor_to_filename}
                atomic_write_text(tmp / WEIGHTS_INDEX_NAME, json.dumps(index, indent=2))
            atomic_write_text(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
            for name, data in self.files.items():
                (tmp / name).write_bytes(data)
            # Everything is written: only now drop what a previous save left and this one does not rewrite
            # (shards of another layout, tokenizer files of another fine-tune), so it is not carried over.
            # Other files (a README the user wrote) are kept.
            for stale in _owned_files(Path(folder)):
                if not (tmp / stale.name).exists():
                    stale.unlink(missing_ok=True)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Delta:
        """Read a delta repo from a local folder; corrupt or missing parts raise ``DeltaFormatError``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DeltaFormatError(f"Delta folder {str(folder)!r} does not exist.")
        data = read_config(folder)
        modules = _check_modules(data.get("modules"), folder)
        tensors = _read_tensors(folder, _checksums(data, folder))
        weights: dict[str, CompressedWeight] = {}
        for module, meta in modules["weights"].items():
            prefix = f"{module}::"
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not own:
                raise DeltaFormatError(f"{folder}: the tensors of module {module!r} are missing; re-download it.")
            weight_cls = weight_class_for(meta["type"])
            try:
                weights[module] = weight_cls.from_tensors(own, meta)
                weights[module].setting = meta.get("setting")
            except KeyError as err:
                raise DeltaFormatError(
                    f"{folder}: module {module!r} lacks {err} (its tensors: {sorted(own)}; its {CONFIG_NAME} "
                    f"entry: {sorted(meta)}). The repo is incomplete or corrupt; re-download or re-save it."
                ) from err
        files = {f.name: f.read_bytes() for f in folder.iterdir() if f.name in (*TOKENIZER_FILES, GENERATION_CONFIG)}
        return cls(
            config=get_method(data["method"]).config_class.from_dict(data),
            record=CompressionRecord.from_dict(data),
            format_version=data.get("format_version", FORMAT_VERSION),
            weights=weights,
            exact={k[len("exact::") :]: v for k, v in tensors.items() if k.startswith("exact::")},
            new_rows={k[len("new_rows::") :]: v for k, v in tensors.items() if k.startswith("new_rows::")},
            tied=dict(modules["tied"]),
            vocab_size=modules["vocab_size"],
            files=files,
        )


def read_config(folder: str | Path) -> dict[str, Any]:
    """The checked contents of ``folder``'s ``delta_config.json``: a known method and a readable format version."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise DeltaFormatError(
            f"{path} not found: {folder} is not an hf_delta delta repo. Create one with "
            "hf_delta.compress(...).save_pretrained(folder) or `hf-delta compress`."
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeltaFormatError(f"{path} is not valid JSON ({err}); re-save or re-download the delta.") from err
    if not isinstance(data, dict):
        raise DeltaFormatError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    if "method" not in data:
        raise DeltaFormatError(f"{CONFIG_NAME} has no 'method' field; this is not an hf_delta delta repo.")
    version = data.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DeltaFormatError(f"{CONFIG_NAME} has format_version {version!r}, expected an integer from 1 to "
                               f"{FORMAT_VERSION}; the file is corrupt, re-save or re-download the delta.")
    if version > FORMAT_VERSION:
        raise DeltaFormatError(
            f"{CONFIG_NAME} has format_version {version!r}, but this hf_delta reads up to "
            f"{FORMAT_VERSION}. Upgrade hf_delta (pip install -U hf_delta)."
        )
    get_method(data["method"])  # an unknown method fails here, naming the known ones
    return data


def load_config(folder: str | Path) -> DeltaConfig:
    """The method config saved in a delta repo folder (its settings; the method resolved from the registry)."""
    data = read_config(folder)
    return get_method(data["method"]).config_class.from_dict(data)


def _owned_files(folder: Path) -> list[Path]:
    """Files of ``folder`` that a delta save writes (all of them are replaced together)."""
    if not folder.is_dir():
        return []
    owned = {CONFIG_NAME, WEIGHTS_INDEX_NAME, *TOKENIZER_FILES, GENERATION_CONFIG}
    return [f for f in folder.iterdir() if f.name in owned or f.match("delta_model*.safetensors")]


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a delta repo (one file, or the shards its index names)."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise DeltaFormatError(f"{index} is malformed ({err}); re-download the delta.") from err
        return [folder / n for n in names]
    return [folder / WEIGHTS_NAME]


def _check_modules(modules: Any, folder: Path) -> dict[str, Any]:
    """The ``modules`` entry of a delta config, with its shape checked (it is written by ``save_pretrained``)."""
    modules = {"weights": {}, "tied": {}, "vocab_size": 0, **(modules or {})} if isinstance(modules, dict) \
        else modules
    ok = (
        isinstance(modules, dict)
        and isinstance(modules["weights"], dict)
        and all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in modules["weights"].values())
        and isinstance(modules["tied"], dict)
        and isinstance(modules["vocab_size"], int)
    )
    if not ok:
        raise DeltaFormatError(
            f"{folder / CONFIG_NAME}: its 'modules' entry is malformed (expected {{'weights': {{module: {{'type': "
            f"..., ...}}}}, 'tied': {{...}}, 'vocab_size': int}}, got {str(modules)[:200]}). Re-save the delta."
        )
    return modules


def _checksums(data: dict[str, Any], folder: Path) -> dict[str, str] | None:
    """The weight files' recorded checksums; ``None`` for a repo older than format 3 (logged: nothing to check)."""
    version = data.get("format_version", FORMAT_VERSION)
    checksums = data.get("checksums")
    if checksums is None and version < 3:
        logger.info("%s is a format %d delta repo: its weight files carry no checksums, so corruption cannot be "
                    "detected. Re-save it (Delta.from_folder(...).save_pretrained(...)) to add them.", folder, version)
        return None
    if not (isinstance(checksums, dict) and all(isinstance(v, str) for v in checksums.values())):
        raise DeltaFormatError(
            f"{folder / CONFIG_NAME}: format {version} records a checksum for each weight file in 'checksums' "
            f"({{file: 'sha256:<hex>'}}), got {str(checksums)[:200]}. The config was edited or is corrupt; "
            "re-download or re-save the delta.")
    return checksums


_READ_WHOLE_BYTES = 64 * 2**20


def _read_tensors(folder: Path, checksums: dict[str, str] | None) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise DeltaFormatError(f"{path} is missing: the delta repo at {folder} is incomplete. Re-download it.")
        expected = None
        if checksums is not None:
            expected = checksums.get(path.name)
            if expected is None:
                raise DeltaFormatError(
                    f"{folder / CONFIG_NAME} records no checksum for {path.name} (it has {sorted(checksums)}): the "
                    "files do not belong together. Re-download or re-save the delta.")
        # Small shards are read in one go: parsing them from memory is ~3x faster than mapping the file, and
        # loading a delta fast is the point of serving deltas. Large ones stay memory-mapped, hashed in chunks.
        raw = path.read_bytes() if path.stat().st_size <= _READ_WHOLE_BYTES else None
        if expected is not None:
            _verify(path, file_checksum(path) if raw is None else bytes_checksum(raw), expected)
        try:
            # A mapped shard's tensors are copied out: a delta attached to a layer is copied into its slot buffer,
            # and a mapping kept alive by the delta's other tensors would hold every page that copy touched.
            tensors.update({k: t.clone() for k, t in load_file(path).items()} if raw is None else
                           safetensors_load(raw))
        except (SafetensorError, OSError, ValueError) as err:
            raise DeltaFormatError(
                f"{path} is corrupted or truncated ({err}). Delete it and download or save the delta again."
            ) from err
    return tensors


def _verify(path: Path, found: str, expected: str) -> None:
    if found != expected:
        raise DeltaFormatError(
            f"{path} is corrupted or truncated: its checksum {found} differs from {expected}, which "
            f"{CONFIG_NAME} recorded when the delta was saved. Delete it and download or save the delta again."
        )


def describe(folder: str | Path) -> dict[str, Any]:
    """Method, size on disk and base of a saved delta (for listings and model cards)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    size = sum(p.stat().st_size for p in weight_files(folder) if p.is_file())
    return {"method": config.get("method"), "weight_bytes": size, "base": config.get("base_model_name_or_path")}

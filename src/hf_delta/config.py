"""Delta configs: one dataclass per method, all saved as ``delta_config.json`` (never pickled)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ._io import atomic_write_text
from .errors import DeltaConfigError, DeltaFormatError

logger = logging.getLogger(__name__)

CONFIG_NAME = "delta_config.json"
# 2: a weight kind may encode its tensors more compactly on disk than in memory, saying so in its entry of
# ``modules["weights"]`` (DeltaZip: compact 2:4 metadata). Format 1 repos are still read.
FORMAT_VERSION = 2
# Not "adapter_config.json": transformers and vLLM would try to load a delta repo as a LoRA adapter.


@dataclass
class DeltaConfig:
    """Settings shared by every method, plus what is recorded about the base at compression time.

    Args:
        target_modules: Linear layers whose delta is compressed: ``"all-linear"`` (every ``nn.Linear``
            except the output head), a list of module-name suffixes, or a regular expression matched
            against full module names.
        compress_embeddings: Compress the input embedding and the output head with the method too. When
            ``False`` their deltas are stored dense (as BitDelta and DeltaZip do), which dominates the size
            on small models.
        seed: Seed for everything random in compression (calibration sampling, distillation order).
    """

    method: ClassVar[str] = ""

    target_modules: str | list[str] = "all-linear"
    compress_embeddings: bool = True
    seed: int = 0
    # Recorded at compression; users do not set these.
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    base_fingerprint: dict[str, Any] | None = None
    dtype: str = "bfloat16"
    format_version: int = FORMAT_VERSION
    library_version: str | None = None
    modules: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``DeltaConfigError`` for settings that cannot work, before any work starts."""
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise DeltaConfigError(f"dtype must be 'bfloat16', 'float16' or 'float32', got {self.dtype!r}.")
        if not isinstance(self.target_modules, (str, list)):
            raise DeltaConfigError(
                f"target_modules must be 'all-linear', a list of names or a regex string, got "
                f"{type(self.target_modules).__name__}."
            )

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method}
        d.update(dataclasses.asdict(self))
        return d

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``delta_config.json`` into ``folder`` (atomically)."""
        atomic_write_text(Path(folder) / CONFIG_NAME, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """Build the method's config class from a saved dict; unknown keys warn (a newer hf_delta wrote them)."""
        from .methods import get_method

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
        config_cls = get_method(data["method"]).config_class
        names = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(data) - names - {"method"})
        if unknown:
            logger.warning("Ignoring unknown keys %s in %s (written by a newer hf_delta?)", unknown, CONFIG_NAME)
        return config_cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> DeltaConfig:
        """Read ``delta_config.json`` from a local folder."""
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
        return cls.from_dict(data)

"""Delta configs (one dataclass of settings per method) and the record compression keeps beside them.

Both are saved together as ``delta_config.json`` (never pickled); ``hf_delta.storage`` reads it back.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import DeltaConfigError

logger = logging.getLogger(__name__)

CONFIG_NAME = "delta_config.json"
# 2: a weight kind may encode its tensors more compactly on disk than in memory, saying so in its entry of
# ``modules["weights"]`` (DeltaZip: compact 2:4 metadata).
# 3: ``checksums`` records the SHA-256 of every weight file; a load checks them. Formats 1 and 2 are still read.
FORMAT_VERSION = 3
# Not "adapter_config.json": transformers and vLLM would try to load a delta repo as a LoRA adapter.


@dataclass
class DeltaConfig:
    """Settings shared by every method (each method's config subclasses this).

    A config holds settings only: what compression records about the base lives in the delta's
    :class:`CompressionRecord`, so one config object can compress against any number of bases.

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

    def validate(self) -> None:
        """Raise ``DeltaConfigError`` for settings that cannot work, before any work starts."""
        if not isinstance(self.target_modules, (str, list)):
            raise DeltaConfigError(
                f"target_modules must be 'all-linear', a list of names or a regex string, got "
                f"{type(self.target_modules).__name__}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The method's name and every setting (JSON-able)."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """This config class from saved settings; unknown keys warn (a newer hf_delta wrote them).

        Keys that are not settings (``method``, and what a delta repo records beside them) are skipped.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - NON_SETTING_KEYS)
        if unknown:
            logger.warning("Ignoring unknown keys %s in %s (written by a newer hf_delta?)", unknown, CONFIG_NAME)
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class CompressionRecord:
    """What ``compress()`` recorded about the base and the library; users do not set these.

    Attributes:
        base_model_name_or_path: the base as it was given (Hub id or folder), or its config's name.
        base_model_revision: the base repo's revision, when it was loaded by id at one.
        base_fingerprint: names, shapes and sampled values of the base (checked when the delta is applied).
        library_version: the hf_delta version that compressed.
    """

    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    base_fingerprint: dict[str, Any] | None = None
    library_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionRecord:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


# Keys of delta_config.json beside a method's settings. "dtype" was written by format 1-2 repos of hf_delta
# 0.1 and never read; it is skipped without a warning.
NON_SETTING_KEYS = frozenset(
    {"method", "format_version", "modules", "checksums", "dtype",
     *(f.name for f in dataclasses.fields(CompressionRecord))}
)

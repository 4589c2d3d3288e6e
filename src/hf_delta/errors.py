"""Every exception hf_delta raises on purpose.

Each also inherits from the built-in it refines, so ``except ValueError`` keeps working, and each message
says what was wrong and what to do about it.
"""

from __future__ import annotations


class HfDeltaError(Exception):
    """Base class of all hf_delta errors."""


class ZooError(HfDeltaError, ValueError):
    """The reference zoo was asked for something it does not have (size, model, directory)."""


class ModelLoadError(HfDeltaError, OSError):
    """A model or tokenizer directory is missing, incomplete, or its parts do not belong together."""


class ArchitectureMismatchError(HfDeltaError, ValueError):
    """A base and a fine-tune (or a delta) do not share an architecture or parameter shapes."""


class UnsupportedArchitectureError(HfDeltaError, ValueError):
    """A model uses a feature hf_delta cannot apply a delta to exactly; the message names it and what to do."""


class BaseModelMismatchError(HfDeltaError, ValueError):
    """A delta was compressed against a different base than the one it is being applied to."""


class DeltaConfigError(HfDeltaError, ValueError):
    """A compression setting is impossible or a delta_config.json is malformed."""


class DeltaFormatError(HfDeltaError, ValueError):
    """A delta repo on disk or on the Hub is not a valid hf_delta repo (missing, corrupt, too new)."""


class DeltaNotFoundError(HfDeltaError, KeyError):
    """A delta name was used that is not loaded on this model."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class CalibrationError(HfDeltaError, ValueError):
    """Calibration data is empty or unusable."""


class EngineConfigError(HfDeltaError, ValueError):
    """A serving-engine setting is impossible (slot counts, KV budget, batch limits, unsupported model)."""


class InvalidRequestError(HfDeltaError, ValueError):
    """A generation request the engine can never serve (too long for the context or the KV budget, bad params)."""


class DeltaLoadError(HfDeltaError, RuntimeError):
    """A delta registered with the serving engine could not be loaded; only requests for it fail."""


class MissingDependencyError(HfDeltaError, ImportError):
    """A feature needs an optional extra that is not installed; the message names the ``pip install`` to run."""


class FineTuneConfigError(HfDeltaError, ValueError):
    """A fine-tuning job cannot run as asked (LoRA config, dataset, hyperparameters or adapter name)."""


class BaseModelNotServedError(FineTuneConfigError):
    """A fine-tuning job names a base model the engine does not serve."""


class FineTuneJobNotFoundError(HfDeltaError, KeyError):
    """A fine-tuning job id that the engine does not know."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class InsufficientMemoryError(HfDeltaError, MemoryError):
    """The machine cannot hold what a compression setting needs; the message says what would fit."""


class SpaceBuildError(HfDeltaError, RuntimeError):
    """A Space folder cannot be built or pushed (no checkout to build the wheel from, a failed wheel build)."""

"""hf_delta: compress, share and serve many full-parameter fine-tunes of one base model as small deltas.

Public names are imported on first use (huggingface_hub style), so ``import hf_delta`` and the ``hf-delta``
command line start without loading torch or transformers.

>>> from hf_delta import BitDeltaConfig, DeltaModel, compress
>>> model = compress("org/base", "org/finetune", BitDeltaConfig())  # doctest: +SKIP
"""

# hf_delta.kernels lives in the top-level kernels/ folder (kernels/hf_delta/kernels). An installed package
# has it in place; from a plain checkout (PYTHONPATH=src:kernels, as benchmarks/gpu_check.sh runs) this
# joins the two source roots into one package.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

from typing import TYPE_CHECKING

from ._deprecated import install_module_aliases
from ._version import __version__
from .utils.lazy import lazy_exports

_ERRORS = (
    "ArchitectureMismatchError", "BaseModelMismatchError", "BaseModelNotServedError", "CalibrationError",
    "DeltaConfigError", "DeltaFormatError", "DeltaLoadError", "DeltaNotFoundError", "EngineConfigError",
    "FineTuneConfigError", "FineTuneJobNotFoundError", "HfDeltaError", "InsufficientMemoryError", "InvalidRequestError",
    "MissingDependencyError", "ModelLoadError", "SpaceBuildError", "UnsupportedArchitectureError", "ZooError",
)
# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "compress": "hf_delta.compression",
    "compress_delta": "hf_delta.compression",
    "DeltaConfig": "hf_delta.config",
    "CompressionRecord": "hf_delta.config",
    "AutoConfig": "hf_delta.methods.auto",
    "BitDeltaConfig": "hf_delta.methods.bitdelta",
    "DeltaZipConfig": "hf_delta.methods.deltazip",
    "LowRankConfig": "hf_delta.methods.lowrank",
    "MixedSVDConfig": "hf_delta.methods.mixed_svd",
    "CompressedWeight": "hf_delta.methods.base",
    "CompressionContext": "hf_delta.methods.base",
    "DeltaMethod": "hf_delta.methods.base",
    "register_delta_method": "hf_delta.methods.registry",
    "registered_methods": "hf_delta.methods.registry",
    "Delta": "hf_delta.storage",
    "DeltaModel": "hf_delta.model",
    "export_peft_lora": "hf_delta.integrations.peft",
    **dict.fromkeys(_ERRORS, "hf_delta.errors"),
}

__all__ = [  # the keys of _EXPORTS (a test checks), spelled out for tools that read __all__ statically
    "ArchitectureMismatchError",
    "AutoConfig",
    "BaseModelMismatchError",
    "BaseModelNotServedError",
    "BitDeltaConfig",
    "CalibrationError",
    "CompressedWeight",
    "CompressionContext",
    "CompressionRecord",
    "Delta",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaFormatError",
    "DeltaLoadError",
    "DeltaMethod",
    "DeltaModel",
    "DeltaNotFoundError",
    "DeltaZipConfig",
    "EngineConfigError",
    "FineTuneConfigError",
    "FineTuneJobNotFoundError",
    "HfDeltaError",
    "InsufficientMemoryError",
    "InvalidRequestError",
    "LowRankConfig",
    "MissingDependencyError",
    "MixedSVDConfig",
    "ModelLoadError",
    "SpaceBuildError",
    "UnsupportedArchitectureError",
    "ZooError",
    "__version__",
    "compress",
    "compress_delta",
    "export_peft_lora",
    "register_delta_method",
    "registered_methods",
]

install_module_aliases()


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # what editors and type checkers see; nothing is imported at run time
    from .compression import compress, compress_delta
    from .config import CompressionRecord, DeltaConfig
    from .errors import (
        ArchitectureMismatchError,
        BaseModelMismatchError,
        BaseModelNotServedError,
        CalibrationError,
        DeltaConfigError,
        DeltaFormatError,
        DeltaLoadError,
        DeltaNotFoundError,
        EngineConfigError,
        FineTuneConfigError,
        FineTuneJobNotFoundError,
        HfDeltaError,
        InsufficientMemoryError,
        InvalidRequestError,
        MissingDependencyError,
        ModelLoadError,
        SpaceBuildError,
        UnsupportedArchitectureError,
        ZooError,
    )
    from .integrations.peft import export_peft_lora
    from .methods.auto import AutoConfig
    from .methods.base import CompressedWeight, CompressionContext, DeltaMethod
    from .methods.bitdelta import BitDeltaConfig
    from .methods.deltazip import DeltaZipConfig
    from .methods.lowrank import LowRankConfig
    from .methods.mixed_svd import MixedSVDConfig
    from .methods.registry import register_delta_method, registered_methods
    from .model import DeltaModel
    from .storage import Delta

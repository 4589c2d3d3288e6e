"""hf_delta: compress, share and serve many full-parameter fine-tunes of one base model as small deltas."""

# hf_delta.kernels lives in the top-level kernels/ folder (kernels/hf_delta/kernels). An installed package
# has it in place; from a plain checkout (PYTHONPATH=src:kernels, as benchmarks/gpu_check.sh runs) this
# joins the two source roots into one package.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"

from .compress import compress
from .config import DeltaConfig
from .methods import BitDeltaConfig, DeltaZipConfig, LowRankConfig, export_peft_lora, register_delta_method
from .model import DeltaModel
from .storage import Delta

__all__ = [
    "BitDeltaConfig",
    "Delta",
    "DeltaConfig",
    "DeltaModel",
    "DeltaZipConfig",
    "LowRankConfig",
    "__version__",
    "compress",
    "export_peft_lora",
    "register_delta_method",
]

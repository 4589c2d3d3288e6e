"""hf_delta: compress, share and serve many full-parameter fine-tunes of one base model as small deltas."""

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

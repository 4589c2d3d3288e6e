"""``DeltaZipConfig``: the settings of DeltaZip compression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...config import DeltaConfig
from ...errors import DeltaConfigError
from ...packing import (
    LOWBIT_WIDTHS,
)

if TYPE_CHECKING:
    pass


@dataclass
class DeltaZipConfig(DeltaConfig):
    """DeltaZip: joint OBS pruning + GPTQ quantisation of each delta matrix, layer by layer.

    Args:
        bits: bits per stored value: 2, 3, 4 or 8 (symmetric ints, scale per channel or group).
        sparsity: ``"2:4"`` (keep 2 of every 4 input columns, halves the stored values), a fraction in
            ``[0, 1)`` of values to prune unstructured (stored with a 1-bit mask when that is smaller), or
            ``None`` for no pruning.
        group_size: input columns sharing one scale; ``None`` = one scale per output channel.
        damp: added to the Hessian diagonal as a fraction of its mean (stabilises the inverse); > 0.
        block_size: columns per lazy-update block of the GPTQ sweep (a multiple of 4 for 2:4).
        calibration_samples / calibration_seq_len / calibration_batch_size: calibration set size and shape
            (used when ``compress`` gets no texts and samples them from the fine-tune).
        embedding_method: vocabulary matrices (embedding, output head) when ``compress_embeddings``:
            ``"rtn"`` = round-to-nearest per row at ``embedding_bits``, never pruned (the embedding has no input
            activations to calibrate on); ``"gptq"`` = as ``"rtn"`` for an untied embedding, but the output head's
            matrix is pruned and quantised like any linear layer (OBS/GPTQ on the head's input Hessian,
            ``sparsity``), also when it is tied to the embedding (calibrated as the head, its only use with input
            activations; during the decoder layers' calibration the embedding keeps its fine-tuned value).
        embedding_bits: bits for the vocabulary matrices (``None`` = ``bits``). 8 by default: the output head is
            as large as a few decoder layers and its errors reach the logits directly (small zoo, 2:4 + 4-bit:
            KL 0.019 at 8 bits vs 0.033 at 4 bits, for a 4.6x vs 5.7x size ratio). Embedding rows of tokens the
            fine-tune never saw are exactly zero and are not stored at all.
        head_bits: bits for the output head's matrix (tied to the embedding or not); ``None`` = as
            ``embedding_bits``. A head calibrated with ``"gptq"`` stands fewer bits than round-to-nearest embedding
            rows (small zoo, 2:4 + 4-bit, llama-cipher: retention 0.99 with a 2-bit head and 4-bit embedding rows,
            0.90 when the embedding rows are 2-bit too).
        use_hessian: ``False`` turns off the error feedback (plain round-to-nearest with magnitude pruning):
            the baseline that shows what the Hessian buys.
        prune: ``"obs"`` chooses the pruning mask during the sweep by OBS saliency and compensates its error;
            ``"magnitude"`` fixes the mask by ``|Δ|`` beforehand and does not compensate pruning (baseline).
    """

    bits: int = 4
    sparsity: str | float | None = "2:4"
    group_size: int | None = None
    damp: float = 0.01
    block_size: int = 128
    calibration_samples: int = 128
    calibration_seq_len: int = 128
    calibration_batch_size: int = 8
    embedding_method: str = "rtn"
    embedding_bits: int | None = 8
    head_bits: int | None = None
    use_hessian: bool = True
    prune: str = "obs"

    def validate(self) -> None:
        super().validate()
        if self.bits not in LOWBIT_WIDTHS:
            raise DeltaConfigError(f"DeltaZipConfig.bits must be one of {LOWBIT_WIDTHS}, got {self.bits!r}.")
        for name in ("embedding_bits", "head_bits"):
            if getattr(self, name) is not None and getattr(self, name) not in LOWBIT_WIDTHS:
                raise DeltaConfigError(f"{name} must be one of {LOWBIT_WIDTHS} or None, got {getattr(self, name)!r}.")
        s = self.sparsity
        if not (s is None or s == "2:4" or (isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1)):
            raise DeltaConfigError(
                f"sparsity must be '2:4', a float in [0, 1) such as 0.5, or None; got {s!r}.")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise DeltaConfigError(f"group_size must be a positive int or None (per channel), got {self.group_size!r}.")
        if not self.damp > 0:
            raise DeltaConfigError(f"damp must be > 0 (e.g. 0.01), got {self.damp!r}.")
        if self.block_size <= 0 or (s == "2:4" and self.block_size % 4):
            raise DeltaConfigError(f"block_size must be positive (and a multiple of 4 for 2:4), got {self.block_size}.")
        for name in ("calibration_samples", "calibration_seq_len", "calibration_batch_size"):
            if getattr(self, name) <= 0:
                raise DeltaConfigError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.embedding_method not in ("rtn", "gptq"):
            raise DeltaConfigError(f"embedding_method must be 'rtn' or 'gptq', got {self.embedding_method!r}.")
        if self.prune not in ("obs", "magnitude"):
            raise DeltaConfigError(f"prune must be 'obs' or 'magnitude', got {self.prune!r}.")

    @property
    def pruning(self) -> str | float | None:
        """``"2:4"``, a positive fraction, or ``None`` when nothing is pruned."""
        return None if self.sparsity in (None, 0, 0.0) else self.sparsity

"""The models panel's numbers: each delta's method, size on disk, ratio to its full fine-tune, residency, and
the engine's memory split between the base and the deltas."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HfDeltaError
from ..serving.engine.engine import Engine
from ..storage import describe
from ..utils.sizes import MB, bf16_weight_bytes, safetensors_bf16_bytes

logger = logging.getLogger(__name__)

TIER_LABELS = {"device": "resident (attached)", "cpu": "in CPU memory", "loading": "loading", "disk": "on disk",
               "failed": "failed to load"}


@dataclass
class ModelRow:
    """One line of the models table."""

    model: str
    method: str
    delta_mb: float | None
    finetune_mb: float | None
    ratio: float | None
    ratio_estimated: bool
    residency: str
    prompt_mode: str

    def cells(self) -> list[Any]:
        ratio = None if self.ratio is None else f"{'≈' if self.ratio_estimated else ''}{self.ratio:.1f}x"
        return [self.model, self.method, human_size(self.delta_mb), human_size(self.finetune_mb), ratio or "",
                self.residency, self.prompt_mode]


COLUMNS = ["model", "method", "delta on disk", "full fine-tune (bf16)", "ratio", "residency", "prompt"]


def human_size(mb: float | None) -> str:
    """``1.5`` → ``"1.50 MB"``, ``0.01`` → ``"10.2 KB"``, ``None`` → ``""``."""
    if mb is None:
        return ""
    if mb >= 1024:
        return f"{mb / 1024:.2f} GB"
    return f"{mb:.2f} MB" if mb >= 1 else f"{mb * 1024:.1f} KB"


class ModelCatalog:
    """Sizes and states of the models an engine serves.

    Args:
        engine: the engine.
        finetunes: delta name → folder of its full fine-tune, when known (the zoo); other deltas' fine-tune
            sizes are estimated from the base's weights and the delta's vocabulary size.
    """

    def __init__(self, engine: Engine, *, finetunes: Mapping[str, str | Path] | None = None):
        self.engine = engine
        self.finetunes = {k: Path(v) for k, v in (finetunes or {}).items()}
        self._static: dict[str, tuple[str, float | None, float | None, bool]] = {}
        self._base_bytes: int | None = None

    def base_bf16_bytes(self) -> int:
        if self._base_bytes is None:
            self._base_bytes = bf16_weight_bytes(self.engine.model.base_model)
        return self._base_bytes

    def _estimate_finetune_bytes(self, folder: Path) -> int:
        base = self.engine.model.base_model
        rows, hidden = base.get_input_embeddings().weight.shape
        config = json.loads((folder / "delta_config.json").read_text())
        vocab = int((config.get("modules") or {}).get("vocab_size") or rows)
        copies = 1 if getattr(base.config, "tie_word_embeddings", False) else 2
        return self.base_bf16_bytes() + max(0, vocab - rows) * hidden * 2 * copies

    def _describe(self, name: str) -> tuple[str, float | None, float | None, bool]:
        if name not in self._static:
            folder = self.engine.residency.folder(name)  # downloads a Hub delta on first use
            info = describe(folder)
            if name in self.finetunes:
                full, estimated = safetensors_bf16_bytes(self.finetunes[name]), False
            else:
                full, estimated = self._estimate_finetune_bytes(folder), True
            self._static[name] = (info["method"] or "?", info["weight_bytes"] / MB, full / MB, estimated)
        return self._static[name]

    def rows(self, modes: Mapping[str, str] | None = None) -> list[ModelRow]:
        """One row for the base, then one per delta (a delta that cannot be read shows why instead)."""
        modes = modes or {}
        tiers = {n: t for t, names in self.engine.stats()["residency"]["tiers"].items() for n in names}
        base_mb = self.base_bf16_bytes() / MB
        rows = [ModelRow(self.engine.base_name, "base (full weights)", None, base_mb, None, False, "always resident",
                         modes.get(self.engine.base_name, "raw"))]
        for name in self.engine.model_names()[1:]:
            tier = TIER_LABELS.get(tiers.get(name, "disk"), tiers.get(name, "disk"))
            try:
                method, delta_mb, full_mb, estimated = self._describe(name)
            except (HfDeltaError, OSError, ValueError) as err:
                rows.append(ModelRow(name, f"unreadable: {err}", None, None, None, False, tier, ""))
                continue
            ratio = full_mb / delta_mb if delta_mb else None
            rows.append(ModelRow(name, method, delta_mb, full_mb, ratio, estimated, tier, modes.get(name, "")))
        return rows

    def memory(self) -> dict[str, float]:
        """Megabytes held by the engine: base weights, deltas attached to the model, deltas in CPU memory,
        and the KV cache."""
        mem = self.engine.memory_stats()
        weights = mem["weight_bytes"]
        return {"base weights": weights["base"] / MB, "deltas (attached)": weights["deltas_device"] / MB,
                "deltas (CPU memory)": weights["deltas_cpu"] / MB, "KV cache": mem["kv_cache_bytes"] / MB}

    def memory_summary(self, memory: Mapping[str, float] | None = None) -> str:
        """One Markdown line: base vs deltas (how many in each tier), and the KV cache."""
        memory = memory or self.memory()
        tiers = self.engine.stats()["residency"]["tiers"]
        base, attached, cpu = memory["base weights"], memory["deltas (attached)"], memory["deltas (CPU memory)"]
        share = f" ({attached / base:.0%} of the base)" if base else ""
        return (f"Base weights **{human_size(base)}**; {len(tiers.get('device', []))} deltas attached "
                f"**{human_size(attached)}**{share}, {len(tiers.get('cpu', []))} more in CPU memory "
                f"**{human_size(cpu)}**, {len(tiers.get('disk', []))} on disk only. KV cache "
                f"{human_size(memory['KV cache'])} (allocated once, shared by every request).")

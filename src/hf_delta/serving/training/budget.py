"""How many fine-tuning tokens each engine step may carry: a per-token latency objective (TPOT SLO).

The step time on this machine is fitted online, by least squares over the most recent steps::

    seconds ≈ a + b·inference_tokens + c·forward_training_tokens + d·backward_token_layers + e·backward_layers

(a backward "token-layer" is one training token recomputed and differentiated through one decoder layer).
Each step, inference tokens are scheduled first; the training work then gets what the SLO leaves,
``slo − (a + b·inference_tokens)``, as forward tokens (``/ c``) or whole layers of backward
(``/ (e + d·tokens)``). When inference alone reaches the SLO (peak load) the budget is zero: training pauses,
inference never waits. Until enough steps are measured, training tokens are probed in small sizes.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ...errors import EngineConfigError

logger = logging.getLogger(__name__)


class StepTimeModel:
    """Online linear fit of step seconds over ``(inference, forward, backward token-layers, backward layers)``."""

    def __init__(self, *, window: int = 512, refit_every: int = 8, min_samples: int = 16):
        self.samples: deque[tuple[float, ...]] = deque(maxlen=window)
        self.refit_every = refit_every
        self.min_samples = min_samples
        self.coef: np.ndarray | None = None
        self._since_fit = 0

    def observe(self, n_inf: int, n_fwd: int, bwd_tokens: int, bwd_layers: int, seconds: float) -> None:
        """Record one measured step."""
        self.samples.append((1.0, n_inf, n_fwd, bwd_tokens, bwd_layers, seconds))
        self._since_fit += 1
        trained = sum(1 for s in self.samples if s[2] or s[3])
        if len(self.samples) >= self.min_samples and trained >= self.min_samples // 2 and (
                self.coef is None or self._since_fit >= self.refit_every):
            self._fit()

    def _fit(self) -> None:
        data = np.array(self.samples, dtype=np.float64)
        x, y = data[:, :5], data[:, 5]
        scale = np.maximum(np.abs(x).max(axis=0), 1.0)
        xs = x / scale
        ridge = 1e-6 * np.eye(5)
        ridge[0, 0] = 0.0
        coef = np.linalg.solve(xs.T @ xs + ridge * len(y), xs.T @ y) / scale
        self.coef = np.maximum(coef, 0.0)  # a negative cost per token is noise
        self._since_fit = 0

    @property
    def ready(self) -> bool:
        return self.coef is not None

    def predict(self, n_inf: int = 0, n_fwd: int = 0, bwd_tokens: int = 0, bwd_layers: int = 0) -> float:
        """Predicted seconds of a step (``0`` before the first fit)."""
        if self.coef is None:
            return 0.0
        return float(self.coef @ np.array([1.0, n_inf, n_fwd, bwd_tokens, bwd_layers]))

    def as_dict(self) -> dict[str, float] | None:
        if self.coef is None:
            return None
        names = ("fixed_s", "per_inference_token_s", "per_forward_token_s", "per_backward_token_layer_s",
                 "per_backward_layer_s")
        return dict(zip(names, (float(c) for c in self.coef), strict=True))


@dataclass
class CoServeScheduler:
    """Picks each step's training share under a per-token latency objective (see the module docstring).

    Args:
        tpot_slo_ms: the latency objective of one step (= one output token of every decoding request).
        idle_step_ms: the step length training may use when no inference request is running or waiting
            (default: the SLO, so that a request arriving meanwhile waits at most one such step).
        max_train_tokens: most forward training tokens in one step.
        probe_tokens: forward chunk sizes tried (in turn) before the step-time fit is ready.
    """

    tpot_slo_ms: float = 50.0
    idle_step_ms: float | None = None
    max_train_tokens: int = 512
    probe_tokens: Sequence[int] = (8, 32, 16, 64)
    model: StepTimeModel = field(default_factory=StepTimeModel)

    def __post_init__(self) -> None:
        if self.tpot_slo_ms <= 0 or self.max_train_tokens < 1:
            raise EngineConfigError(f"tpot_slo_ms must be > 0 and max_train_tokens >= 1; got {self.tpot_slo_ms}, "
                                    f"{self.max_train_tokens}.")
        self._probe = itertools.cycle(self.probe_tokens)

    def budget(self, n_inf: int, *, idle: bool) -> float:
        """Seconds of training work this step may add to its ``n_inf`` inference tokens (0 = pause training)."""
        if idle:  # nobody waits on this step: it may take its whole length
            return (self.idle_step_ms or self.tpot_slo_ms) / 1e3
        target = self.tpot_slo_ms / 1e3
        return max(0.0, target - self.model.predict(n_inf)) if self.model.ready else target

    def forward_tokens(self, seconds: float) -> int:
        """Forward training tokens that fit in ``seconds``."""
        if not self.model.ready:
            return next(self._probe) if seconds > 0 else 0
        per = self.model.coef[2]
        if per <= 0:
            return self.max_train_tokens if seconds > 0 else 0
        return max(0, min(self.max_train_tokens, math.floor(seconds / per)))

    def forward_seconds(self, n_fwd: int) -> float:
        return self.model.predict(n_fwd=n_fwd) - self.model.predict() if self.model.ready else 0.0

    def backward_layers(self, seconds: float, tokens: int, left: int) -> int:
        """Whole decoder layers (of ``tokens`` training tokens) whose backward fits in ``seconds``."""
        if not self.model.ready:
            return min(left, 1) if seconds > 0 else 0
        per = self.model.predict(bwd_tokens=tokens, bwd_layers=1) - self.model.predict()
        if per <= 0:
            return left
        return max(0, min(left, math.floor(seconds / per)))

    def observe(self, n_inf: int, n_fwd: int, bwd_tokens: int, bwd_layers: int, seconds: float) -> None:
        """Feed one measured step into the fit."""
        self.model.observe(n_inf, n_fwd, bwd_tokens, bwd_layers, seconds)

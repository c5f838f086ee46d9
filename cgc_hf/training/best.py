"""Best-checkpoint selection (``metric_for_best_model``, ``load_best_model_at_end``).

As in ``transformers.Trainer``: each evaluation is compared on one metric; with
``load_best_model_at_end`` the best evaluation's training state is kept as a checkpoint (never
pruned), and at the end its weights become the final model, whose reported metrics are that
evaluation's.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ..evaluation import PREFIX, metric
from .checkpoints import CHECKPOINT_PREFIX, TrainerState

logger = logging.getLogger(__name__)


def metric_key(name: str | None) -> str | None:
    """``"accuracy"`` or ``"eval_accuracy"`` -> ``"eval_accuracy"``."""
    if name is None:
        return None
    return name if name.startswith(PREFIX) else f"{PREFIX}{name}"


def greater_is_better(args: Any) -> bool:
    """``args.greater_is_better``, else the metric's own direction in :data:`METRICS`."""
    if args.greater_is_better is not None:
        return bool(args.greater_is_better)
    found = metric(args.metric_for_best_model or "")
    return found.higher_is_better if found is not None else True


class BestModel:
    """Track the best evaluation of a run (its step and value live in the trainer state)."""

    def __init__(self, args: Any) -> None:
        self.key = metric_key(args.metric_for_best_model)
        self.greater = greater_is_better(args) if self.key else True
        self.keep = bool(args.load_best_model_at_end)

    def update(self, state: TrainerState, metrics: dict[str, float]) -> bool:
        """Record ``metrics`` of ``state.global_step``; whether it is the best so far."""
        value = metrics.get(self.key) if self.key else None
        if value is None or math.isnan(value):
            return False
        best = state.best_metric
        if best is not None and not (value > best if self.greater else value < best):
            return False
        state.best_metric, state.best_step = float(value), state.global_step
        return True

    def checkpoint(self, state: TrainerState, root: Path) -> Path | None:
        """The checkpoint that holds the best evaluation's state (None without one)."""
        if state.best_step is None:
            return None
        return root / f"{CHECKPOINT_PREFIX}{state.best_step}"

    def load(self, model: Any, state: TrainerState, root: Path, device: Any) -> dict[str, Any]:
        """Load the best checkpoint's weights into ``model``; return that evaluation."""
        from safetensors.torch import load_model

        path = self.checkpoint(state, root)
        logger.info("loading the best model (%s=%.4g) from %s", self.key, state.best_metric, path)
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
        return next(e for e in state.evaluations if e["step"] == state.best_step)

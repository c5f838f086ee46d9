"""What a run reports as it goes: running losses, throughput, one-line metric summaries."""

from __future__ import annotations

import time
from typing import Any

from torch import Tensor


class RunningLoss:
    """Sums of the losses since the last log line, and the images seen."""

    def __init__(self) -> None:
        self.loss = self.ce = self.cgc = 0.0
        self.batches = self.images = 0
        self.since = time.perf_counter()

    def add(self, out: dict[str, Tensor]) -> None:
        self.loss += out["loss"].item()
        self.ce += out["loss_ce"].item()
        self.cgc += out["loss_cgc"].item()
        self.batches += 1

    def logs(self, lr: float) -> dict[str, float]:
        n = self.batches
        seconds = max(time.perf_counter() - self.since, 1e-9)
        return {
            "train/loss": self.loss / n,
            "train/loss_ce": self.ce / n,
            "train/loss_cgc": self.cgc / n,
            "train/lr": lr,
            "train/images_per_second": self.images / seconds,
        }


def format_metrics(metrics: dict[str, Any]) -> str:
    """``key=value`` pairs, floats to 4 significant digits."""
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )

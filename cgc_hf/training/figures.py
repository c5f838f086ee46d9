"""The heatmap figure a run writes at each evaluation, and sends to the trackers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from ..metrics import eval_mode

logger = logging.getLogger(__name__)


def write_figure(
    accelerator: Any,
    model: Any,
    dataset: Dataset,
    collate: Any,
    images: int,
    output_dir: Path,
    step: int,
) -> Path | None:
    """Heatmaps of the first ``images`` eval images, as ``output_dir/figures/step_<step>.png``.

    Returns the file, or None without matplotlib (an optional dependency).

    The first images of the eval set, whatever the number of processes; the model is explained in
    eval mode and its mode restored.
    """
    try:
        from ..visualize import explanation_figure, log_figure
    except ImportError:  # matplotlib is an optional dependency
        logger.info("matplotlib is not installed: no heatmap figure is written.")
        return None
    import matplotlib.pyplot as plt

    path = output_dir / "figures" / f"step_{step}.png"
    batch = collate([dataset[i] for i in range(min(images, len(dataset)))])
    batch = {k: v.to(accelerator.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    name = "CGC" if model.config.cgc_lambda > 0 else "baseline"
    with eval_mode(model):
        fig = explanation_figure(
            {name: model}, batch, model.config.data_config, path, max_images=images
        )
    log_figure(accelerator, "eval/heatmaps", fig, step)
    plt.close(fig)
    return path

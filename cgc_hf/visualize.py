"""Heatmap overlays and report figures.

matplotlib is an optional extra (``pip install 'cgc_hf[viz]'``); it is imported only when a
function here needs it, and figures are drawn on the Agg canvas, so nothing ever opens a window.
Heatmaps are resized with :func:`cgc_hf.metrics.heatmap_to_image_size`, the interpolation the
metrics use, so a picture shows exactly what was scored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import IGNORE_INDEX
from .errors import CGCValueError, close_matches
from .metrics import heatmap_to_image_size, zero_heatmaps

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

MISSING_MATPLOTLIB = (
    "cgc_hf.visualize needs matplotlib, which is not installed; install it with "
    "pip install 'cgc_hf[viz]'"
)


def _require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(MISSING_MATPLOTLIB) from err
    return matplotlib


def _colormap(name: str) -> Any:
    matplotlib = _require_matplotlib()
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise CGCValueError(
            f"cmap must be a matplotlib colormap name; got {name!r}."
            + close_matches(name, list(matplotlib.colormaps))
        ) from None


def denormalize(pixel_values: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo the model's input normalisation: ``x * std + mean``, clipped to [0, 1].

    Args:
        pixel_values: normalised images ``(3, H, W)`` or ``(B, 3, H, W)``.
        mean: per-channel mean the images were normalised with (``data_config["mean"]``).
        std: per-channel standard deviation (``data_config["std"]``).

    Returns:
        Images in [0, 1], same shape, float32.
    """
    x = pixel_values.float()
    if x.dim() not in (3, 4) or x.shape[-3] != len(mean) or len(mean) != len(std):
        raise CGCValueError(
            f"pixel_values must be (C, H, W) or (B, C, H, W) with C = len(mean) = len(std); got "
            f"shape {tuple(pixel_values.shape)}, {len(mean)} means and {len(std)} stds."
        )
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)  # (C, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)  # (C, 1, 1)
    return (x * s + m).clamp(0, 1)


def overlay(image: Tensor, heatmap: Tensor, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped heatmap over an image.

    The heatmap is resized to the image (bilinear, as in the metrics), scaled so its maximum is
    1 (an all-zero heatmap stays at the colormap's low end) and coloured with ``cmap``.

    Args:
        image: ``(3, H, W)`` in [0, 1] (see :func:`denormalize`).
        heatmap: ``(h, w)``, non-negative.
        alpha: weight of the heatmap colour (0 = image only, 1 = heatmap only).
        cmap: matplotlib colormap name.

    Returns:
        RGB array ``(H, W, 3)``, uint8.
    """
    if image.dim() != 3 or image.shape[0] != 3 or heatmap.dim() != 2:
        raise CGCValueError(
            f"image must be (3, H, W) and heatmap (h, w); got image {tuple(image.shape)} and "
            f"heatmap {tuple(heatmap.shape)}."
        )
    if not 0.0 <= alpha <= 1.0:
        raise CGCValueError(f"alpha must be in [0, 1]; got {alpha}.")
    h, w = image.shape[-2:]
    hm = heatmap_to_image_size(heatmap.detach().cpu(), (h, w)).clamp_min(0)  # (H, W)
    peak = hm.max()
    hm = hm / peak if peak > 0 else torch.zeros_like(hm)
    colour = _colormap(cmap)(hm.numpy())[..., :3]  # (H, W, 3) floats in [0, 1]
    rgb = image.detach().float().cpu().permute(1, 2, 0).numpy()  # (H, W, 3)
    blended = (1.0 - alpha) * rgb + alpha * colour
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def heatmap_grid(
    images: Tensor,
    rows: Mapping[str, Tensor],
    titles: Sequence[str] | None = None,
    path: str | Path | None = None,
    *,
    cell_titles: Mapping[str, Sequence[str]] | None = None,
    masks: Tensor | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    cell_inches: float = 1.6,
    label_inches: float = 0.5,
    dpi: int = 100,
) -> Figure:
    """A grid of heatmap overlays: one column per image, one row per model or class.

    The first row shows the images (with the mask outline when ``masks`` is given); each entry
    of ``rows`` adds a row of overlays, labelled with its key. The figure measures
    ``(label_inches + N * cell_inches) x ((1 + len(rows)) * cell_inches)`` inches at ``dpi``.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1].
        rows: row label -> heatmaps ``(N, h, w)``, e.g. ``{"CGC (pred)": ..., "baseline
            (pred)": ...}``; insertion order is row order.
        titles: one title per column (e.g. the true class), or None.
        path: where to save the PNG (parent folders are created); not saved when None.
        cell_titles: row label -> one caption per image (e.g. predicted class and probability).
        masks: ``(N, H, W)`` object masks drawn as outlines on the input row.
        alpha: heatmap weight of the overlays.
        cmap: matplotlib colormap name.
        cell_inches: side of one cell.
        label_inches: width of the row-label margin on the left.
        dpi: resolution of the saved PNG.

    Returns:
        The matplotlib ``Figure`` (on an Agg canvas).
    """
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if images.dim() != 4 or images.shape[0] == 0:
        raise CGCValueError(f"images must be (N, 3, H, W) with N >= 1; got {tuple(images.shape)}.")
    n = images.shape[0]
    for name, hms in rows.items():
        if hms.dim() != 3 or hms.shape[0] != n:
            raise CGCValueError(
                f"rows[{name!r}] must be heatmaps ({n}, h, w) to match images; got "
                f"{tuple(hms.shape)}."
            )
    captions = {"titles": titles}
    captions.update({f"cell_titles[{k!r}]": v for k, v in (cell_titles or {}).items()})
    for what, seq in captions.items():
        if seq is not None and len(seq) != n:
            raise CGCValueError(f"{what} must have one entry per image ({n}); got {len(seq)}.")

    nrows = 1 + len(rows)
    width, height = label_inches + n * cell_inches, nrows * cell_inches
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)  # Agg: renders to files only, never to a window
    axes = fig.subplots(
        nrows,
        n,
        squeeze=False,
        gridspec_kw={
            "left": label_inches / width,
            "right": 1.0 - 0.02 / width,
            "bottom": 0.02 / height,
            "top": 1.0 - 0.25 / height,
            "wspace": 0.05,
            "hspace": 0.25,
        },
    )
    images = images.detach().float().cpu()
    for j in range(n):
        ax = axes[0, j]
        ax.imshow(images[j].permute(1, 2, 0).clamp(0, 1).numpy())
        if masks is not None:
            m = masks[j].detach().float().cpu().numpy()
            if m.min() < 0.5 < m.max():  # an empty or full mask has no outline
                ax.contour(m, levels=[0.5], colors="lime", linewidths=0.8)
        if titles is not None:
            ax.set_title(titles[j], fontsize=7)
    for i, (name, hms) in enumerate(rows.items(), start=1):
        captions = (cell_titles or {}).get(name)
        for j in range(n):
            ax = axes[i, j]
            ax.imshow(overlay(images[j], hms[j], alpha=alpha, cmap=cmap))
            if captions is not None:
                ax.set_title(captions[j], fontsize=6, pad=2)
    labels = ["input", *rows]
    for i in range(nrows):
        for j in range(n):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(labels[i], fontsize=8)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=dpi)
        logger.info("wrote %s", path)
    return fig


def _label_name(id2label: Mapping[Any, str] | None, k: int) -> str:
    if not id2label:
        return str(k)
    return str(id2label.get(k, id2label.get(str(k), k)))


def explanation_figure(
    models: Mapping[str, nn.Module],
    batch: Mapping[str, Tensor],
    data_config: Mapping[str, Any],
    path: str | Path | None,
    max_images: int = 8,
    id2label: Mapping[Any, str] | None = None,
    **grid_kwargs: Any,
) -> Figure:
    """Grad-CAMs of several models on the same images, for the predicted and the true class.

    Rows: the input, then ``"<name> (pred)"`` for every model, then ``"<name> (true)"`` for
    every model when the batch has labels. Each model runs in its current mode (call
    ``model.eval()`` first) on its own device.

    Args:
        models: display name -> :class:`~cgc_hf.CGCModel`, e.g. ``{"CGC": m1, "baseline": m0}``.
        batch: ``pixel_values`` ``(B, 3, H, W)`` (normalised), optional ``labels`` ``(B,)``
            and ``mask`` ``(B, H, W)``.
        data_config: the models' data config (``mean`` and ``std`` undo the normalisation).
        path: where the PNG goes (None: not saved).
        max_images: use the first ``max_images`` images of the batch.
        id2label: class names; taken from the first model's config when omitted.
        **grid_kwargs: passed to :func:`heatmap_grid` (``cell_inches``, ``dpi``, ``cmap``...).

    Returns:
        The matplotlib ``Figure``.
    """
    if not models:
        raise CGCValueError("models must name at least one model; got an empty mapping.")
    if "pixel_values" not in batch:
        raise CGCValueError(f"batch must contain 'pixel_values'; got keys {sorted(batch)}.")
    x = batch["pixel_values"][:max_images].detach()  # (N, 3, H, W)
    labels = batch.get("labels")
    labels = None if labels is None else labels[:max_images].detach().cpu()  # (N,)
    masks = batch.get("mask")
    masks = None if masks is None else masks[:max_images]  # (N, H, W)
    if id2label is None:
        id2label = getattr(getattr(next(iter(models.values())), "config", None), "id2label", None)

    pred_rows: dict[str, Tensor] = {}
    true_rows: dict[str, Tensor] = {}
    captions: dict[str, list[str]] = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        xm = x.to(device)
        with torch.no_grad():
            probs = model(xm)["logits"].float().softmax(1).cpu()  # (N, K)
        conf, pred = probs.max(1)  # (N,) each
        pred_rows[f"{name} (pred)"] = hms = model.explain(xm, pred.to(device)).cpu()  # (N, h, w)
        # A flat blue cell is easy to misread as "a little everywhere"; say it is empty.
        captions[f"{name} (pred)"] = [
            f"{_label_name(id2label, int(k))} {float(p):.2f}" + (" (zero)" if z else "")
            for k, p, z in zip(pred, conf, zero_heatmaps(hms))
        ]
        if labels is not None:
            target = torch.where(labels != IGNORE_INDEX, labels, pred)  # (N,)
            true_rows[f"{name} (true)"] = hms = model.explain(xm, target.to(device)).cpu()
            captions[f"{name} (true)"] = ["zero heatmap" if z else "" for z in zero_heatmaps(hms)]
    titles = None
    if labels is not None:
        titles = [
            "unlabeled" if int(k) == IGNORE_INDEX else f"true: {_label_name(id2label, int(k))}"
            for k in labels
        ]
    images = denormalize(x.cpu(), data_config["mean"], data_config["std"])  # (N, 3, H, W)
    return heatmap_grid(
        images,
        {**pred_rows, **true_rows},
        titles,
        path,
        cell_titles=captions,
        masks=masks,
        **grid_kwargs,
    )


def comparison_figures(
    models: Mapping[str, nn.Module],
    datasets: Mapping[str, Any],
    output_dir: str | Path,
    max_images: int = 8,
    id2label: Mapping[Any, str] | None = None,
) -> list[Path]:
    """Grad-CAMs of every model on the first images of the evaluation set.

    One figure holds the models that see the images alike (the same data config: size, crop,
    normalisation), so their heatmaps are drawn on the same pixels: ``comparison.png`` for the
    first model's group, ``<name>/explanations.png`` for any other group.

    Args:
        models: display name -> model, in column order.
        datasets: display name -> the dataset that model was evaluated on (items as
            :func:`~cgc_hf.collate` takes them). The first rows are taken, not a sharded
            loader's, so the figure does not depend on the number of processes.
        output_dir: where the figures go.
        max_images: images per figure.
        id2label: class names.

    Returns:
        The paths written.
    """
    from .comparison import folder_name
    from .data import collate

    _require_matplotlib()
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, nn.Module]] = {}
    for name, model in models.items():
        key = json.dumps(model.config.data_config, sort_keys=True, default=str)
        groups.setdefault(key, {})[name] = model
    out, paths = Path(output_dir), []
    for i, group in enumerate(groups.values()):
        first = next(iter(group))
        dataset = datasets[first]
        batch = collate([dataset[j] for j in range(min(max_images, len(dataset)))])
        path = out / "comparison.png" if i == 0 else out / folder_name(first) / "explanations.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = explanation_figure(
            group, batch, group[first].config.data_config, path, max_images, id2label
        )
        plt.close(fig)
        paths.append(path)
    return paths


def figure_to_array(fig: Figure) -> np.ndarray:
    """The figure's pixels as an RGB array ``(H, W, 3)``, uint8 (drawn on its Agg canvas)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def log_figure(accelerator: Any, tag: str, fig: Figure, step: int) -> None:
    """Send a figure to every tracker of ``accelerator`` that takes images (TensorBoard, W&B...).

    Args:
        accelerator: an ``accelerate.Accelerator`` whose trackers were started
            (``init_trackers``); without trackers nothing happens.
        tag: the image's name in the tracker, e.g. ``"eval/heatmaps"``.
        fig: a matplotlib figure, e.g. from :func:`explanation_figure`.
        step: the training step it belongs to.
    """
    trackers = [t for t in getattr(accelerator, "trackers", []) if hasattr(t, "log_images")]
    if not trackers:
        return
    image = figure_to_array(fig)  # (H, W, 3)
    for tracker in trackers:
        # Each tracker's log_images takes its own form (accelerate passes them through).
        if tracker.name == "tensorboard":  # SummaryWriter.add_images: a batch, NCHW unless told
            tracker.log_images({tag: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name in ("aim", "clearml"):  # one image per key
            tracker.log_images({tag: image}, step=step)
        else:  # wandb, swanlab: a list of images per key
            tracker.log_images({tag: [image]}, step=step)

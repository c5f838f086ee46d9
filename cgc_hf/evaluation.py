"""The one evaluation: what cgc_hf reports, computed over a data loader, summarised and compared.

The trainer (its ``metrics.json`` and the model card), ``recipes/evaluate.py`` and a user's own
script all run :func:`evaluate`, so the same model, data and seed give the same numbers in each.

- :data:`METRICS` names every metric once: its key in JSON files (the trainer reports
  ``eval_<key>``), the label and unit that tables and model cards show, and its reduction.
- :func:`evaluate_batch` gives one batch's per-image values; :func:`evaluate` runs it over a loader,
  gathers the values of every process and returns an :class:`Evaluation`.
- :func:`summarize` and :func:`paired_difference` turn per-image values into a mean with a 95%
  interval, and into the difference between two models on the same images.

Seeding of the consistency crops: the crop/flip of the image at position ``i`` of the evaluation
set is drawn from a generator of its own, seeded from ``(seed, i)`` (:func:`image_seed`). It
depends on nothing else (not the batch size, the number of processes, the device or the model), so
an evaluation repeats exactly, and two models are compared on the same views of the same images.

Example:
    >>> result = evaluate(model, eval_loader, accelerator, seed=42)
    >>> result.scalars()["eval_consistency"]  # what the trainer writes to metrics.json
    0.71
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .augment import CropFlip, sample_crop_flip
from .config import DEFAULT_CROP_RATIO, DEFAULT_CROP_SCALE, IGNORE_INDEX, CGCTrainingArguments
from .distributed import is_sharded
from .errors import CGCValueError
from .metrics import (
    consistency,
    content_heatmap,
    eval_mode,
    insertion_deletion,
    pointing_game,
    zero_heatmaps,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

Z95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal."""

PREFIX = "eval_"
"""The trainer's prefix of metric keys (``eval_accuracy``)."""

SAMPLES = "samples"
"""Key of the number of evaluated images among the trainer's numbers (``eval_samples``)."""


@dataclass(frozen=True)
class Metric:
    """One metric: its name everywhere, its unit and how it is reduced over images.

    Attributes:
        key: name in :func:`evaluate_batch`'s output and in JSON files; the trainer reports
            ``eval_<key>``.
        label: readable name, for tables and model cards.
        unit: unit of the reported number (``"%"``, ``"cosine"``, ``"images"``; ``""`` for none).
        reduction: ``"mean"`` over images (with a 95% interval) or ``"sum"`` (a count).
        scale: factor from a per-image value to the unit (100 turns a 0/1 hit into percent).
        digits: decimals shown in tables.
        higher_is_better: direction of improvement.
    """

    key: str
    label: str
    unit: str
    reduction: str = "mean"
    scale: float = 1.0
    digits: int = 3
    higher_is_better: bool = True

    @property
    def title(self) -> str:
        """``label (unit)``, as tables and model cards show it."""
        return f"{self.label} ({self.unit})" if self.unit else self.label


METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "Top-1 accuracy", "%", scale=100.0, digits=2),
    Metric("consistency", "Heatmap consistency", "cosine"),
    Metric("content_heatmap", "Content Heatmap", "%", digits=2),
    Metric("pointing_game", "Pointing game", "%", scale=100.0, digits=2),
    Metric("zero_heatmaps", "All-zero heatmaps", "images", "sum", digits=0, higher_is_better=False),
    Metric("insertion", "Insertion AUC", ""),
    Metric("deletion", "Deletion AUC", "", higher_is_better=False),
)
"""Every metric cgc_hf reports, in display order.

Per image: ``accuracy`` 1/0 (NaN for an unlabeled row); ``consistency`` the cosine between
``T(heatmap(x))`` and ``heatmap(T(x))``; with object masks ``content_heatmap`` (percent of the
heatmap inside the mask), ``pointing_game`` 1/0 and ``zero_heatmaps`` 1 where the heatmap is all
zero (counted, as those images score 0 on the other two, never skipped); with insertion steps
``insertion`` / ``deletion`` RISE AUCs. Content Heatmap, the pointing game and the zero count
explain the true class, the rest the predicted one.
"""

_BY_KEY = {m.key: m for m in METRICS}


def metric(key: str) -> Metric | None:
    """The :class:`Metric` of ``key`` (``"accuracy"`` or the trainer's ``"eval_accuracy"``)."""
    return _BY_KEY.get(key.removeprefix(PREFIX))


# ---------------------------------------------------------------------------------- seeding
def image_seed(seed: int, index: int) -> int:
    """Seed of the consistency transform of the image at ``index``: a hash of ``(seed, index)``.

    NumPy's ``SeedSequence`` mixes the pair, so nearby seeds and indices give unrelated streams
    (``seed * N + index`` would give seed 0's image ``N`` the crops of seed 1's image 0).
    """
    if seed < 0 or index < 0:
        raise CGCValueError(f"seed and index must be >= 0; got seed={seed}, index={index}.")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def consistency_transforms(
    seed: int,
    indices: Iterable[int],
    aspect: float = 1.0,
    scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
    flip_prob: float = 0.5,
) -> CropFlip:
    """The crop/flip of each image, drawn on the CPU from its own generator (:func:`image_seed`).

    Args:
        seed: the evaluation seed.
        indices: positions of the images in the evaluation set.
        aspect: width / height of the images.
        scale: area range of the random resized crop. The default is the paper's, for every
            model whatever crop it trained with, so that models are compared on the same views.
        ratio: aspect-ratio range of the crop.
        flip_prob: probability of a horizontal flip.

    Returns:
        A :class:`~cgc_hf.CropFlip` with one transform per index, on the CPU.
    """
    parts = [
        sample_crop_flip(
            1,
            scale,
            ratio,
            flip_prob,
            aspect,
            "cpu",
            torch.Generator().manual_seed(image_seed(seed, i)),
        )
        for i in indices
    ]
    if not parts:
        return CropFlip(torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool))
    return CropFlip(torch.cat([p.boxes for p in parts]), torch.cat([p.flip for p in parts]))


# ---------------------------------------------------------------------------------- one batch
_warned_training = False


def _explain_target(
    model: nn.Module, x: Tensor, target: Tensor, pred: Tensor, of_pred: Tensor
) -> Tensor:
    """Heatmaps of the ``target`` classes: those of the predictions where they agree, explained
    anew only for the other rows.

    Shape:
        ``x`` ``(E, 3, H, W)``; ``target``, ``pred`` ``(E,)``; ``of_pred`` and the result
        ``(E, h, w)``.
    """
    other = (target != pred).nonzero().squeeze(1)  # (K,)
    if is_sharded(model):  # FSDP: every process runs the same passes, so all rows again
        other = torch.arange(len(target), device=target.device)
    if other.numel() == 0:
        return of_pred
    heatmaps = of_pred.clone()
    heatmaps[other] = model.explain(x[other], target[other]).to(heatmaps.dtype)  # (K, h, w)
    return heatmaps


def evaluate_batch(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    transforms: CropFlip | None = None,
    generator: torch.Generator | None = None,
    insertion_steps: int = 0,
    consistency_size: int = 56,
    use_labels: bool = True,
    explain: Tensor | None = None,
    **insertion_kwargs: Any,
) -> dict[str, Tensor]:
    """Every per-image metric of one batch, keyed as in :data:`METRICS`.

    Args:
        model: a :class:`~cgc_hf.CGCModel`, normally in eval mode (it is not switched here,
            except inside :func:`~cgc_hf.insertion_deletion`).
        batch: ``pixel_values`` ``(B, 3, H, W)``; optional ``labels`` ``(B,)`` (-100 =
            unlabeled) and ``mask`` ``(B, H, W)``.
        transforms: the consistency crop/flip of each explained row; drawn from ``generator``
            otherwise.
        generator: random generator for the consistency transforms when ``transforms`` is None.
        insertion_steps: chunks of the insertion / deletion curves; 0 skips them (they cost
            ``2 * (steps + 1)`` forward passes per image).
        consistency_size: side of the grid on which consistency compares heatmaps.
        use_labels: False ignores ``labels`` (a model whose classes are not the dataset's): no
            accuracy, and the mask metrics explain the predicted class.
        explain: rows whose explanations are measured, ``(B,)`` bool; the explanation metrics
            (all but ``accuracy``) of the other rows are NaN. None: every row.
        **insertion_kwargs: passed to :func:`~cgc_hf.insertion_deletion` (``blur_sigma``...).

    Returns:
        Float32 tensors ``(B,)``: ``accuracy`` (with labels; NaN on unlabeled rows),
        ``consistency``; with a mask ``content_heatmap``, ``pointing_game``, ``zero_heatmaps``;
        with ``insertion_steps > 0`` ``insertion`` and ``deletion``.
    """
    global _warned_training
    if "pixel_values" not in batch:
        raise CGCValueError(f"batch must contain 'pixel_values'; got keys {sorted(batch)}.")
    if model.training and not _warned_training:
        logger.warning(
            "evaluate_batch: the model is in training mode, so BatchNorm statistics will change "
            "and dropout is active; call model.eval() before evaluating."
        )
        _warned_training = True
    x = batch["pixel_values"]
    labels = batch.get("labels") if use_labels else None
    with torch.no_grad():
        pred = model(x)["logits"].float().argmax(1)  # (B,)
    out: dict[str, Tensor] = {}
    target = pred
    if labels is not None:
        labels = labels.to(x.device)
        labeled = labels != IGNORE_INDEX  # (B,)
        out["accuracy"] = torch.where(labeled, (pred == labels).float(), float("nan"))
        target = torch.where(labeled, labels, pred)  # (B,) the true class where known
    masks = batch.get("mask")
    keys = ["consistency"]
    keys += ["content_heatmap", "pointing_game", "zero_heatmaps"] if masks is not None else []
    keys += ["insertion", "deletion"] if insertion_steps > 0 else []
    rows = None if explain is None else explain.to(x.device).nonzero().squeeze(1)  # (E,)
    if rows is not None and rows.numel() == x.shape[0]:
        rows = None
    if rows is not None:  # only these rows are explained; the others keep NaN
        x, pred, target = x[rows], pred[rows], target[rows]
        masks = masks[rows.to(masks.device)] if masks is not None else None
    explained: dict[str, Tensor] = {}
    if x.shape[0] > 0:
        explained["consistency"], of_pred = consistency(
            model,
            x,
            generator=generator,
            transforms=transforms,
            size=consistency_size,
            classes=pred,
            return_heatmaps=True,
        )  # (E,), (E, h, w): the heatmaps of the predicted classes
        if masks is not None:
            masks = masks.to(x.device)  # (E, H, W)
            heatmaps = _explain_target(model, x, target, pred, of_pred)  # (E, h, w)
            explained["content_heatmap"] = content_heatmap(heatmaps, masks)
            explained["pointing_game"] = pointing_game(heatmaps, masks)
            explained["zero_heatmaps"] = zero_heatmaps(heatmaps).float()
        if insertion_steps > 0:
            explained["insertion"], explained["deletion"] = insertion_deletion(
                model, x, of_pred, pred, steps=insertion_steps, **insertion_kwargs
            )
    for key in keys:
        if rows is None:
            out[key] = explained[key]
        else:  # every batch has every key, so that batches and processes gather alike
            out[key] = torch.full((len(explain),), math.nan, device=rows.device)
            if key in explained:
                out[key][rows] = explained[key].float()
    return {k: v.float() for k, v in out.items()}


# ---------------------------------------------------------------------------------- a loader
@dataclass
class Evaluation:
    """Per-image values of every metric over an evaluation set, in dataset order.

    Attributes:
        per_image: :data:`METRICS` key -> ``(N,)`` float32 values on the CPU (NaN where a
            metric does not apply to an image, such as the accuracy of an unlabeled row).
    """

    per_image: dict[str, Tensor]

    @property
    def num_images(self) -> int:
        """Images evaluated, N."""
        return next(iter(self.per_image.values())).numel() if self.per_image else 0

    def summary(self) -> dict[str, dict[str, float]]:
        """:func:`summarize` of every metric present, in :data:`METRICS` order."""
        return {
            m.key: summarize(self.per_image[m.key], m) for m in METRICS if m.key in self.per_image
        }

    def scalars(self, prefix: str = PREFIX) -> dict[str, float]:
        """One number per metric (the mean, or the count), plus the number of images.

        These are the trainer's ``eval_*`` numbers in ``metrics.json`` and the model card.
        """
        out = {
            prefix + key: s["count"] if "count" in s else s["mean"]
            for key, s in self.summary().items()
        }
        out[prefix + SAMPLES] = float(self.num_images)
        return out

    def per_image_lists(self) -> dict[str, list[float | None]]:
        """Per-image values as JSON-ready lists (None for NaN)."""
        return {
            m.key: [None if math.isnan(v) else v for v in self.per_image[m.key].tolist()]
            for m in METRICS
            if m.key in self.per_image
        }


def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    accelerator: Accelerator | None = None,
    seed: int = CGCTrainingArguments.seed,
    *,
    insertion_steps: int = 0,
    consistency_size: int = 56,
    use_labels: bool = True,
    explain_images: int | None = None,
    **insertion_kwargs: Any,
) -> Evaluation:
    """Evaluate ``model`` on every image of ``loader``, over all processes.

    The model runs in eval mode (BatchNorm running statistics, no dropout), as it is deployed;
    afterwards each submodule gets its own previous mode back, so deliberately frozen parts stay
    frozen. Under mixed precision the forward passes run in ``accelerator.autocast()``.

    Args:
        model: a :class:`~cgc_hf.CGCModel` (a prepared, wrapped one is unwrapped).
        loader: batches as :func:`evaluate_batch` takes them, in a fixed order (no shuffling);
            under several processes, a loader from ``accelerator.prepare``, so that each process
            gets its share and ``gather_for_metrics`` drops the rows it pads the last batch with.
            Without an accelerator, batches are moved to the model's device.
        accelerator: the run's ``Accelerator``; None for one process without accelerate.
        seed: seed of the consistency transforms (see the module docstring); the training
            default, so that a run's ``metrics.json`` repeats.
        insertion_steps: chunks of the insertion / deletion curves; 0 skips them.
        consistency_size: side of the grid on which consistency compares heatmaps.
        use_labels: False ignores the labels (see :func:`evaluate_batch`).
        explain_images: measure the explanation metrics (all but accuracy) on the first N
            images of the set only, the same images at every evaluation (NaN for the others);
            None: on every image. Accuracy is always measured on every image.
        **insertion_kwargs: passed to :func:`~cgc_hf.insertion_deletion`.

    Returns:
        An :class:`Evaluation`, the same on every process.
    """
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    gathered: dict[str, list[Tensor]] = {}
    seen = 0  # images of the evaluation set before this step, over all processes
    device = next(model.parameters()).device
    with eval_mode(model):
        for batch in loader:
            if accelerator is None:  # a prepared loader puts batches on the device itself
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            x = batch["pixel_values"]  # (B, 3, H, W)
            start, seen = _positions(accelerator, x.shape[0], seen)
            positions = range(start, start + x.shape[0])
            explain = None
            if explain_images is not None:
                explain = torch.tensor([p < explain_images for p in positions])  # (B,)
                positions = [p for p in positions if p < explain_images]
            transforms = None
            if len(positions) > 0:
                aspect = x.shape[-1] / x.shape[-2]
                transforms = consistency_transforms(seed, positions, aspect=aspect)
            autocast = (
                accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
            )
            with autocast:
                values = evaluate_batch(
                    model,
                    batch,
                    transforms=transforms,
                    insertion_steps=insertion_steps,
                    consistency_size=consistency_size,
                    use_labels=use_labels,
                    explain=explain,
                    **insertion_kwargs,
                )  # each (B,)
            if accelerator is not None:
                # Every process's rows, in dataset order, without the rows the sampler repeated
                # to even out the last batch: each image counts exactly once.
                values = accelerator.gather_for_metrics(values)
            for key, value in values.items():
                gathered.setdefault(key, []).append(value.detach().cpu())
    return Evaluation({k: torch.cat(v) for k, v in gathered.items()})  # each (N,)


def _positions(accelerator: Accelerator | None, rows: int, seen: int) -> tuple[int, int]:
    """Position of this process's first row in the evaluation set, and the count after the step.

    Processes' batches of one step follow each other in dataset order (that is the order
    ``gather_for_metrics`` returns), so this process starts after the rows of the lower ranks.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return seen, seen + rows
    sizes = accelerator.gather(torch.tensor([rows], device=accelerator.device)).cpu()  # (P,)
    start = seen + int(sizes[: accelerator.process_index].sum())
    return start, seen + int(sizes.sum())


# ---------------------------------------------------------------------------------- statistics
def summarize(values: Tensor, metric: Metric) -> dict[str, float]:
    """Mean, standard deviation and 95% interval of one metric over images (or its count).

    NaN entries (a metric that does not apply to an image) are left out and not counted in
    ``n``. The interval is the normal approximation ``mean +- 1.96 * std / sqrt(n)`` with the
    sample standard deviation.

    Args:
        values: per-image values, unscaled, shape ``(N,)``.
        metric: how to scale and reduce them.

    Returns:
        ``{"mean", "std", "ci95", "n"}`` in the metric's unit, or ``{"count", "n"}`` for a sum.
    """
    v = values.double()
    v = v[~torch.isnan(v)]  # (n,)
    n = v.numel()
    if metric.reduction == "sum":
        return {"count": float(v.sum()) * metric.scale, "n": n}
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "ci95": math.nan, "n": 0}
    v = v * metric.scale
    std = float(v.std()) if n > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "ci95": Z95 * std / math.sqrt(n), "n": n}


def paired_difference(a: Tensor, b: Tensor, metric: Metric) -> dict[str, float]:
    """``b - a`` on the same images: the mean difference and its 95% interval.

    Pairing removes the between-image variance that both models share, so this interval (not
    the overlap of the two models' own intervals) says whether they differ.

    Args:
        a: per-image values of the reference model, ``(N,)``.
        b: the other model's values on the same images in the same order, ``(N,)``.
        metric: how to scale and reduce them.

    Returns:
        ``{"mean", "ci95", "n"}``, or ``{"count"}`` (the difference of counts) for a sum.
    """
    if a.shape != b.shape:
        raise CGCValueError(
            f"paired values must cover the same images; got shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    if metric.reduction == "sum":
        return {"count": summarize(b, metric)["count"] - summarize(a, metric)["count"]}
    keep = ~(torch.isnan(a) | torch.isnan(b))  # (N,)
    out = summarize((b.double() - a.double())[keep], metric)
    return {k: out[k] for k in ("mean", "ci95", "n")}

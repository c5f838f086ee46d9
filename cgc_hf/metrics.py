"""Explanation-quality metrics: Content Heatmap, pointing game, insertion / deletion, consistency.

Every function returns one value per sample, shape ``(B,)``, on the inputs' device, so that a
distributed evaluation can ``accelerator.gather_for_metrics`` the values and take a plain mean.
Heatmaps are compared with masks at image resolution through :func:`heatmap_to_image_size`, the
same bilinear resize the figures in :mod:`cgc_hf.visualize` use.

Only :func:`insertion_deletion` changes the model's mode (to eval, restored afterwards); the others
run the model as it is, so call ``model.eval()`` before evaluating held-out data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import align_heatmaps, sample_crop_flip, warp
from .errors import CGCValueError
from .modeling import IGNORE_INDEX

logger = logging.getLogger(__name__)

DELETION_BASELINES = ("zeros", "blur")


# ---------------------------------------------------------------------------------- helpers
def heatmap_to_image_size(heatmaps: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize heatmaps to image resolution (bilinear, ``align_corners=False``), in float32.

    Args:
        heatmaps: ``(B, h, w)`` or a single ``(h, w)``.
        size: target ``(H, W)``.

    Returns:
        ``(B, H, W)`` (or ``(H, W)`` for a single heatmap), float32.
    """
    single = heatmaps.dim() == 2
    x = heatmaps[None] if single else heatmaps  # (B, h, w)
    if x.dim() != 3:
        raise CGCValueError(
            f"heatmaps must have shape (B, h, w) or (h, w); got {tuple(heatmaps.shape)}."
        )
    x = x.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return x[0] if single else x  # (B, H, W)


def _check_masks(heatmaps: Tensor, masks: Tensor) -> None:
    if heatmaps.dim() != 3 or masks.dim() != 3 or heatmaps.shape[0] != masks.shape[0]:
        raise CGCValueError(
            f"heatmaps must be (B, h, w) and masks (B, H, W) with the same B; got heatmaps "
            f"{tuple(heatmaps.shape)} and masks {tuple(masks.shape)}. Squeeze a channel axis "
            "of the masks if there is one."
        )


def _logits(model: nn.Module, pixel_values: Tensor) -> Tensor:
    with torch.no_grad():
        return model(pixel_values)["logits"].float()  # (B, K)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block, then restore each one's own flag.

    Restoring per module (not ``model.train(previous)``) keeps deliberately frozen parts, such as
    BatchNorm layers held in eval mode during fine-tuning, as they were.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


# ------------------------------------------------------------------------ mask-based metrics
def zero_heatmaps(heatmaps: Tensor) -> Tensor:
    """Which heatmaps have no positive value (all zero, or not finite).

    Shape:
        heatmaps ``(B, h, w)`` -> ``(B,)`` bool.
    """
    return ~(heatmaps > 0).flatten(1).any(1)  # (B,)


def content_heatmap(heatmaps: Tensor, masks: Tensor) -> Tensor:
    """Content Heatmap: percentage of each heatmap's energy that lies inside the object mask.

    Each heatmap is resized bilinearly to the mask's resolution and normalised to sum 1; the
    score is ``100 * sum(heatmap * mask)``. An all-zero heatmap scores 0 (it is counted, never
    skipped; :func:`zero_heatmaps` tells how many there were).

    Args:
        heatmaps: non-negative heatmaps ``(B, h, w)``.
        masks: object masks ``(B, H, W)``, values in {0, 1} (bool or float).

    Returns:
        Scores in [0, 100], shape ``(B,)``, float32.
    """
    _check_masks(heatmaps, masks)
    hm = heatmap_to_image_size(heatmaps, tuple(masks.shape[-2:]))  # (B, H, W)
    total = hm.sum((1, 2))  # (B,)
    inside = (hm * masks.float()).sum((1, 2))  # (B,)
    ok = total > 0
    return torch.where(ok, 100.0 * inside / torch.where(ok, total, 1.0), 0.0)  # (B,)


def pointing_game(heatmaps: Tensor, masks: Tensor) -> Tensor:
    """Pointing game: 1 where the heatmap's maximum (at image resolution) lies inside the mask.

    Ties go to the first maximum in row-major order; an all-zero heatmap points nowhere (0).

    Args:
        heatmaps: ``(B, h, w)``.
        masks: object masks ``(B, H, W)``.

    Returns:
        Hits as 0.0 / 1.0, shape ``(B,)``, float32.
    """
    _check_masks(heatmaps, masks)
    hm = heatmap_to_image_size(heatmaps, tuple(masks.shape[-2:])).flatten(1)  # (B, H*W)
    peak = hm.argmax(1, keepdim=True)  # (B, 1)
    hit = masks.flatten(1).gather(1, peak)[:, 0] > 0  # (B,)
    return (hit & ~zero_heatmaps(heatmaps)).float()


# ------------------------------------------------------------------------------ consistency
def consistency(
    model: nn.Module,
    pixel_values: Tensor,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
    size: int = 56,
    classes: Tensor | None = None,
) -> Tensor:
    """Cosine similarity between ``T(heatmap(x))`` and ``heatmap(T(x))`` under a random crop/flip.

    This is the property CGC trains for, measured on held-out images: a heatmap that moves with
    the image scores 1. Both heatmaps explain the class predicted for ``x`` and are compared on a
    ``size x size`` grid (the crop of the original heatmap is warped straight to that grid).
    A zero heatmap on either side scores 0.

    Args:
        model: a :class:`~cgc_hf.CGCModel` (anything with ``model(x)["logits"]`` and
            ``model.explain(x, classes)``), run in its current mode.
        pixel_values: normalised images ``(B, 3, H, W)``.
        generator: random generator for the transforms, for a reproducible metric. It may live
            on the CPU while the images are on an accelerator.
        scale: area range of the random resized crop.
        ratio: aspect-ratio range of the crop.
        flip_prob: probability of a horizontal flip.
        size: side of the comparison grid.
        classes: class to explain per row ``(B,)``; the prediction on ``x`` when omitted.

    Returns:
        Cosines in [0, 1], shape ``(B,)``, float32.
    """
    b, _, h, w = pixel_values.shape
    if classes is None:
        classes = _logits(model, pixel_values).argmax(1)  # (B,)
    sample_device = generator.device if generator is not None else pixel_values.device
    geometry = sample_crop_flip(b, scale, ratio, flip_prob, w / h, sample_device, generator)
    geometry = geometry.to(pixel_values.device)
    x_aug = warp(pixel_values, geometry)  # (B, 3, H, W)
    classes = classes.to(pixel_values.device)
    # One explain call over both views: a single forward/backward instead of two.
    cams = model.explain(torch.cat([pixel_values, x_aug]), torch.cat([classes, classes]))
    cam, cam_aug = cams.float().split(b)  # (B, h', w') each
    pos, aug = align_heatmaps(cam, cam_aug, geometry, size)  # (B, S, S) each, as the loss
    return F.cosine_similarity(pos.flatten(1), aug.flatten(1), dim=1, eps=1e-12)  # (B,)


# ------------------------------------------------------------------------ insertion/deletion
def gaussian_blur(images: Tensor, sigma: float, kernel_size: int | None = None) -> Tensor:
    """Separable Gaussian blur with replicate padding, batched, on the images' device.

    Args:
        images: ``(B, C, H, W)``.
        sigma: standard deviation in pixels (> 0).
        kernel_size: odd kernel side; ``2 * ceil(3 * sigma) + 1`` when omitted.

    Returns:
        Blurred images, same shape and dtype.
    """
    if not sigma > 0:
        raise CGCValueError(f"blur_sigma must be > 0; got {sigma}.")
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise CGCValueError(f"blur_kernel must be a positive odd integer; got {kernel_size}.")
    c = images.shape[1]
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, device=images.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(images.dtype)  # (K,)
    x = F.pad(images, (r, r, r, r), mode="replicate")  # (B, C, H+2r, W+2r)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # (B, C, H+2r, W)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # (B, C, H, W)


def insertion_deletion(
    model: nn.Module,
    pixel_values: Tensor,
    heatmaps: Tensor,
    classes: Tensor,
    steps: int = 16,
    blur_sigma: float = 5.0,
    blur_kernel: int | None = 11,
    deletion_baseline: str = "zeros",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """RISE-style insertion and deletion AUCs (Petsiuk et al., BMVC 2018).

    Pixels are ranked by the heatmap (resized to image size, hottest first) and processed in
    ``steps`` equal chunks. Insertion starts from a blurred copy of the image and puts original
    pixels back; deletion starts from the image and replaces pixels by the baseline. After each
    chunk the softmax probability of ``classes`` is recorded; the AUC is the trapezoid rule over
    the fraction of pixels in [0, 1]. A good explanation has high insertion, low deletion AUC.

    All ``B * (steps + 1)`` images of a curve go through the model in chunks of ``chunk_size``.
    The model runs in eval mode (BatchNorm statistics untouched) and every submodule's previous
    mode is restored afterwards.

    Args:
        model: anything with ``model(x)["logits"]``, e.g. a :class:`~cgc_hf.CGCModel`.
        pixel_values: normalised images ``(B, 3, H, W)``.
        heatmaps: ``(B, h, w)``; the pixel order comes from them.
        classes: class whose probability is tracked, ``(B,)``.
        steps: number of chunks (curve points are ``steps + 1``, including both ends).
        blur_sigma: Gaussian sigma (pixels) of the insertion start image (RISE: 5).
        blur_kernel: odd kernel side (RISE: 11); ``None`` -> ``2 * ceil(3 * sigma) + 1``.
        deletion_baseline: ``"zeros"`` (0 in normalised space, i.e. the dataset mean colour)
            or ``"blur"`` (the blurred image).
        chunk_size: images per model call; ``B`` when omitted.

    Returns:
        ``(insertion_auc, deletion_auc)``, each ``(B,)`` in [0, 1], float32.
    """
    b, _, h, w = pixel_values.shape
    if steps < 1:
        raise CGCValueError(f"steps must be >= 1; got {steps}.")
    if deletion_baseline not in DELETION_BASELINES:
        raise CGCValueError(
            f"deletion_baseline must be one of {DELETION_BASELINES}; got {deletion_baseline!r}."
        )
    if heatmaps.dim() != 3 or heatmaps.shape[0] != b or classes.shape != (b,):
        raise CGCValueError(
            f"heatmaps must be (B, h, w) and classes (B,) with B={b} as in pixel_values; got "
            f"heatmaps {tuple(heatmaps.shape)} and classes {tuple(classes.shape)}."
        )
    chunk_size = chunk_size or b
    hw = h * w
    order = heatmap_to_image_size(heatmaps, (h, w)).flatten(1)  # (B, H*W)
    order = order.to(pixel_values.device).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(hw, device=order.device).expand(b, hw))  # (B, H*W)
    counts = torch.div(
        torch.arange(steps + 1, device=rank.device) * hw, steps, rounding_mode="floor"
    )
    blurred = gaussian_blur(pixel_values, blur_sigma, blur_kernel)  # (B, 3, H, W)
    baseline = torch.zeros_like(pixel_values) if deletion_baseline == "zeros" else blurred
    classes = classes.to(pixel_values.device)
    with eval_mode(model), torch.no_grad():
        ins = _curve(model, blurred, pixel_values, rank, counts, classes, chunk_size)  # (B, S+1)
        dele = _curve(model, pixel_values, baseline, rank, counts, classes, chunk_size)
    fraction = counts.float() / hw  # (S+1,)
    return torch.trapezoid(ins, fraction, dim=1), torch.trapezoid(dele, fraction, dim=1)


def _curve(
    model: nn.Module,
    start: Tensor,
    end: Tensor,
    rank: Tensor,
    counts: Tensor,
    classes: Tensor,
    chunk_size: int,
) -> Tensor:
    """Probability of ``classes`` as pixels switch from ``start`` to ``end`` in rank order.

    Shape:
        start, end ``(B, 3, H, W)``; rank ``(B, H*W)``; counts ``(S+1,)`` -> ``(B, S+1)``.
    """
    b, _, h, w = start.shape
    n = counts.numel()
    row = torch.arange(b, device=start.device).repeat_interleave(n)  # (B*(S+1),) sample index
    step = torch.arange(n, device=start.device).repeat(b)  # (B*(S+1),) step index
    probs = []
    for i in range(0, b * n, chunk_size):
        r, s = row[i : i + chunk_size], step[i : i + chunk_size]
        switched = rank[r] < counts[s][:, None]  # (N, H*W) the first counts[s] pixels in order
        m = switched.view(-1, 1, h, w).to(start.dtype)  # (N, 1, H, W)
        images = start[r] * (1 - m) + end[r] * m  # (N, 3, H, W)
        p = model(images)["logits"].float().softmax(1)  # (N, K)
        probs.append(p.gather(1, classes[r][:, None])[:, 0])  # (N,)
    return torch.cat(probs).view(b, n)  # (B, S+1)


# --------------------------------------------------------------------------------- one batch
_warned_training = False


def evaluate_batch(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    generator: torch.Generator | None = None,
    insertion_steps: int = 0,
    consistency_size: int = 56,
    **insertion_kwargs: Any,
) -> dict[str, Tensor]:
    """All per-sample metrics for one evaluation batch, ready for ``gather_for_metrics``.

    Content Heatmap and the pointing game explain the ground-truth class (DESIGN 1.3; the
    predicted class for rows without a label); consistency and insertion / deletion explain the
    predicted class.

    Args:
        model: a :class:`~cgc_hf.CGCModel`, normally in eval mode (it is not switched here,
            except inside :func:`insertion_deletion`).
        batch: ``pixel_values`` ``(B, 3, H, W)``; optional ``labels`` ``(B,)`` (-100 =
            unlabeled) and ``mask`` ``(B, H, W)``.
        generator: random generator for the consistency transforms.
        insertion_steps: chunks of the insertion / deletion curves; 0 skips them (they cost
            ``2 * (steps + 1)`` forward passes per image).
        consistency_size: side of the grid on which consistency compares heatmaps.
        **insertion_kwargs: passed to :func:`insertion_deletion` (``blur_sigma``...).

    Returns:
        Float tensors ``(B,)``: ``correct`` (when labels are given; NaN on unlabeled rows),
        ``consistency``; with a mask ``content_heatmap``, ``pointing_game``, ``zero_heatmap``
        (1.0 where the heatmap is all zero); with ``insertion_steps > 0`` ``insertion``,
        ``deletion``.
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
    labels = batch.get("labels")
    pred = _logits(model, x).argmax(1)  # (B,)
    out: dict[str, Tensor] = {}
    target = pred
    if labels is not None:
        labels = labels.to(x.device)
        labeled = labels != IGNORE_INDEX
        out["correct"] = torch.where(labeled, (pred == labels).float(), float("nan"))
        target = torch.where(labeled, labels, pred)
    out["consistency"] = consistency(
        model, x, generator=generator, size=consistency_size, classes=pred
    )
    if batch.get("mask") is not None:
        masks = batch["mask"].to(x.device)
        heatmaps = model.explain(x, target)  # (B, h, w)
        out["content_heatmap"] = content_heatmap(heatmaps, masks)
        out["pointing_game"] = pointing_game(heatmaps, masks)
        out["zero_heatmap"] = zero_heatmaps(heatmaps).float()
    if insertion_steps > 0:
        heatmaps = model.explain(x, pred)  # (B, h, w)
        out["insertion"], out["deletion"] = insertion_deletion(
            model, x, heatmaps, pred, steps=insertion_steps, **insertion_kwargs
        )
    return out

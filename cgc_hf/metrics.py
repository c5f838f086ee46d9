"""Explanation-quality metrics: Content Heatmap, pointing game, insertion / deletion, consistency.

Every function returns one value per sample, shape ``(B,)``, on the inputs' device, so that a
distributed evaluation can ``accelerator.gather_for_metrics`` the values and take a plain mean.
Heatmaps are compared with masks at image resolution through :func:`heatmap_to_image_size`, the
same bilinear resize the figures in :mod:`cgc_hf.visualize` use.

Only :func:`insertion_deletion` changes the model's mode (to eval, restored afterwards); the others
run the model as it is, so call ``model.eval()`` before evaluating held-out data.
:mod:`cgc_hf.evaluation` runs them all over a data loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import CropFlip, align_heatmaps, sample_crop_flip, warp
from .config import DEFAULT_CROP_RATIO, DEFAULT_CROP_SCALE
from .errors import CGCValueError

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
    transforms: CropFlip | None = None,
    scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
    flip_prob: float = 0.5,
    size: int = 56,
    classes: Tensor | None = None,
    return_heatmaps: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
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
        transforms: the crop/flip per row, instead of drawing them (``scale``, ``ratio``,
            ``flip_prob`` and ``generator`` are then unused); :func:`cgc_hf.evaluation.evaluate`
            passes transforms seeded per image.
        scale: area range of the random resized crop.
        ratio: aspect-ratio range of the crop.
        flip_prob: probability of a horizontal flip.
        size: side of the comparison grid.
        classes: class to explain per row ``(B,)``; the prediction on ``x`` when omitted.
        return_heatmaps: also return the heatmaps of ``x`` that the cosines compare, so that
            other metrics of the same class need no second explain pass.

    Returns:
        Cosines in [0, 1], shape ``(B,)``, float32; with ``return_heatmaps`` also the heatmaps
        ``(B, h', w')`` (float32) of ``x``.
    """
    b, _, h, w = pixel_values.shape
    if classes is None:
        classes = _logits(model, pixel_values).argmax(1)  # (B,)
    if transforms is None:
        sample_device = generator.device if generator is not None else pixel_values.device
        transforms = sample_crop_flip(b, scale, ratio, flip_prob, w / h, sample_device, generator)
    elif len(transforms) != b:
        raise CGCValueError(
            f"transforms must hold one crop/flip per image; got {len(transforms)} for {b} images."
        )
    geometry = transforms.to(pixel_values.device)
    x_aug = warp(pixel_values, geometry)  # (B, 3, H, W)
    classes = classes.to(pixel_values.device)
    # One explain call over both views: a single forward/backward instead of two.
    cams = model.explain(torch.cat([pixel_values, x_aug]), torch.cat([classes, classes]))
    cam, cam_aug = cams.float().split(b)  # (B, h', w') each
    pos, aug = align_heatmaps(cam, cam_aug, geometry, size)  # (B, S, S) each, as the loss
    cosines = F.cosine_similarity(pos.flatten(1), aug.flatten(1), dim=1, eps=1e-12)  # (B,)
    return (cosines, cam) if return_heatmaps else cosines


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

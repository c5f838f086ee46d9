"""Geometry of the CGC view: per-sample random resized crop + horizontal flip, recorded as data.

The transform T is stored as boxes and flip flags. One affine sampling grid per sample then warps
images and heatmaps of any resolution with exactly the same T, batched and on-device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class CropFlip:
    """A batch of crop-and-flip transforms, in normalised image coordinates.

    Attributes:
        boxes: crop boxes ``(x0, y0, x1, y1)`` with 0 <= x0 < x1 <= 1 (fractions of width and
            height). Shape: ``(B, 4)``.
        flip: whether the crop is mirrored left-right after cropping. Shape: ``(B,)``, bool.
    """

    boxes: Tensor
    flip: Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def to(self, device: torch.device | str) -> CropFlip:
        return CropFlip(self.boxes.to(device), self.flip.to(device))

    def theta(self) -> Tensor:
        """Affine matrices for :func:`torch.nn.functional.affine_grid` (output -> input).

        Shape:
            ``(B, 2, 3)``
        """
        boxes = self.boxes if self.boxes.is_floating_point() else self.boxes.float()
        x0, y0, x1, y1 = boxes.unbind(1)  # each (B,)
        sign = 1.0 - 2.0 * self.flip.to(boxes.dtype)  # (B,) -1 mirrors the output horizontally
        theta = boxes.new_zeros(len(self), 2, 3)
        theta[:, 0, 0] = (x1 - x0) * sign
        theta[:, 0, 2] = x0 + x1 - 1.0  # crop centre in [-1, 1]
        theta[:, 1, 1] = y1 - y0
        theta[:, 1, 2] = y0 + y1 - 1.0
        return theta


def sample_crop_flip(
    batch_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
    aspect: float = 1.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> CropFlip:
    """Sample random-resized-crop boxes and flip flags, one per sample, vectorised.

    Follows the usual RandomResizedCrop rule: area fraction ~ U(scale), log aspect ratio
    ~ U(log ratio); up to ``attempts`` tries per sample, else the largest centred crop whose
    ratio is clamped to ``ratio``.

    Args:
        batch_size: number of transforms B.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop's width / height, in pixels.
        flip_prob: probability that a sample is mirrored.
        aspect: width / height of the images the boxes will be applied to.
        device: where the returned tensors live.
        generator: optional random generator (on ``device``) for reproducible draws.
        attempts: tries per sample before the fallback crop.

    Returns:
        A :class:`CropFlip` of length ``batch_size``.
    """
    kw = {"device": device, "generator": generator}
    area = torch.empty(batch_size, attempts, device=device).uniform_(*scale, generator=generator)
    log_r = torch.empty(batch_size, attempts, device=device).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    r = torch.exp(log_r)  # (B, K) width / height in pixels
    w = torch.sqrt(area * r / aspect)  # (B, K) fraction of image width
    h = torch.sqrt(area / r * aspect)  # (B, K) fraction of image height
    ok = (w <= 1) & (h <= 1)  # (B, K)
    first = torch.where(
        ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], -1, dtype=torch.long)
    )
    # Fallback: the whole image trimmed to the allowed ratio range (as RandomResizedCrop does).
    fr = min(max(aspect, ratio[0]), ratio[1])
    fw, fh = (1.0, aspect / fr) if fr > aspect else (fr / aspect, 1.0)
    idx = first.clamp(min=0)[:, None]  # (B, 1)
    w = torch.where(first >= 0, w.gather(1, idx)[:, 0], torch.full_like(w[:, 0], fw))  # (B,)
    h = torch.where(first >= 0, h.gather(1, idx)[:, 0], torch.full_like(h[:, 0], fh))  # (B,)
    u = torch.rand(batch_size, 2, **kw)  # (B, 2) position of the box inside the free margin
    x0 = u[:, 0] * (1 - w)
    y0 = u[:, 1] * (1 - h)
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], dim=1)  # (B, 4)
    flip = torch.rand(batch_size, **kw) < flip_prob  # (B,)
    return CropFlip(boxes, flip)


def _axis_weights(lo: Tensor, hi: Tensor, flip: Tensor, n_in: int, n_out: int) -> Tensor:
    """Bilinear weights of one axis of the crop ``[lo, hi]``, as ``grid_sample`` applies them.

    Output sample ``j`` sits at normalised ``o = (2 j + 1) / n_out - 1``, reads the source at
    ``p = ((g + 1) n_in - 1) / 2`` with ``g = (hi - lo) o + lo + hi - 1`` (``-(hi - lo) o`` when
    mirrored), clamped to ``[0, n_in - 1]`` (border padding, ``align_corners=False``), and mixes
    the two nearest source samples. The identity box ``[0, 1]`` gives ``F.interpolate``'s
    bilinear resize (``align_corners=False``).

    Shape:
        lo, hi, flip ``(B,)`` -> ``(B, n_out, n_in)``
    """
    o = (2 * torch.arange(n_out, device=lo.device, dtype=lo.dtype) + 1) / n_out - 1  # (n_out,)
    sign = 1.0 - 2.0 * flip.to(lo.dtype)  # (B,)
    g = ((hi - lo) * sign)[:, None] * o + (lo + hi - 1)[:, None]  # (B, n_out)
    p = (((g + 1) * n_in - 1) / 2).clamp(0, n_in - 1)  # (B, n_out) source coordinate
    i0 = p.floor()
    w1 = p - i0  # (B, n_out) weight of the upper neighbour
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=n_in - 1)  # its weight is 0 wherever the clamp changes it
    cols = torch.arange(n_in, device=lo.device)  # (n_in,)
    return (1 - w1)[..., None] * (i0[..., None] == cols) + w1[..., None] * (i1[..., None] == cols)


def _warp_separable(x: Tensor, t: CropFlip, size: tuple[int, int]) -> Tensor:
    """``grid_sample``'s crop-and-flip as two matrix products (a crop box is separable).

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H', W')``
    """
    boxes = t.boxes.to(device=x.device, dtype=x.dtype)
    x0, y0, x1, y1 = boxes.unbind(1)  # each (B,)
    no_flip = torch.zeros_like(x0, dtype=torch.bool)
    rows = _axis_weights(y0, y1, no_flip, x.shape[-2], size[0])  # (B, H', H)
    cols = _axis_weights(x0, x1, t.flip.to(x.device), x.shape[-1], size[1])  # (B, W', W)
    return rows[:, None] @ x @ cols[:, None].transpose(-1, -2)  # (B, C, H', W')


def warp(x: Tensor, t: CropFlip, size: tuple[int, int] | int | None = None) -> Tensor:
    """Apply crop-and-flip ``t`` to images or heatmaps, resizing each crop to ``size``.

    The same ``t`` gives geometrically identical results at any input resolution, so an image
    and its heatmap (at layer resolution) are warped consistently. Bilinear, border padding.

    A tensor that requires a gradient (a heatmap in training) is warped by two matrix products
    with the same bilinear weights: on CUDA the backward of ``grid_sample`` adds with atomics, so
    its gradient changes from run to run, while a matrix product's does not. Other tensors (the
    images) go through ``grid_sample``, which costs less at image size; both agree to rounding.

    Args:
        x: images ``(B, C, H, W)`` or heatmaps ``(B, H, W)``.
        t: one transform per sample.
        size: output ``(H', W')`` or side; defaults to the input size.

    Returns:
        Warped tensor, shape ``(B, C, H', W')`` or ``(B, H', W')`` like the input.
    """
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(1)  # (B, 1, H, W)
    if size is None:
        size = tuple(x.shape[-2:])
    elif isinstance(size, int):
        size = (size, size)
    if x.requires_grad and x.is_floating_point():
        out = _warp_separable(x, t, tuple(size))
    else:
        dtype = x.dtype if x.is_floating_point() else torch.float32
        theta = t.theta().to(device=x.device, dtype=dtype)
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], *size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(1) if squeeze else out


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of heatmaps ``(B, H, W)`` -> ``(B, *size)``.

    ``F.interpolate``, except for a tensor that requires a gradient, which is resized by the
    deterministic matrix products of :func:`warp` with the whole image as the box (its backward
    on CUDA adds with atomics too).
    """
    if not x.requires_grad:
        return F.interpolate(x[:, None], size, mode="bilinear", align_corners=False)[:, 0]
    b = x.shape[0]
    whole = CropFlip(
        x.new_tensor([[0.0, 0.0, 1.0, 1.0]]).expand(b, 4), torch.zeros(b, dtype=torch.bool)
    )
    return warp(x, whole, size)


def align_heatmaps(
    heatmaps: Tensor, heatmaps_aug: Tensor, t: CropFlip, size: int | tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Put ``T(heatmap(x))`` and ``heatmap(T(x))`` on one comparison grid.

    The original view's heatmap is warped by ``t`` straight to ``size``; the augmented view's is
    resized to it (bilinear). The CGC loss and the consistency metric both compare this pair.

    Args:
        heatmaps: heatmaps of the original images, ``(B, h, w)``.
        heatmaps_aug: heatmaps of ``warp(images, t)``, ``(B, h, w)``.
        t: the crop/flip that made the augmented view.
        size: side or ``(H, W)`` of the comparison grid.

    Returns:
        ``(positive, augmented)``, each ``(B, H, W)``.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    pos = warp(heatmaps, t.to(heatmaps.device), size)  # (B, H, W) T(heatmap(x))
    aug = resize(heatmaps_aug, size)  # (B, H, W)
    return pos, aug  # (B, H, W) each

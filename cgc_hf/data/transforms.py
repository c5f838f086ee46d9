"""Transforms taken from the model's own data config: size, crop, interpolation, mean and std.

Example:
    >>> tf = build_transform(model.config.data_config, train=True)
    >>> pixel_values, mask = tf(image, tv_tensors.Mask(mask))  # the same geometry for both
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..config import DEFAULT_CROP_RATIO, DEFAULT_CROP_SCALE
from ..errors import DataError

logger = logging.getLogger(__name__)


def build_transform(
    data_config: dict[str, Any],
    train: bool,
    *,
    scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
    hflip: float = 0.5,
):
    """Image (+ mask) transform from the model's own data config.

    Train: random resized crop to ``input_size`` and horizontal flip (standard fine-tuning
    augmentation). Eval: resize to ``input_size / crop_pct`` (shorter side for square inputs)
    and center crop. Then scale to [0, 1] and normalise with the config's mean and std.
    Geometry is applied identically to a ``tv_tensors.Mask`` passed alongside (nearest
    interpolation); normalisation is not.

    Args:
        data_config: ``CGCModel.config.data_config``: ``input_size`` (3, H, W), ``mean``,
            ``std``; optional ``interpolation`` (default bilinear), ``crop_pct`` (default 1),
            ``crop_mode`` (``"center"`` or ``"squash"``).
        train: training (random) or evaluation (deterministic) transform.
        scale: area range of the random resized crop.
        ratio: aspect-ratio range of the random resized crop.
        hflip: probability of a horizontal flip.

    Returns:
        A ``torchvision.transforms.v2`` transform: ``tf(image)`` or ``tf(image, mask)``.

    Shape:
        image: PIL or (3, h, w) -> (3, H, W) float; mask: (1, h, w) -> (1, H, W), same dtype.
    """
    from torchvision.transforms import v2

    missing = [k for k in ("input_size", "mean", "std") if k not in data_config]
    if missing:
        raise DataError(
            f"data_config lacks {missing}; pass CGCModel.config.data_config (it holds "
            f"input_size, mean, std). Got keys {sorted(data_config)}."
        )
    scale, ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise DataError(
            f"scale (--train_crop_scale) must be two numbers 0 < min <= max <= 1, as fractions "
            f"of the image area, e.g. (0.08, 1.0); got {scale!r}."
        )
    if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
        raise DataError(
            f"ratio must be two numbers 0 < min <= max, e.g. (0.75, 1.333); got {ratio!r}."
        )
    h, w = (int(v) for v in tuple(data_config["input_size"])[-2:])
    mean = [float(v) for v in data_config["mean"]]
    std = [float(v) for v in data_config["std"]]
    interp_name = str(data_config.get("interpolation") or "bilinear")
    try:
        interp = v2.InterpolationMode(interp_name)
    except ValueError:
        # timm's "random" picks bilinear or bicubic per call; bilinear keeps runs reproducible.
        logger.info("interpolation %r is not a single mode; using bilinear.", interp_name)
        interp = v2.InterpolationMode.BILINEAR
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    if train:
        geometry = [
            v2.RandomResizedCrop((h, w), scale=scale, ratio=ratio, interpolation=interp),
            v2.RandomHorizontalFlip(hflip),
        ]
    else:
        scaled = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        square_center = h == w and data_config.get("crop_mode", "center") != "squash"
        geometry = [
            v2.Resize(scaled[0] if square_center else scaled, interpolation=interp),
            v2.CenterCrop((h, w)),
        ]
    return v2.Compose(
        [
            v2.ToImage(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )

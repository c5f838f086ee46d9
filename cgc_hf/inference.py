"""Predictions and Grad-CAM overlays for image files or PIL images, preprocessed as saved."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .data import build_transform, to_rgb
from .errors import CGCValueError
from .visualize import denormalize, overlay

if TYPE_CHECKING:
    from .modeling import CGCModel

ImageLike = str | os.PathLike | Image.Image


@dataclass
class Explanation:
    """The prediction and heatmap of one image.

    Attributes:
        label: class name (``id2label``), or the index as text when the model has no names.
        class_index: the explained class.
        score: softmax probability of that class.
        heatmap: Grad-CAM at the model's input size, ``(H, W)``, non-negative.
        image: the preprocessed view the model saw, ``(H, W, 3)`` uint8 (resized, cropped).
        overlay: ``image`` with the heatmap blended over it, ``(H, W, 3)`` uint8.
    """

    label: str
    class_index: int
    score: float
    heatmap: Tensor
    image: np.ndarray
    overlay: np.ndarray

    def save_overlay(self, path: str | os.PathLike) -> Path:
        """Write :attr:`overlay` as an image file (format from the suffix, e.g. ``.png``)."""
        Image.fromarray(self.overlay).save(path)
        return Path(path)


def explain_images(
    model: CGCModel,
    images: ImageLike | Sequence[ImageLike],
    classes: Sequence[int] | None = None,
    batch_size: int = 16,
    alpha: float = 0.5,
) -> list[Explanation]:
    """Classify and explain images with the preprocessing saved in ``model.config.data_config``.

    Images are resized and centre-cropped as the evaluation transform does (input size, crop,
    interpolation, mean and std of the backbone), classified in eval mode, and explained with
    Grad-CAM for the predicted class (or ``classes``). The model's train/eval mode is restored.

    Args:
        model: a :class:`~cgc_hf.CGCModel` (trained, loaded, or wrapping any classifier).
        images: one image or a list; file paths or PIL images (any mode; converted to RGB).
        classes: class to explain per image; the predicted class when omitted.
        batch_size: images per forward pass.
        alpha: weight of the heatmap colour in the overlay.

    Returns:
        One :class:`Explanation` per image, in order.

    Example:
        >>> (result,) = explain_images(model, "cat.jpg")
        >>> result.label, round(result.score, 2)
        ('cat', 0.93)
        >>> result.save_overlay("cat_gradcam.png")
    """
    items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
    if not items:
        raise CGCValueError("images must name at least one image file or PIL image; got none.")
    if classes is not None and len(classes) != len(items):
        raise CGCValueError(
            f"classes must give one class per image ({len(items)}); got {len(classes)}."
        )
    data_config = model.config.data_config
    transform = build_transform(data_config, train=False)
    device = next(model.parameters()).device
    id2label = model.config.id2label or {}
    was_training = model.training
    model.eval()
    results: list[Explanation] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            x = torch.stack([transform(_open(item)) for item in chunk]).to(device)  # (B, 3, H, W)
            with torch.no_grad():
                probs = model(x)["logits"].float().softmax(1)  # (B, K)
            if classes is None:
                chosen = probs.argmax(1)  # (B,)
            else:
                chosen = torch.as_tensor(list(classes[start : start + batch_size]), device=device)
            heatmaps = model.explain(x, chosen, size=tuple(x.shape[-2:]))  # (B, H, W)
            views = denormalize(x.cpu(), data_config["mean"], data_config["std"])  # (B, 3, H, W)
            for i, k in enumerate(chosen.tolist()):
                view = views[i].clamp(0, 1)
                results.append(
                    Explanation(
                        label=str(id2label.get(k, k)),
                        class_index=int(k),
                        score=float(probs[i, k]),
                        heatmap=heatmaps[i].cpu(),
                        image=np.rint(view.permute(1, 2, 0).numpy() * 255).astype(np.uint8),
                        overlay=overlay(view, heatmaps[i].cpu(), alpha=alpha),
                    )
                )
    finally:
        model.train(was_training)
    return results


def _open(item: ImageLike) -> Image.Image:
    if isinstance(item, Image.Image):
        return to_rgb(item)
    path = Path(item).expanduser()
    if not path.is_file():
        raise CGCValueError(f"images: {str(item)!r} is not an image file.")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except OSError as err:
        raise CGCValueError(f"images: cannot read {str(item)!r} as an image ({err}).") from None

"""Images as colour-cluster token ids, for transformers classifiers that read no pixels (ImageGPT).

ImageGPT reads one token per pixel: the index of the nearest of its colour clusters, which its
image processor (``ImageGPTImageProcessor``) holds, not the model. cgc_hf feeds every backbone
``(B, 3, H, W)`` pixels normalised like that processor (to ``[-1, 1]``), so the adapter keeps the
clusters with the model (an attribute, recorded in the saved backbone description) and maps
pixels to ids in ``logits``. The ids are not differentiable in the pixels; CGC needs no
pixel gradient: its heatmap lives on the token grid of a transformer layer (one token per pixel,
row-major), and its gradient reaches the weights from the token embedding on.

Example:
    >>> processor = ImageGPTImageProcessor.from_pretrained("openai/imagegpt-small")
    >>> model = ImageGPTForImageClassification.from_pretrained("openai/imagegpt-small")
    >>> attach_clusters(model, processor.clusters)
    >>> color_tokens(torch.rand(2, 3, 32, 32) * 2 - 1, clusters_of(model)).shape
    torch.Size([2, 1024])
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CGCValueError

CLUSTERS_KEY = "color_clusters"
"""Key of the clusters in the saved backbone description (and the buffer's name)."""


def reads_color_tokens(model: nn.Module) -> bool:
    """Whether ``model`` is an image classifier that reads token ids and no pixels (ImageGPT; a
    vision-language model such as ShieldGemma 2 reads both)."""
    if getattr(model, "main_input_name", None) != "input_ids":
        return False
    return "pixel_values" not in inspect.signature(model.forward).parameters


def token_side(model: nn.Module) -> int:
    """Side of the square image whose pixels fill the model's positions (ImageGPT: 32)."""
    return math.isqrt(int(model.config.n_positions))


def clusters_of(model: nn.Module) -> Tensor | None:
    """The colour clusters attached to ``model``, ``(K, 3)``, or ``None``."""
    clusters = getattr(model, CLUSTERS_KEY, None)
    return clusters if isinstance(clusters, Tensor) else None


def attach_clusters(model: nn.Module, clusters: Any) -> None:
    """Keep ``clusters`` (``(K, 3)``, in ``[-1, 1]``) with ``model`` for :func:`color_tokens`.

    A plain float32 attribute, not a buffer: it stays out of the state dict, so the weights
    (and ``save_pretrained``'s files) are the model's own, and ``model.half()`` cannot round
    it (which would change the ids); :func:`color_tokens` moves it to the pixels' device.

    Raises:
        CGCValueError: ``clusters`` is not ``(K, 3)`` with fewer than ``vocab_size`` rows.
    """
    t = torch.as_tensor(clusters, dtype=torch.float32)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if t.ndim != 2 or t.shape[1] != 3 or not 0 < t.shape[0] < max(vocab, 1):
        raise CGCValueError(
            f"image_processor clusters must be (K, 3) colour clusters with K below the model's "
            f"vocab_size ({vocab}); got shape {tuple(t.shape)}. Pass the ImageGPTImageProcessor "
            "saved with the model."
        )
    setattr(model, CLUSTERS_KEY, t)


def clusters_from_processor(processor: Any) -> Tensor | None:
    """The ``clusters`` of a transformers image processor (``None`` when it has none)."""
    clusters = getattr(processor, "clusters", None)
    return None if clusters is None else torch.as_tensor(clusters, dtype=torch.float32)


def missing_clusters_error(model: nn.Module) -> CGCValueError:
    return CGCValueError(
        f"{type(model).__name__} reads colour-cluster ids, and no clusters came with it: pass "
        "image_processor=ImageGPTImageProcessor.from_pretrained(<its Hub id or folder>) to "
        "CGCModel.from_backbone, or build it from a Hub id / folder that holds its processor."
    )


def color_tokens(pixel_values: Tensor, clusters: Tensor) -> Tensor:
    """The index of each pixel's nearest cluster (squared Euclidean distance), as
    ``ImageGPTImageProcessor`` computes it, in row-major pixel order.

    Shape:
        pixel_values: ``(B, 3, H, W)`` in the clusters' range (``[-1, 1]``);
        clusters: ``(K, 3)`` -> ``(B, H * W)`` int64.
    """
    b = pixel_values.shape[0]
    pixels = pixel_values.detach().float().permute(0, 2, 3, 1).reshape(-1, 3)  # (B*H*W, 3)
    clusters = clusters.to(pixels.device, torch.float32)
    # the processor's own expansion of |p - c|^2, so that near-ties fall the same way
    distance = (
        pixels.square().sum(1)[:, None] - 2 * (pixels @ clusters.T) + clusters.square().sum(1)[None]
    )  # (B*H*W, K)
    return distance.argmin(1).reshape(b, -1)


def processor_with_clusters(clusters: Tensor, size: tuple[int, int]) -> Any:
    """An ``ImageGPTImageProcessor`` with ``clusters`` that resizes to ``size`` (for export)."""
    from transformers import ImageGPTImageProcessor

    h, w = size
    return ImageGPTImageProcessor(clusters=clusters.cpu(), size={"height": h, "width": w})


def default_processor() -> Any:
    """ImageGPT's preprocessing without clusters: its mean, std and resampling."""
    from transformers import ImageGPTImageProcessor

    return ImageGPTImageProcessor()

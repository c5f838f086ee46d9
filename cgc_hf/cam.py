"""Differentiable Grad-CAM heatmaps from target-layer activations and class scores.

Shape conventions: activations are ``(B, C, h, w)`` (see :mod:`cgc_hf.targets` for the layout
conversion); heatmaps are ``(B, h, w)`` and non-negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import CAM_METHODS
from .errors import CGCValueError


def combine(activations: Tensor, grads: Tensor, method: str = "grad_x_act") -> Tensor:
    """Turn activations and their gradients into a heatmap.

    Args:
        activations: ``A``, shape ``(B, C, h, w)``.
        grads: ``dscore/dA``, shape ``(B, C, h, w)``.
        method: ``"grad_x_act"``: ``relu(sum_c g * A)`` (the paper's, HiResCAM-like);
            ``"gradcam"``: ``relu(sum_c mean_hw(g) * A)`` (Selvaraju et al.).

    Returns:
        Heatmaps, shape ``(B, h, w)``.
    """
    if method == "grad_x_act":
        cam = (grads * activations).sum(1)  # (B, h, w)
    elif method == "gradcam":
        cam = (grads.mean((2, 3), keepdim=True) * activations).sum(1)  # (B, h, w)
    else:
        raise CGCValueError(f"method must be one of {CAM_METHODS}; got {method!r}.")
    return torch.relu(cam)


def linear_head_cam(activations: Tensor, weight: Tensor, classes: Tensor) -> Tensor:
    """Exact heatmap of a global-average-pool + linear head (CAM, Zhou et al. 2016).

    For ``score_k = W[k] . mean_hw(A) + b[k]`` the gradient is ``W[k] / (h w)`` at every
    position, so both Grad-CAM flavours equal ``relu(sum_c W[k, c] A[c]) / (h w)``; no autograd
    call is needed and the result is differentiable in ``A`` and ``W``.

    Args:
        activations: ``(B, C, h, w)``.
        weight: the classifier's weight, ``(num_classes, C)``.
        classes: class to explain per sample, ``(B,)`` long.

    Returns:
        Heatmaps, shape ``(B, h, w)``.
    """
    h, w = activations.shape[-2:]
    # A one-hot product rather than ``weight[classes]``: the backward of indexing accumulates the
    # rows that share a class with atomic adds on CPU (once B * C reaches 32768 elements and
    # several threads run), so the weight's gradient would change from run to run. The product's
    # backward is a matrix product, deterministic, and its forward is exact.
    onehot = F.one_hot(classes.long(), weight.shape[0]).to(weight.dtype)  # (B, K)
    wk = (onehot @ weight).to(activations.dtype)  # (B, C)
    cam = torch.einsum("bchw,bc->bhw", activations, wk) / (h * w)  # (B, h, w)
    return torch.relu(cam)


def class_scores(logits: Tensor, classes: Tensor) -> Tensor:
    """Sum over the batch of each row's score for its own class (rows are independent).

    Shape:
        logits ``(B, K)``, classes ``(B,)`` -> scalar.
    """
    return logits.gather(1, classes[:, None].long()).sum()

"""What the target probe measures of each layer, in passes of bounded size.

For a recorded layer output ``A`` and the class score, the probe map is ``sum_c dscore/dA * A``
per position (the Grad-CAM heatmap before the ReLU). :mod:`cgc_hf.targets` ranks layers by these
maps. Large probes are split: images a few per forward pass (in eval mode they do not interact),
and gradients a bounded number of bytes per backward pass, so that only the ``(B, hw)`` maps
are kept and no pass holds more than one part's graph and gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .target_layer import TargetLayer, to_nchw

if TYPE_CHECKING:
    from .targets import _Record


def images_per_pass(size: tuple[int, int]) -> int:
    """Probe images per forward pass: as many as cost two at 384 px, at least one."""
    return max(1, 2 * 384 * 384 // max(1, size[0] * size[1]))


def probe_maps(
    score: Tensor, described: list[tuple[_Record, TargetLayer]], size: tuple[int, int]
) -> list[tuple[Tensor | None, bool]]:
    """Per record: its probe map ``(b, hw)`` (``None`` without gradient from ``score``) and
    whether any patch position receives gradient.

    The gradients of every record at once would hold another copy of every output (several GB
    for a large ViT at 768 px): at most GRAD_BYTES of them at a time, and only each record's
    map is kept.
    """
    out: list[tuple[Tensor | None, bool]] = []
    for group in groups(described, GRAD_BYTES):
        grads = torch.autograd.grad(
            score, [rec.tensor for rec, _ in group], allow_unused=True, retain_graph=True
        )
        for (rec, target), grad in zip(group, grads):
            if grad is None:
                out.append((None, False))
            else:
                reached = bool(patch_part(grad, target).abs().amax() > 0)
                out.append((probe_map(rec.tensor, grad, target, size), reached))
        del grads
    return out


def joined(parts: list[tuple[Tensor | None, bool]]) -> Tensor | None:
    """The probe map over every pass's images ``(B, hw)``; ``None`` if no patch position of
    any image receives gradient."""
    if any(cam is None for cam, _ in parts) or not any(reached for _, reached in parts):
        return None
    return torch.cat([cam for cam, _ in parts])


GRAD_BYTES = 2**30
"""Bytes of candidate gradients computed in one backward pass of the target probe."""


def groups(
    candidates: list[tuple[_Record, TargetLayer]], budget: int
) -> Iterator[list[tuple[_Record, TargetLayer]]]:
    """Consecutive candidates whose outputs take at most ``budget`` bytes (at least one each)."""
    group: list[tuple[_Record, TargetLayer]] = []
    used = 0
    for candidate in candidates:
        tensor = candidate[0].tensor
        size = tensor.numel() * tensor.element_size()
        if group and used + size > budget:
            yield group
            group, used = [], 0
        group.append(candidate)
        used += size
    if group:
        yield group


def probe_map(
    activations: Tensor, grads: Tensor, target: TargetLayer, image_size: tuple[int, int]
) -> Tensor:
    """The probe heatmap before the ReLU, ``sum_c dscore/dA * A``, flattened: ``(B, hw)``."""
    with torch.no_grad():
        acts = to_nchw(activations.detach(), target, image_size).float()  # (B, C, h, w)
        return (to_nchw(grads, target, image_size).float() * acts).sum(1).flatten(1)  # (B, hw)


def constant_count(cam: Tensor) -> int:
    """Probe images whose heatmap ``relu(sum_c dscore/dA * A)`` is constant over the grid.

    Shape:
        cam: ``(B, hw)``, from :func:`probe_map`.
    """
    cam = cam.clamp_min(0)  # (B, hw)
    scale = cam.abs().amax().clamp_min(1e-30)
    constant = (cam.amax(1) - cam.amin(1)) <= 1e-6 * scale  # (B,)
    return int(constant.sum())


def informative(cam: Tensor) -> bool:
    """Whether the layer's probe heatmap ``cam`` (:func:`probe_map`, ``(B, hw)``) says
    something about the images.

    The map ``sum_c dscore/dA * A`` (before the ReLU, so that a random-init model's sign does
    not decide) must vary over positions and differ between the probe images, which differ.
    A layer the class score reads only through a pooled or broadcast vector (a class token
    spread back over the grid, a global-context branch, a position embedding) gives a flat or
    image-independent map there although it receives gradient.
    """
    scale = cam.abs().amax().clamp_min(1e-30)
    varies = bool(((cam.amax(1) - cam.amin(1)) > 1e-5 * scale).any())
    distinct = cam.shape[0] < 2 or bool((cam[0] - cam[1]).abs().amax() > 1e-5 * scale)
    return varies and distinct


def patch_part(grad: Tensor, target: TargetLayer) -> Tensor:
    """The patch tokens of an ``NLC`` gradient (prefix tokens dropped); a map as it is."""
    return grad[:, target.num_prefix_tokens :] if target.layout == "NLC" else grad

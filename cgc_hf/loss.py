"""InfoNCE over Grad-CAM heatmaps (the CGC loss); knows nothing about models."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CGCValueError

# gather(z) -> (all rows of every process, offset of this process's first row)
Gather = Callable[[Tensor], tuple[Tensor, int]]


def heatmap_embedding(heatmaps: Tensor, eps: float = 1e-12) -> Tensor:
    """Normalise heatmaps to sum 1, flatten, then L2-normalise.

    Shape:
        ``(B, H, W)`` -> ``(B, H * W)``
    """
    flat = heatmaps.flatten(1)  # (B, HW)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # the sums below overflow or lose precision in half types
    flat = flat / (flat.sum(1, keepdim=True) + eps)  # distribution over pixels
    return F.normalize(flat, dim=1, eps=eps)  # (B, HW) unit norm (all-zero rows stay zero)


class CGCLoss(nn.Module):
    """Contrastive Grad-CAM Consistency loss (Pillai et al., CVPR 2022, eq. 2).

    For row ``i``: positive = ``cos(H_aug[i], H_pos[i])``; negatives = ``cos(H_aug[i], H_aug[k])``
    for every other row ``k`` (of every process when ``gather`` is set). Logits are divided by
    the temperature; the loss is the cross-entropy with the positive as target, averaged over
    this process's rows.

    Args:
        temperature: softmax temperature, > 0.
        gather: optional function returning the rows of all processes (with gradient) and this
            process's offset among them; the trainer sets it for multi-process runs.

    Shape:
        heatmaps_aug, heatmaps_pos: ``(B, H, W)``; output: scalar.

    Example:
        >>> loss_fn = CGCLoss(temperature=0.5)
        >>> loss = loss_fn(torch.rand(4, 7, 7), torch.rand(4, 7, 7))
    """

    def __init__(self, temperature: float = 0.5, gather: Gather | None = None) -> None:
        super().__init__()
        if not temperature > 0:
            raise CGCValueError(f"temperature must be > 0, e.g. 0.5; got {temperature!r}.")
        self.temperature = float(temperature)
        self.gather = gather

    def forward(self, heatmaps_aug: Tensor, heatmaps_pos: Tensor) -> Tensor:
        if heatmaps_aug.shape != heatmaps_pos.shape or heatmaps_aug.dim() != 3:
            raise CGCValueError(
                "heatmaps_aug and heatmaps_pos must both have shape (B, H, W); got "
                f"{tuple(heatmaps_aug.shape)} and {tuple(heatmaps_pos.shape)}."
            )
        z_aug = heatmap_embedding(heatmaps_aug)  # (B, D)
        z_pos = heatmap_embedding(heatmaps_pos)  # (B, D)
        all_aug, offset = self.gather(z_aug) if self.gather is not None else (z_aug, 0)  # (N, D)
        b = z_aug.shape[0]
        pos = (z_aug * z_pos).sum(1, keepdim=True)  # (B, 1)
        neg = z_aug @ all_aug.T  # (B, N)
        self_idx = torch.arange(b, device=neg.device) + offset
        neg = neg.masked_fill(F.one_hot(self_idx, neg.shape[1]).bool(), float("-inf"))
        logits = torch.cat([pos, neg], dim=1) / self.temperature  # (B, 1 + N)
        target = torch.zeros(b, dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

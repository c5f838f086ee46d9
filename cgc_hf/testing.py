"""Tiny random-init model settings and probes, shared by the tests and the benchmarks.

Nothing here is needed to train or explain. The configs build transformers classifiers of a
few thousand parameters at 32-64 px at random init (no download), small enough to train a CGC
step in well under a second on one CPU thread.

Example:
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> backbone = ViTForImageClassification(ViTConfig(**HF_VIT, num_labels=3))
    >>> stem = first_weight_layer(backbone, lambda: backbone(torch.randn(2, 3, 32, 32)))
    >>> stem  # the patch embedding
    Conv2d(3, 32, kernel_size=(8, 8), stride=(8, 8))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

HF_ENCODER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
"""transformers encoder fields: one layer of width 32 (a CLIP / SigLIP text tower as it is)."""
HF_VIT = dict(HF_ENCODER, num_hidden_layers=2, image_size=32, patch_size=8)
"""transformers ViT fields: two layers, 32 px in patches of 8 (a 4 x 4 grid)."""
HF_SWIN = dict(
    image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=2
)
"""transformers Swin fields: patch 4, then one patch merging (stride 8 at the end)."""
HF_STAGES = dict(hidden_sizes=[16, 32], depths=[1, 1])
"""transformers CNN fields (ResNet, ConvNeXt, RegNet): two stages of one block."""
HF_PERCEIVER = dict(
    image_size=32,
    num_latents=16,
    d_latents=32,
    d_model=32,
    num_blocks=1,
    num_self_attends_per_block=1,
    num_self_attention_heads=2,
    num_cross_attention_heads=1,
)
"""transformers Perceiver fields: 16 latents of width 32 read a 32 px image, one block."""


def first_weight_layer(model: nn.Module, run: Callable[[], object]) -> nn.Module:
    """The first ``Conv2d`` / ``Linear`` / ``Embedding`` of ``model`` that ``run()`` calls: its
    stem, patch embedding or (ImageGPT, which reads colour ids) token embedding, found by running
    it rather than by name.

    Args:
        model: the module whose layers are watched.
        run: calls ``model`` (or a part of it) once; it runs without gradients.

    Raises:
        RuntimeError: no ``Conv2d`` / ``Linear`` / ``Embedding`` of ``model`` ran.
    """
    order: list[nn.Module] = []
    handles = [
        m.register_forward_pre_hook(lambda m, _inputs: order.append(m))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise RuntimeError(
            f"no Conv2d / Linear / Embedding of {type(model).__name__} runs on the input"
        )
    return order[0]

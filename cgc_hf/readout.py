"""The class score of a class-token ViT as a function of its last block's patch tokens, alone.

A class-token ViT's heatmap is ``dscore/dA`` at ``A = blocks[-1].norm1(X)``. The score reads only
the class token's output row, and the patch tokens reach that row through one path: as keys and
values of the class token's attention in the last block (the MLP, the norms and the residuals act
per token). So ::

    score = head(norm(x1 + mlp(norm2(x1))))[:, c],   x1 = X[:, 0] + proj(softmax(q0 K^T) V)

with ``q0`` from ``A[:, 0]`` and ``K, V`` from all of ``A``, gives exactly the same gradient
``dscore/dA`` as differentiating the whole model, while its second-order graph holds one query
row, the keys and values and the class token's MLP instead of the whole block for every token.

Only models whose last block is plain ``Block`` / ``Attention`` of timm's ``VisionTransformer``
with ``global_pool="token"`` get this readout, and only while nothing in that slice is random
(dropout, stochastic depth), since a recomputation would draw other masks than the forward did;
other models (or those states) return ``None`` and are differentiated whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .targets import Capture


def _random(m: nn.Module) -> bool:
    """Whether ``m`` draws random masks in its current mode (dropout or stochastic depth)."""
    if not m.training:
        return False
    for sub in m.modules():
        p = getattr(sub, "p", None) if isinstance(sub, nn.modules.dropout._DropoutNd) else None
        p = getattr(sub, "drop_prob", p)  # timm DropPath
        if p:
            return True
    return False


class ClassTokenReadout:
    """Recompute a timm class-token ViT's logits from the last block's ``norm1`` output.

    Use :meth:`supports` to check a model and target, :meth:`capture` around the forward to record
    the class token entering the last block, then call the readout on the captured ``norm1``
    output and that token.

    Args:
        backbone: a timm ``VisionTransformer``.

    Shape:
        activations ``(B, N, D)`` (``norm1`` output, all tokens), class token ``(B, D)``
        -> logits ``(B, K)``
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        self.block = backbone.blocks[-1]

    @staticmethod
    def supports(backbone: nn.Module, target_name: str) -> bool:
        """Whether ``backbone`` is a token-pooled timm ViT explained at ``blocks[-1].norm1``."""
        try:
            from timm.models.vision_transformer import Attention, Block, VisionTransformer
        except ImportError:  # pragma: no cover - timm is a dependency
            return False
        if type(backbone) is not VisionTransformer or len(backbone.blocks) == 0:
            return False
        last = len(backbone.blocks) - 1
        block = backbone.blocks[-1]
        return (
            backbone.global_pool == "token"
            and backbone.attn_pool is None
            and backbone.has_class_token
            and target_name == f"blocks.{last}.norm1"
            and type(block) is Block
            and type(block.attn) is Attention
            and block.attn.gate is None
        )

    def deterministic(self) -> bool:
        """True when the slice draws no random masks now (else the forward's cannot be replayed)."""
        m = self.backbone
        return not any(_random(x) for x in (self.block, m.norm, m.fc_norm, m.head_drop, m.head))

    @contextmanager
    def capture(self) -> Iterator[Capture]:
        """Record the class token entering the last block (``.tensor``, ``(B, D)``) in a forward."""
        store = Capture()

        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            store.tensor = args[0][:, 0]  # (B, D)

        handle = self.block.register_forward_pre_hook(hook)
        try:
            yield store
        finally:
            handle.remove()

    def __call__(self, activations: Tensor, class_token: Tensor) -> Tensor:
        """Logits ``(B, K)`` from ``norm1``'s output ``(B, N, D)`` and the class token."""
        block, attn = self.block, self.block.attn
        b, n, _ = activations.shape
        h, hd = attn.num_heads, attn.head_dim
        w, bias = attn.qkv.weight, attn.qkv.bias  # (3 h hd, D), (3 h hd,)
        split = attn.attn_dim
        q = F.linear(activations[:, :1], w[:split], None if bias is None else bias[:split])
        kv = F.linear(activations, w[split:], None if bias is None else bias[split:])
        q = q.reshape(b, 1, h, hd).transpose(1, 2)  # (B, h, 1, hd)
        k, v = kv.reshape(b, n, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, hd) each
        q, k = attn.q_norm(q), attn.k_norm(k)
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, h, 1, N)
        out = attn.attn_drop(weights) @ v  # (B, h, 1, hd)
        out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(b, 1, split))))
        x = class_token[:, None] + block.drop_path1(block.ls1(out))  # (B, 1, D)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))  # (B, 1, D)
        return self.backbone.forward_head(self.backbone.norm(x))  # (B, K)

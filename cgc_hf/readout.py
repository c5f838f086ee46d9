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
with ``global_pool="token"`` (:class:`ClassTokenReadout`), or a transformers
``ViTForImageClassification`` / ``ViTMSNForImageClassification`` /
``DeiTForImageClassification(WithTeacher)`` with eager attention
(:class:`ViTLayerReadout`), get a readout, and only while nothing in that slice is random
(dropout, stochastic depth), since a recomputation would draw other masks than the forward did;
other models (or those states) get ``None`` from :func:`readout_for` and are differentiated whole.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .target_layer import Capture


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


def _transformers_heads() -> dict[type, tuple[str, tuple[str, ...]]]:
    """transformers classifiers whose logits read only prefix tokens of their last ``*Layer``:
    ``{class: (base model attribute, classifier of each prefix token read)}``; the logits are
    the mean of those classifiers' outputs (DeiT with teacher: class and distillation token)."""
    try:
        from transformers import (
            DeiTForImageClassification,
            DeiTForImageClassificationWithTeacher,
            ViTForImageClassification,
            ViTMSNForImageClassification,
        )
    except ImportError:  # pragma: no cover - transformers is a dependency
        return {}
    return {
        ViTForImageClassification: ("vit", ("classifier",)),
        ViTMSNForImageClassification: ("vit", ("classifier",)),
        DeiTForImageClassification: ("deit", ("classifier",)),
        DeiTForImageClassificationWithTeacher: (
            "deit",
            ("cls_classifier", "distillation_classifier"),
        ),
    }


def _transformers_layer_types() -> tuple[tuple[type, type, type], ...]:
    """``(layer, attention, mlp)`` classes of the pre-norm encoder layers the readout rebuilds."""
    try:
        from transformers.models.deit import modeling_deit as deit
        from transformers.models.vit import modeling_vit as vit
        from transformers.models.vit_msn import modeling_vit_msn as vit_msn
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    found = []
    for mod, prefix in ((vit, "ViT"), (deit, "DeiT"), (vit_msn, "ViTMSN")):
        names = (f"{prefix}Layer", f"{prefix}Attention", f"{prefix}MLP")
        if all(hasattr(mod, n) for n in names):  # transformers 5 names (4.x had others)
            found.append(tuple(getattr(mod, n) for n in names))
    return tuple(found)


class ViTLayerReadout:
    """Recompute a transformers ViT / DeiT logits from the last layer's ``layernorm_before``.

    The transformers counterpart of :class:`ClassTokenReadout`: the classifier reads the first
    ``P`` tokens of the final ``layernorm`` (``P = 1``; DeiT with teacher averages a class- and a
    distillation-token classifier, ``P = 2``), and the other tokens reach those rows only as keys
    and values of the last layer's attention. So the ``P`` query rows against every token's key
    and value, then those rows' MLP, final norm and classifiers give the forward's logits and
    the same gradient with respect to ``layernorm_before``'s output. The attention is the
    model's own ``eager_attention_forward`` (its scaling, its softmax in float32) called on the
    ``P`` query rows, so the slice computes what the forward computes for those rows.

    Args:
        backbone: a ``ViTForImageClassification``, ``ViTMSNForImageClassification``,
            ``DeiTForImageClassification`` or ``DeiTForImageClassificationWithTeacher``.

    Shape:
        activations ``(B, N, D)`` (``layernorm_before`` output, all tokens), prefix tokens
        ``(B, P, D)`` (the last layer's input rows the classifiers read) -> logits ``(B, K)``
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        base_name, heads = _transformers_heads()[type(backbone)]
        self.base = getattr(backbone, base_name)
        self.layer = self.base.layers[-1]
        self.heads = [getattr(backbone, h) for h in heads]

    @staticmethod
    def supports(backbone: nn.Module, target_name: str) -> bool:
        """Whether ``backbone`` is a transformers ViT / DeiT classifier explained at its last
        layer's ``layernorm_before``, with the layer classes the readout rebuilds."""
        spec = _transformers_heads().get(type(backbone))
        if spec is None:
            return False
        base_name, heads = spec
        layers = getattr(getattr(backbone, base_name, None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            return False
        layer = layers[-1]
        attn, mlp = getattr(layer, "attention", None), getattr(layer, "mlp", None)
        return (
            target_name == f"{base_name}.layers.{len(layers) - 1}.layernorm_before"
            and (type(layer), type(attn), type(mlp)) in _transformers_layer_types()
            and all(isinstance(getattr(backbone, h, None), nn.Linear) for h in heads)
        )

    def deterministic(self) -> bool:
        """True when the slice draws no random masks now and the forward's attention is the
        eager one the slice recomputes (another implementation falls back to the whole model)."""
        attn = self.layer.attention
        eager = getattr(self.backbone.config, "_attn_implementation", "eager") == "eager"
        attn_dropout = attn.training and attn.attention_dropout > 0  # functional, not a module
        return eager and not attn_dropout and not any(map(_random, (self.layer, *self.heads)))

    @contextmanager
    def capture(self) -> Iterator[Capture]:
        """Record the prefix rows entering the last layer (``.tensor``, ``(B, P, D)``)."""
        store = Capture()
        rows = len(self.heads)

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            store.tensor = hidden[:, :rows]  # (B, P, D)

        handle = self.layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield store
        finally:
            handle.remove()

    def __call__(self, activations: Tensor, prefix: Tensor) -> Tensor:
        """Logits ``(B, K)`` from ``layernorm_before``'s output ``(B, N, D)`` and the prefix
        rows ``(B, P, D)`` of the last layer's input."""
        layer, attn = self.layer, self.layer.attention
        b, n, _ = activations.shape
        p, hd = prefix.shape[1], attn.head_dim
        q = attn.q_proj(activations[:, :p]).view(b, p, -1, hd).transpose(1, 2)  # (B, h, P, hd)
        k = attn.k_proj(activations).view(b, n, -1, hd).transpose(1, 2)  # (B, h, N, hd)
        v = attn.v_proj(activations).view(b, n, -1, hd).transpose(1, 2)  # (B, h, N, hd)
        # the forward's own eager attention (its scaling, its float32 softmax), on P query rows
        eager = sys.modules[type(attn).__module__].eager_attention_forward
        out, _ = eager(attn, q, k, v, None, scaling=attn.scaling, dropout=0.0)  # (B, P, h, hd)
        x = prefix + layer.dropout(attn.o_proj(out.reshape(b, p, -1)))  # (B, P, D)
        x = x + layer.dropout(layer.mlp(layer.layernorm_after(x)))  # (B, P, D)
        x = self.base.layernorm(x)  # (B, P, D)
        if len(self.heads) == 1:
            return self.heads[0](x[:, 0])  # (B, K)
        cls_logits, distillation_logits = (head(x[:, i]) for i, head in enumerate(self.heads))
        return (cls_logits + distillation_logits) / 2  # (B, K), as DeiT with teacher averages


Readout = ClassTokenReadout | ViTLayerReadout


def readout_for(backbone: nn.Module, target_name: str) -> Readout | None:
    """The readout slice of ``backbone`` explained at ``target_name``, or ``None`` (whole model)."""
    for kind in (ClassTokenReadout, ViTLayerReadout):
        if kind.supports(backbone, target_name):
            return kind(backbone)
    return None

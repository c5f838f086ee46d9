"""Fused attention before the target layer, explicit attention after it (cgc_hf/attention.py)."""

from __future__ import annotations

import pytest
import timm
import torch

from cgc_hf import CGCModel, sample_crop_flip


def _vit(**kwargs) -> timm.models.VisionTransformer:
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, **kwargs)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **kwargs)


def _fused(model: CGCModel) -> list[bool]:
    return [bool(block.attn.fused_attn) for block in model.backbone.blocks]


def _grads(model: CGCModel) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    out = model(x, labels=torch.tensor([0, 1, 2, 0]), geometry=sample_crop_flip(4, generator=g))
    out["loss"].backward()
    return out["loss"].item(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_only_attention_after_the_target_is_explicit_and_the_step_is_unchanged(pool):
    model = CGCModel.from_backbone(_vit(global_pool=pool))
    # class token: the last block's norm1 is the target, so its attention runs after it;
    # average pool: the final norm is, and every block has returned before it
    assert _fused(model) == ([True, True, False] if pool == "token" else [True, True, True])
    model.train()
    loss, grads = _grads(model)
    for block in model.backbone.blocks:  # the reference: explicit attention everywhere
        block.attn.fused_attn = False
    ref_loss, ref_grads = _grads(model)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)


def test_an_earlier_target_makes_the_blocks_after_it_explicit():
    model = CGCModel.from_backbone(_vit())
    model.set_target_layer("blocks.0.norm1")
    assert _fused(model) == [False, False, False]
    model.train()
    _grads(model)  # a fused block after the target would fail: SDPA has no double backward
    model.set_target_layer(None)
    assert _fused(model) == [True, True, False]


def test_attention_built_explicit_stays_explicit():
    backbone = _vit()
    for block in backbone.blocks:
        block.attn.fused_attn = False  # as TIMM_FUSED_ATTN=0 builds it
    model = CGCModel.from_backbone(backbone)
    assert _fused(model) == [False, False, False]


def test_a_fused_attention_after_the_target_cannot_train():
    """Why the rule exists: fused attention has no double backward on this torch."""
    model = CGCModel.from_backbone(_vit(global_pool="avg"), target_layer="blocks.1.norm1")
    assert _fused(model) == [True, False, False]
    model.train()
    _grads(model)
    model.backbone.blocks[2].attn.fused_attn = True
    with pytest.raises(RuntimeError, match="derivative|backward|not implemented"):
        _grads(model)

"""ClassTokenReadout: the class-token ViT's heatmap from the slice of the last block it reads.

The reference is the same model differentiated whole (the readout switched off): heatmaps and the
gradient of the CGC loss with respect to every parameter must agree, in float64 to 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_timm

from cgc_hf import sample_crop_flip
from cgc_hf.readout import ClassTokenReadout

READOUT_VITS = ["vit_token", "vit_registers"]  # a plain class-token ViT; DINOv2 + registers


def _double_vit(key: str = "vit_token"):
    return tiny_timm(key).double()


def _cgc_grads(model, x, labels, geometry):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=labels, geometry=geometry)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_class_token_vit_uses_the_readout_and_other_vits_do_not():
    for key in READOUT_VITS:
        assert tiny_timm(key)._readout is not None, key
    # average pooling, a distillation head, other block types: differentiated whole
    for key in ("vit_avg", "deit_distilled", "eva", "beit", "swin"):
        assert tiny_timm(key)._readout is None, key


@pytest.mark.parametrize("method", ["grad_x_act", "gradcam"])
@pytest.mark.parametrize("key", READOUT_VITS)
def test_readout_heatmap_and_cgc_gradient_equal_the_whole_model(key, method):
    model = _double_vit(key)
    model.config.cam_method = method
    size = model.config.data_config["input_size"][-1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, size, size, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, -100, 1, -100])
    geometry = sample_crop_flip(6, generator=g)
    readout = model._readout
    assert isinstance(readout, ClassTokenReadout)

    model.eval()
    fast = model.explain(x)
    model._readout = None
    whole = model.explain(x)
    model._readout = readout
    assert bool(fast.any())
    torch.testing.assert_close(fast, whole, rtol=1e-10, atol=1e-12)

    model.train()
    out_fast, grads_fast = _cgc_grads(model, x, labels, geometry)
    model._readout = None
    out_whole, grads_whole = _cgc_grads(model, x, labels, geometry)
    model._readout = readout
    torch.testing.assert_close(out_fast["loss_cgc"], out_whole["loss_cgc"], rtol=1e-10, atol=0)
    assert grads_fast.keys() == grads_whole.keys()
    for name in grads_whole:
        torch.testing.assert_close(
            grads_fast[name], grads_whole[name], rtol=1e-8, atol=1e-12, msg=name
        )


def test_readout_logits_equal_the_forward_logits():
    model = _double_vit().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with model._capture() as (cap, token):
        logits = model._logits(x)
    torch.testing.assert_close(model._readout(cap.tensor, token.tensor), logits)


def test_stochastic_depth_in_training_falls_back_to_the_whole_model():
    model = _double_vit()
    model.backbone.blocks[-1].drop_path1.drop_prob = 0.1  # masks the recompute could not replay
    model.train()
    assert not model._readout.deterministic()
    model.eval()
    assert model._readout.deterministic()

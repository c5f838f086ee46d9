"""Readouts: a class-token ViT's heatmap from the slice of the last block it reads.

The reference is the same model differentiated whole (the readout switched off): heatmaps and the
gradient of the CGC loss with respect to every parameter must agree, in float64 to 1e-10
(timm's ``ClassTokenReadout``; transformers' ``ViTLayerReadout`` with its eager attention's
float32 softmax replaced by a float64 one, and to float32 rounding with the softmax as shipped).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_hf, tiny_hf_backbone, tiny_timm

from cgc_hf import CGCModel, sample_crop_flip
from cgc_hf.readout import ClassTokenReadout, ViTLayerReadout
from cgc_hf.testing import HF_VIT

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


# ---------------------------------------------------------------------------- transformers


def _hf_deit_plain(**config):
    """DeiT without teacher: two prefix tokens, the classifier reads the class token only."""
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    fields = dict(HF_VIT, **config)
    return CGCModel.from_backbone(DeiTForImageClassification(DeiTConfig(**fields, num_labels=3)))


def _hf_vit_msn():
    from transformers import ViTMSNConfig, ViTMSNForImageClassification

    torch.manual_seed(0)
    return CGCModel.from_backbone(
        ViTMSNForImageClassification(ViTMSNConfig(**HF_VIT, num_labels=3))
    )


def _hf(key: str) -> CGCModel:
    built = {"deit_plain": _hf_deit_plain, "vit_msn": _hf_vit_msn}.get(key)
    return built() if built is not None else tiny_hf(key)


HF_READOUT = ["vit", "deit", "deit_plain", "vit_msn"]  # DeiT with teacher reads 2 rows


def _eager_float64(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """transformers' eager attention with the softmax in the input's dtype (it casts to float32),
    so that float64 runs compare the slice itself, free of float32 rounding."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.dropout(weights.softmax(-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _compare_whole(model, readout, rtol, atol):
    """Heatmaps (eval) and CGC loss gradients (train) with ``readout`` against the whole model."""
    size = model.config.data_config["input_size"][-1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, size, size, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, -100, 1, -100])
    geometry = sample_crop_flip(6, generator=g)
    model.eval()
    model._readout = readout
    fast = model.explain(x)
    model._readout = None
    whole = model.explain(x)
    assert bool(whole.any())
    torch.testing.assert_close(fast, whole, rtol=rtol, atol=atol)
    model.train()
    model._readout = readout
    out_fast, grads_fast = _cgc_grads(model, x, labels, geometry)
    model._readout = None
    out_whole, grads_whole = _cgc_grads(model, x, labels, geometry)
    torch.testing.assert_close(out_fast["loss_cgc"], out_whole["loss_cgc"], rtol=rtol, atol=0)
    assert grads_fast.keys() == grads_whole.keys()
    for name in grads_whole:
        torch.testing.assert_close(grads_fast[name], grads_whole[name], rtol=rtol, atol=atol)


def test_transformers_vit_and_deit_use_the_readout_and_others_do_not():
    for key in HF_READOUT:
        assert isinstance(_hf(key)._readout, ViTLayerReadout), key
    # DINOv2's classifier also reads the mean of the patch tokens; BEiT pools; Swin has no
    # class token: differentiated whole
    for key in ("dinov2", "beit", "swin"):
        assert tiny_hf(key)._readout is None, key
    model = tiny_hf("vit")
    model.set_target_layer("vit.layers.0.layernorm_before")  # not the last layer: no slice
    assert model._readout is None
    model.set_target_layer(None)
    assert isinstance(model._readout, ViTLayerReadout)


@pytest.mark.parametrize("key", HF_READOUT)
def test_transformers_readout_logits_equal_the_forward_logits(key):
    model = _hf(key).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with model._capture() as (cap, rows):
        logits = model._logits(x)
    assert rows.tensor.shape[1] == (2 if key == "deit" else 1)  # the rows the classifier reads
    torch.testing.assert_close(model._readout(cap.tensor, rows.tensor), logits)


@pytest.mark.parametrize("method", ["grad_x_act", "gradcam"])
@pytest.mark.parametrize("key", HF_READOUT)
def test_transformers_readout_equals_the_whole_model_in_float64(key, method, monkeypatch):
    from transformers.models.deit import modeling_deit
    from transformers.models.vit import modeling_vit
    from transformers.models.vit_msn import modeling_vit_msn

    for module in (modeling_vit, modeling_deit, modeling_vit_msn):  # forward and readout call it
        monkeypatch.setattr(module, "eager_attention_forward", _eager_float64)
    model = _hf(key).double()
    model.config.cam_method = method
    _compare_whole(model, model._readout, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("key", HF_READOUT)
def test_transformers_readout_equals_the_whole_model_with_the_float32_softmax(key):
    # as shipped, eager attention takes its softmax in float32 even in a float64 model: the
    # second-order terms of the two paths then agree to that rounding (~1e-9 here), while a
    # slice that misses one token's key and value is off by far more (next test)
    model = _hf(key).double()
    _compare_whole(model, model._readout, rtol=1e-6, atol=1e-8)


class _MissesLastToken(ViTLayerReadout):
    def __call__(self, activations, rows):
        return super().__call__(activations[:, :-1], rows)  # the last patch's key, value left out


def test_a_readout_that_misses_a_token_fails_the_comparison():
    model = tiny_hf("vit").double()
    with pytest.raises(AssertionError, match="not close"):
        _compare_whole(model, _MissesLastToken(model.backbone), rtol=1e-6, atol=1e-8)


def test_transformers_dropout_or_other_attention_falls_back_to_the_whole_model():
    model = tiny_hf("vit")
    model.train()
    assert model._readout.deterministic()
    model.backbone.vit.layers[-1].dropout.p = 0.1  # hidden dropout: masks a recompute redraws
    assert not model._readout.deterministic()
    model.eval()
    assert model._readout.deterministic()

    model = _hf_deit_plain(attention_probs_dropout_prob=0.1)
    model.train()
    assert not model._readout.deterministic()  # attention dropout is functional, not a module
    model.eval()
    assert model._readout.deterministic()

    backbone = tiny_hf_backbone("vit")
    model = CGCModel.from_backbone(backbone)
    backbone.config._attn_implementation = "sdpa"  # changed after wrapping
    assert not model._readout.deterministic()

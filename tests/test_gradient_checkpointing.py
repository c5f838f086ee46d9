"""Gradient checkpointing of the blocks before the target layer (cgc_hf/gradient_checkpointing.py):
the same step to the bit, far fewer tensors kept for the backward, and the same trained run."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import timm
import torch
from conftest import Stop, arch_id, images, layernorm_vit, reset_accelerate, resnet_run, tiny

from cgc_hf import CGCModel, CGCValueError
from cgc_hf import gradient_checkpointing as gc


def _vit(depth: int = 3, **kwargs) -> CGCModel:
    """A timm ViT with dropout and drop-path, so a recomputation must replay the random state."""
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=3,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=depth,
        num_heads=2,
        drop_path_rate=0.2,
        proj_drop_rate=0.1,
        attn_drop_rate=0.1,
        **kwargs,
    )
    return CGCModel.from_backbone(backbone)


def _step(model: CGCModel, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """One CGC training step's loss, parameter gradients and buffers after it (seeded)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # dropout, drop-path and the crop/flips
    labels = torch.arange(x.shape[0]) % model.num_labels
    labels[-1] = -100  # an unlabeled row
    out = model(x, labels=labels)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads, {n: b.clone() for n, b in model.named_buffers()}


def _names(model: CGCModel) -> list[str]:
    wrapped = gc.checkpointed(model.backbone)
    return [n for n, m in model.backbone.named_modules() if m in wrapped]


def _assert_same_step(model: CGCModel, x: torch.Tensor) -> None:
    reference = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and _names(model), "nothing was checkpointed"
    loss, grads, buffers = _step(model, x)
    ref_loss, ref_grads, ref_buffers = _step(reference, x)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    for name, b in ref_buffers.items():  # BatchNorm statistics counted once
        assert torch.equal(buffers[name], b), name


ARCHS = [
    ("timm", "vit_token"),
    ("timm", "resnet"),
    ("timm", "convnext"),
    ("timm", "swin"),
    ("timm", "efficientnet"),
    ("transformers", "vit"),
    ("transformers", "swin"),
    ("transformers", "resnet"),
]


@pytest.mark.parametrize("arch", ARCHS, ids=arch_id)
def test_checkpointing_gives_the_same_step_to_the_bit(arch):
    model, spec = tiny(arch)
    _assert_same_step(model, images(spec, batch=4))


def test_checkpointing_replays_dropout_and_drop_path():
    _assert_same_step(_vit(), torch.randn(4, 3, 32, 32))


def test_the_recomputation_runs_in_the_forwards_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --mixed_precision bf16
        _assert_same_step(_vit(), torch.randn(4, 3, 32, 32))


def test_a_key_value_cache_is_not_filled_twice():
    """ImageGPT's blocks append to a key / value cache: a recomputed block would find twice
    the keys. While checkpointing, the (unread) cache is off."""
    from transformers import AutoConfig, AutoModelForImageClassification, ImageGPTImageProcessor

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "imagegpt", num_labels=3, n_embd=32, n_layer=2, n_head=2, n_positions=64
    )
    backbone = AutoModelForImageClassification.from_config(config)
    g = torch.Generator().manual_seed(0)
    clusters = torch.rand(config.vocab_size - 1, 3, generator=g) * 2 - 1
    processor = ImageGPTImageProcessor(clusters=clusters, size={"height": 8, "width": 8})
    model = CGCModel.from_backbone(backbone, image_processor=processor)
    assert backbone.config.use_cache
    _assert_same_step(model, torch.randn(4, 3, 8, 8))
    assert backbone.config.use_cache is False
    model.gradient_checkpointing_disable()
    assert backbone.config.use_cache is True


def test_without_restoring_them_batchnorm_statistics_would_count_a_batch_twice(monkeypatch):
    model, spec = tiny(("timm", "resnet"))
    x = images(spec, batch=4)
    reference = _step(copy.deepcopy(model), x)[2]
    monkeypatch.setattr(gc, "_running_stats_kept", lambda _module: nullcontext())
    model.gradient_checkpointing_enable()
    buffers = _step(model, x)[2]
    assert any(not torch.equal(buffers[n], b) for n, b in reference.items())


def test_only_blocks_that_return_before_the_target_are_checkpointed():
    model = _vit(depth=3)
    assert model.target.name == "blocks.2.norm1"  # class token: the last block's input norm
    model.gradient_checkpointing_enable()
    assert _names(model) == ["patch_embed", "blocks.0", "blocks.1"]
    model.set_target_layer("blocks.0.norm1")  # the units follow the target
    assert _names(model) == ["patch_embed"]
    _step(model, torch.randn(4, 3, 32, 32))  # blocks after the target: not checkpointed
    model.set_target_layer(None)
    assert _names(model) == ["patch_embed", "blocks.0", "blocks.1"]
    model.set_grad_checkpointing(False)  # timm's name
    assert _names(model) == [] and not model.is_gradient_checkpointing
    assert all("forward" not in m.__dict__ for m in model.backbone.modules())
    model.set_grad_checkpointing()
    assert model.is_gradient_checkpointing and len(_names(model)) == 3


def test_average_pooled_vit_checkpoints_every_block():
    model = _vit(depth=3, global_pool="avg", class_token=False, fc_norm=True)
    model.gradient_checkpointing_enable()
    assert _names(model) == ["patch_embed", "blocks.0", "blocks.1", "blocks.2"]


def _kept_bytes(model: CGCModel, x: torch.Tensor) -> int:
    """Bytes of activations autograd keeps for the backward of one training forward (weights
    and recomputed blocks not counted)."""
    kept = [0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            kept[0] += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=torch.zeros(x.shape[0], dtype=torch.long))
    return kept[0]


def test_checkpointing_keeps_far_fewer_tensors_for_the_backward():
    model = _vit(depth=12)
    x = torch.randn(8, 3, 32, 32)
    full = _kept_bytes(model, x)
    model.gradient_checkpointing_enable()
    assert _kept_bytes(model, x) < 0.4 * full  # 0.31x: 11 of 12 blocks recomputed


def test_a_copy_checkpoints_its_own_modules_and_saves_plain_weights(tmp_path):
    model = layernorm_vit()
    model.gradient_checkpointing_enable()
    twin = copy.deepcopy(model)
    for module in gc.checkpointed(twin.backbone):
        wrapper = module.__dict__["forward"]
        assert wrapper.module is module and wrapper.forward.__self__ is module
    x = torch.randn(4, 3, 32, 32)
    reference = _step(model, x)[1]
    for name, g in _step(twin, x)[1].items():
        assert torch.equal(g, reference[name]), name
    model.save_pretrained(tmp_path)
    loaded = CGCModel.from_pretrained(tmp_path)
    assert not loaded.is_gradient_checkpointing
    assert loaded.state_dict().keys() == layernorm_vit().state_dict().keys()


def test_explain_is_unchanged():
    model = _vit().eval()
    x = torch.randn(3, 3, 32, 32)
    reference = model.explain(x)
    model.gradient_checkpointing_enable()
    assert torch.equal(model.explain(x), reference)


@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {"preserve_rng_state": False}])
def test_other_checkpoint_options_are_refused_in_one_line(kwargs):
    with pytest.raises(CGCValueError) as err:
        layernorm_vit().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    message = str(err.value)
    assert "gradient_checkpointing_kwargs" in message and "\n" not in message
    assert "use_reentrant': False" in message
    layernorm_vit().gradient_checkpointing_enable({"use_reentrant": False})  # transformers' own


@pytest.mark.usefixtures("fresh_accelerate")
def test_trainer_with_gradient_checkpointing_trains_the_same_weights(tmp_path):
    seen = []

    def record(trainer) -> None:
        inner = trainer.accelerator.unwrap_model(trainer.model)
        seen.append(len(gc.checkpointed(inner.backbone)))

    reference = resnet_run(tmp_path / "plain").state_dict()
    reset_accelerate()
    model = resnet_run(tmp_path / "ckpt", on_trainer=record, gradient_checkpointing=True)
    assert seen and seen[0] > 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    # Recomputing changes no value, so a run stopped without it may resume with it.
    reset_accelerate()
    with pytest.raises(Stop):
        resnet_run(tmp_path / "mixed", stop_at=3)
    reset_accelerate()
    resumed = resnet_run(tmp_path / "mixed", resume="latest", gradient_checkpointing=True)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, reference[name]), name

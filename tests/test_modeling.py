import logging

import pytest
import torch
import torch.nn.functional as F

from cgc_hf import CGCConfig, CGCModel, CGCValueError, CropFlip, warp
from cgc_hf.loss import CGCLoss

VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return CGCModel.from_backbone(
        "vit_tiny_patch16_224", num_labels=3, pretrained=False, model_kwargs=VIT, compare_size=8
    )


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return CGCModel.from_backbone("resnet18", num_labels=4, pretrained=False)


def _reference_cams(model, x, classes):
    """Grad-CAM of the ViT's resolved layer computed directly on the backbone, with its own hook."""
    store = {}
    layer = model.backbone.get_submodule(model.target.name)
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    logits = model.backbone(x)
    handle.remove()
    a = store["a"]  # (B, 1 + 16, C)
    (g,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), a)
    cams = torch.relu((g * a).sum(-1))[:, 1:]  # drop the class token: (B, 16)
    return cams.reshape(-1, 4, 4).detach(), logits.detach()


def test_training_forward_matches_reference_computation(vit):
    vit.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    geometry = CropFlip(
        torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.7, 0.9]] * 2),
        torch.tensor([True, False, False, True]),
    )
    labels = torch.tensor([0, 2, -100, 1])
    out = vit(x, labels=labels, geometry=geometry)
    # Reference: each view on its own (the ViT has no batch-coupled layers), then the paper's steps.
    x_aug = warp(x, geometry)
    _, logits = _reference_cams(vit, x, torch.zeros(4, dtype=torch.long))
    classes = logits.argmax(1)
    cam, _ = _reference_cams(vit, x, classes)
    cam_aug, logits_aug = _reference_cams(vit, x_aug, classes)
    pos = warp(cam, geometry, 8)
    aug = F.interpolate(cam_aug[:, None], (8, 8), mode="bilinear", align_corners=False)[:, 0]
    ref_cgc = CGCLoss(0.5)(aug, pos)
    lab = labels != -100
    ref_ce = F.cross_entropy(
        torch.cat([logits[lab], logits_aug[lab]]), torch.cat([labels[lab]] * 2)
    )
    torch.testing.assert_close(out["logits"].detach(), logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss_cgc"].detach(), ref_cgc, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss_ce"].detach(), ref_ce, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss"].detach(), ref_ce + 0.5 * ref_cgc, rtol=1e-4, atol=1e-5)


def test_cgc_term_trains_the_backbone_and_not_only_the_head(resnet):
    resnet.train()
    resnet.zero_grad()
    out = resnet(torch.randn(4, 3, 64, 64))
    out["loss_cgc"].backward()
    stem = resnet.backbone.conv1.weight.grad
    assert stem is not None and float(stem.abs().sum()) > 0
    assert float(resnet.backbone.fc.weight.grad.abs().sum()) > 0  # closed form depends on W


def test_unlabeled_batch_gives_finite_loss_and_cgc_gradient(resnet):
    resnet.train()
    resnet.zero_grad()
    out = resnet(torch.randn(3, 3, 64, 64), labels=torch.full((3,), -100))
    assert out["loss_ce"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    # timm zero-initialises each residual branch's last BN scale, so the stem is where gradient
    # from the CGC term must arrive.
    assert float(resnet.backbone.conv1.weight.grad.abs().sum()) > 0


def test_eval_mode_is_the_plain_classifier(resnet):
    resnet.eval()
    x = torch.randn(2, 3, 64, 64)
    out = resnet(x, labels=torch.tensor([1, 3]))
    torch.testing.assert_close(out["logits"], resnet.backbone(x))
    torch.testing.assert_close(
        out["loss"], F.cross_entropy(resnet.backbone(x), torch.tensor([1, 3]))
    )
    assert not resnet.training


def test_explain_keeps_mode_and_graph_choice(resnet):
    resnet.train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cams = resnet.explain(x, size=16)
    assert resnet.training and cams.shape == (2, 16, 16) and not cams.requires_grad
    assert resnet.explain(x, create_graph=True).requires_grad
    resnet.eval()
    assert resnet.explain(x).shape == (2, 2, 2) and not resnet.training


def test_explain_given_classes_differs_per_class(resnet):
    resnet.eval()
    x = torch.randn(1, 3, 64, 64)
    a = resnet.explain(x, classes=torch.tensor([0]))
    b = resnet.explain(x, classes=torch.tensor([1]))
    w = resnet.backbone.fc.weight
    assert not torch.equal(a, b) and not torch.equal(w[0], w[1])


def test_explain_works_with_frozen_weights(vit):
    vit.eval()
    for p in vit.parameters():
        p.requires_grad_(False)
    try:
        cams = vit.explain(torch.randn(2, 3, 32, 32))
    finally:
        for p in vit.parameters():
            p.requires_grad_(True)
    assert cams.shape == (2, 4, 4) and float(cams.sum()) >= 0


def test_label_target_explains_the_label(vit):
    vit.train()
    vit.config.cam_target = "label"
    try:
        x = torch.randn(4, 3, 32, 32)
        full = CropFlip(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4), torch.zeros(4, dtype=torch.bool))
        out = vit(x, labels=torch.tensor([0, 1, 2, 0]), geometry=full)
        assert torch.isfinite(out["loss_cgc"])
    finally:
        vit.config.cam_target = "predicted"


def test_bad_labels_are_rejected(resnet):
    resnet.train()
    with pytest.raises(CGCValueError, match="labels must be in"):
        resnet(torch.randn(2, 3, 64, 64), labels=torch.tensor([0, 4]))
    with pytest.raises(CGCValueError, match="shape"):
        resnet(torch.randn(2, 3, 64, 64), labels=torch.tensor([0, 1, 2]))


def test_batch_of_one_falls_back_and_says_so(resnet, caplog):
    resnet.train()
    resnet._warned_single = False
    with caplog.at_level(logging.WARNING):
        out = resnet(torch.randn(1, 3, 64, 64), labels=torch.tensor([1]))
    assert float(out["loss_cgc"]) == 0.0 and "batch of 1" in caplog.text


def test_no_cgc_uses_one_view(resnet):
    resnet.train()
    resnet.config.cgc_lambda = 0.0
    try:
        calls = []
        h = resnet.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        out = resnet(torch.randn(2, 3, 64, 64), labels=torch.tensor([0, 1]))
        h.remove()
    finally:
        resnet.config.cgc_lambda = 0.5
    assert calls == [2] and float(out["loss_cgc"]) == 0.0


def test_config_validation_names_the_argument():
    for kwargs, name in [
        ({"cgc_lambda": -1}, "cgc_lambda"),
        ({"temperature": 0}, "temperature"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
        ({"crop_scale": (0.5, 1.5)}, "crop_scale"),
        ({"cam_method": "x"}, "cam_method"),
        ({"flip_prob": 2}, "flip_prob"),
    ]:
        with pytest.raises(CGCValueError, match=name):
            CGCConfig(**kwargs)


def test_config_json_round_trip(vit):
    cfg = CGCConfig.from_dict(vit.config.to_dict())
    assert cfg == vit.config


def test_backbone_attributes_are_forwarded(resnet):
    assert resnet.num_classes == 4 and resnet.fc is resnet.backbone.fc


def test_training_forward_without_gradients_says_what_to_do(resnet):
    resnet.train()
    with torch.no_grad(), pytest.raises(CGCValueError, match="model.eval"):
        resnet(torch.randn(2, 3, 64, 64))


def test_a_failed_weight_download_is_one_error_naming_the_way_out(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:  # what huggingface_hub raises offline without a cached copy (an OSError)
            raise FileNotFoundError("cannot find the requested files in the local cache")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CGCValueError) as err:
        CGCModel.from_backbone("resnet18", num_labels=3)
    message = str(err.value)
    assert message.startswith("name_or_model='resnet18': pretrained weights could not be loaded")
    assert "FileNotFoundError: cannot find the requested files" in message
    assert "pretrained=False (--no_pretrained)" in message
    assert CGCModel.from_backbone("resnet18", num_labels=3, pretrained=False).num_labels == 3


def test_separate_views_equal_one_pass_without_batch_coupled_layers(vit):
    vit.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    geometry = CropFlip(
        torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.7, 0.9]] * 2),
        torch.tensor([True, False, False, True]),
    )
    labels = torch.tensor([0, 2, -100, 1])
    joint = vit(x, labels=labels, geometry=geometry)
    vit.config.separate_views = True
    try:
        separate = vit(x, labels=labels, geometry=geometry)
    finally:
        vit.config.separate_views = False
    for key in ("logits", "loss_ce", "loss_cgc", "loss"):
        torch.testing.assert_close(separate[key], joint[key], rtol=1e-5, atol=1e-6)


def test_separate_views_normalise_each_view_by_its_own_batch():
    torch.manual_seed(0)
    model = CGCModel.from_backbone("resnet18", num_labels=4, pretrained=False, separate_views=True)
    model.train()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    geometry = CropFlip(torch.tensor([[0.2, 0.2, 0.8, 0.8]] * 4), torch.ones(4, dtype=torch.bool))
    state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    out = model(x, geometry=geometry)
    model.backbone.load_state_dict(state)  # the reference pass sees the same running statistics
    alone = model.backbone(x)  # BatchNorm in training mode over these 4 images only
    torch.testing.assert_close(out["logits"], alone, rtol=1e-4, atol=1e-5)
    model.config.separate_views = False
    model.backbone.load_state_dict(state)
    joint = model(x, geometry=geometry)
    assert not torch.allclose(joint["logits"], alone, atol=1e-3)  # one pass mixes both views

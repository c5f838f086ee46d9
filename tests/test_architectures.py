"""CGC on every supported architecture family, each as a tiny random-init model, offline.

For each family: the target layer resolves by itself, the heatmap has the layer's true grid,
a training step gives a finite loss whose CGC term reaches the stem, and ``explain`` agrees with
an independent Grad-CAM implementation (the ``grad-cam`` package) on the same layer and class.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ARCHITECTURES,
    NUM_LABELS,
    TIMM_TINY,
    FlipNet,
    TinySpec,
    arch_id,
    calibrate_batchnorm,
    images,
    tiny,
    tiny_timm,
)
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from cgc_hf import CGCModel

EPS = 1e-7  # pytorch_grad_cam's min-max normalisation: (x - min) / (max - min + 1e-7)


def _min_max(cams: Tensor) -> Tensor:
    """Per-map ``(x - min) / (max + eps)`` after subtracting the min, as scale_cam_image does."""
    flat = cams.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    return (flat / (EPS + flat.max(1, keepdim=True).values)).view_as(cams)


def _reshape_transform(spec: TinySpec):
    """Layer output -> (B, C, h, w), written from the spec, not from cgc_hf.targets."""
    g = spec.grid
    if spec.layout == "NHWC":
        return lambda t: t.permute(0, 3, 1, 2)
    if spec.layout == "NLC":
        return lambda t: (
            t[:, spec.prefix :].reshape(t.shape[0], g, g, t.shape[2]).permute(0, 3, 1, 2)
        )
    return None


class _Logits(nn.Module):
    """transformers classifier -> plain logits tensor, as pytorch_grad_cam expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def _first_weight_layer(model: nn.Module, x: Tensor) -> nn.Module:
    """The first Conv2d / Linear to run on the input (stem or patch embedding)."""
    order: list[nn.Module] = []
    handles = [
        m.register_forward_pre_hook(lambda m, _i: order.append(m))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order[0]


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=arch_id)
def test_target_resolves_with_true_grid(arch):
    model, spec = tiny(arch)
    target = model.target
    assert model.config.target_layer is None  # nothing was named: resolved automatically
    assert target.name in dict(model.backbone.named_modules())
    assert (target.layout, target.num_prefix_tokens) == (spec.layout, spec.prefix)
    model.eval()
    heatmaps = model.explain(images(spec))
    assert heatmaps.shape == (2, spec.grid, spec.grid)
    assert bool((heatmaps >= 0).all())


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=arch_id)
def test_training_step_cgc_gradient_reaches_stem(arch):
    model, spec = tiny(arch)
    x = images(spec, batch=4, seed=1)
    stem = _first_weight_layer(model.backbone, x)
    model.train()
    out = model(x, labels=torch.tensor([0, 1, 2, 0]))
    for key in ("loss", "loss_ce", "loss_cgc"):
        assert torch.isfinite(out[key]), key
    assert float(out["loss_cgc"].detach()) > 0
    model.zero_grad()
    out["loss_cgc"].backward()  # the CGC term alone
    assert stem.weight.grad is not None and float(stem.weight.grad.abs().max()) > 0


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=arch_id)
def test_explain_matches_pytorch_grad_cam(arch):
    model, spec = tiny(arch, cam_method="gradcam")
    calibrate_batchnorm(model.backbone, spec)
    model.eval()  # GradCAM puts the model in eval mode; compare like with like
    x = images(spec, seed=2)
    layer = model.backbone.get_submodule(model.target.name)
    net = model.backbone if model.config.library == "timm" else _Logits(model.backbone)
    informative = 0
    with GradCAM(net, [layer], reshape_transform=_reshape_transform(spec)) as cam:
        for c in range(NUM_LABELS):
            classes = torch.full((x.shape[0],), c)
            targets = [ClassifierOutputTarget(c) for _ in range(x.shape[0])]
            full = cam(input_tensor=x, targets=targets)  # (B, H, W) resized to the input
            # The package's own per-layer map before its resize: weights from its stored
            # activations and gradients, ReLU, then min-max normalisation.
            acts = cam.activations_and_grads.activations[0].numpy()
            grads = cam.activations_and_grads.gradients[0].numpy()
            grid = cam.get_cam_image(x, layer, targets, acts, grads, False)
            ref = torch.from_numpy(scale_cam_image(np.maximum(grid, 0)))  # (B, h, w)

            ours = _min_max(model.explain(x, classes))  # (B, h, w)
            assert ours.shape == ref.shape == (2, spec.grid, spec.grid)
            torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)
            # Image resolution: the package resizes with cv2 (bilinear, half-pixel centres)
            # and normalises again; the same steps on our map must give its output.
            up = F.interpolate(ours[:, None], x.shape[-2:], mode="bilinear", align_corners=False)
            torch.testing.assert_close(
                _min_max(up[:, 0]), torch.from_numpy(full), atol=2e-3, rtol=0
            )
            informative += int(((ref.amax((1, 2)) - ref.amin((1, 2))) > 0.5).sum())
    assert informative > 0  # at least one map that is not constant, or the check is vacuous


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_flip_equivariant_cnn_gives_flipped_heatmap(head):
    torch.manual_seed(0)
    model = CGCModel.from_backbone(FlipNet(head=head))
    assert (model.target.linear_head is not None) == (head == "linear")  # both heatmap paths
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    classes = torch.tensor([0, 1, 2])
    heatmaps = model.explain(x, classes)  # (3, 16, 16)
    flipped = model.explain(x.flip(-1), classes)
    scale = float(heatmaps.max())
    assert float((heatmaps - heatmaps.flip(-1)).abs().max()) > 0.1 * scale  # not symmetric itself
    torch.testing.assert_close(flipped, heatmaps.flip(-1), atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("key", ["levit", "mixer", "maxvit", "vit_token"])
def test_input_size_follows_img_size(key):
    model = tiny_timm(key)
    size = TIMM_TINY[key].image_size
    assert list(model.config.data_config["input_size"]) == [3, size, size]
    rebuilt = CGCModel(model.config.to_dict())  # from the saved description, random weights
    assert rebuilt.explain(images(TIMM_TINY[key])).shape[-1] == TIMM_TINY[key].grid

"""CGC on every supported architecture family, each as a tiny random-init model, offline.

For each family: the target layer resolves by itself, the heatmap has the layer's true grid,
a training step gives a finite loss whose CGC term reaches the stem, and ``explain`` agrees with
an independent Grad-CAM implementation (the ``grad-cam`` package) on the same layer and class.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
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
from cgc_hf.testing import HF_ENCODER, HF_PERCEIVER, first_weight_layer

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
    stem = first_weight_layer(model.backbone, lambda: model.backbone(x))
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


# ------------------------------------------------------------------ the failure kinds of issue 14
def _trains_and_explains(model: CGCModel, grid: tuple[int, int]) -> None:
    """Resolved target, CGC gradient into the first layer, a non-constant heatmap on ``grid``."""
    assert model.config.target_layer is None
    size = tuple(model.config.data_config["input_size"][-2:])
    x = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(0))
    stem = first_weight_layer(model.backbone, lambda: model.adapter.logits(model.backbone, x))
    model.train()
    out = model(x, labels=torch.tensor([0, 1, 2, 0]))
    model.zero_grad()
    out["loss_cgc"].backward()
    assert float(stem.weight.grad.abs().max()) > 0
    model.eval()
    heatmaps = model.explain(x)
    assert heatmaps.shape == (4, *grid)
    spread = heatmaps.flatten(1).amax(1) - heatmaps.flatten(1).amin(1)
    assert float(spread.max()) > 1e-6 * float(heatmaps.max())


_TINY_VIT = dict(patch_size=8, depth=1, embed_dim=32, num_heads=2)


@pytest.mark.parametrize(
    ("name", "kwargs", "side", "stride"),
    [
        ("vit_tiny_patch16_224", _TINY_VIT, 48, 8),
        (
            "levit_128s",
            dict(embed_dim=(16, 32), key_dim=8, depth=(1, 1), num_heads=(2, 2)),
            64,
            32,
        ),
        (
            "swin_tiny_patch4_window7_224",
            dict(window_size=2, depths=(1, 1), num_heads=(1, 2), embed_dim=16),
            32,
            8,
        ),
    ],
)
def test_timm_instance_built_at_a_non_default_size(name, kwargs, side, stride):
    # what users write: timm.create_model(name, img_size=...), then wrap the instance
    torch.manual_seed(0)
    backbone = timm.create_model(name, num_classes=NUM_LABELS, img_size=side, **kwargs)
    model = CGCModel.from_backbone(backbone)
    assert list(model.config.data_config["input_size"]) == [3, side, side]
    calibrate_like_training(model)
    _trains_and_explains(model, (side // stride, side // stride))


def _hf_vision(**fields: int) -> dict:
    return dict(HF_ENCODER, **fields)


def _hf(model_type: str, **fields) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, num_labels=NUM_LABELS, **fields)
    return AutoModelForImageClassification.from_config(config)


@pytest.mark.parametrize(
    ("model_type", "fields", "grid"),
    [
        # a config built at a non-default image_size
        ("vit", _hf_vision(image_size=48, patch_size=8), 6),
        # CLIP / SigLIP vision towers as classifiers: the size sits in vision_config
        (
            "clip",
            dict(vision_config=_hf_vision(image_size=40, patch_size=8), text_config=HF_ENCODER),
            5,
        ),
        (
            "siglip",
            dict(vision_config=_hf_vision(image_size=40, patch_size=8), text_config=HF_ENCODER),
            5,
        ),
        # SigLIP 2 reads flattened patches with their grid (NaFlex), not (B, 3, H, W)
        (
            "siglip2",
            dict(vision_config=_hf_vision(num_patches=16, patch_size=8), text_config=HF_ENCODER),
            4,
        ),
        # hierarchical, with a class token added in the last stage only (stride 16 there)
        (
            "cvt",
            dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], image_size=64),
            4,
        ),
    ],
)
def test_transformers_kinds_resolve_by_structure(model_type, fields, grid):
    model = CGCModel.from_backbone(_hf(model_type, **fields))
    if model_type == "cvt":  # the block's sequence with its class token, not a projection in it
        assert model.target.name.endswith("layers.2.layernorm_before")
        assert model.target.num_prefix_tokens == 1
    _trains_and_explains(model, (grid, grid))


def test_class_attention_is_followed_back_to_the_patch_tokens():
    # CaiT: the last blocks update only the class token, which reads the patch tokens
    torch.manual_seed(0)
    backbone = timm.create_model(
        "cait_xxs24_224",
        num_classes=NUM_LABELS,
        img_size=32,
        patch_size=8,
        depth=1,
        depth_token_only=1,
        embed_dim=32,
        num_heads=2,
    )
    model = CGCModel.from_backbone(backbone)
    assert model.target.name.startswith("blocks_token_only.")
    assert model.target.num_prefix_tokens == 1
    _trains_and_explains(model, (4, 4))


class BroadcastNet(nn.Module):
    """A CNN whose last spatial map is a pooled vector spread back over the grid.

    That map receives gradient from the class score, but its heatmap is the same at every
    position (a global-context branch, or a class token broadcast back in hybrids): the
    target must be the convolution before it.
    """

    def __init__(self, num_classes: int = NUM_LABELS, width: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pretrained_cfg = {
            "architecture": "broadcastnet",
            "input_size": (3, 16, 16),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
        }
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.spread = _Spread()
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.spread(torch.relu(self.conv(x)))  # (B, width, H, W), constant over H, W

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x).mean((2, 3)))

    def get_classifier(self) -> nn.Module:
        return self.fc


class _Spread(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3), keepdim=True).expand_as(x)


def test_a_layer_with_a_flat_heatmap_is_not_the_target():
    torch.manual_seed(0)
    model = CGCModel.from_backbone(BroadcastNet())
    assert model.target.name == "conv"  # not "spread", which gets gradient too
    _trains_and_explains(model, (16, 16))


def calibrate_like_training(model: CGCModel) -> None:
    """Random BatchNorm statistics leave eval-mode LeViT activations flat; estimate them."""
    size = tuple(model.config.data_config["input_size"][-2:])
    spec = TinySpec("", image_size=size[0])
    calibrate_batchnorm(model.backbone, spec)


# ------------------------------------------------------------------ ImageGPT reads colour ids
def _imagegpt(side: int = 8) -> tuple[nn.Module, object]:
    """A tiny ImageGPT classifier and a processor with random clusters (one per id but SOS)."""
    from transformers import ImageGPTImageProcessor

    backbone = _hf("imagegpt", n_embd=32, n_layer=1, n_head=2, n_positions=side * side)
    clusters = torch.rand(backbone.config.vocab_size - 1, 3, generator=_gen()) * 2 - 1
    return backbone, ImageGPTImageProcessor(clusters=clusters, size={"height": side, "width": side})


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _uint8_images(side: int, batch: int = 2) -> list[np.ndarray]:
    pixels = torch.randint(0, 256, (batch, side, side, 3), generator=_gen(), dtype=torch.uint8)
    return list(pixels.numpy())


def test_imagegpt_reads_the_colour_ids_its_processor_makes(tmp_path):
    backbone, processor = _imagegpt()
    with pytest.raises(ValueError, match="image_processor=ImageGPTImageProcessor") as err:
        CGCModel.from_backbone(backbone)  # an instance without its clusters
    assert "\n" not in str(err.value)

    model = CGCModel.from_backbone(backbone, image_processor=processor)
    assert list(model.config.data_config["input_size"]) == [3, 8, 8]
    assert model.config.data_config["mean"] == [0.5, 0.5, 0.5]  # the processor's [-1, 1]
    # the reference: the processor's own ids, read by the model itself
    raw = _uint8_images(8)
    ids = processor(raw, return_tensors="pt")["input_ids"]
    pixels = processor(raw, do_color_quantize=False, return_tensors="pt")["pixel_values"]
    model.eval()
    with torch.no_grad():
        expected = backbone(input_ids=ids).logits
        assert torch.allclose(model(pixels)["logits"], expected, atol=1e-6)

    # the heatmap lives on the pixel grid of a transformer layer; the CGC gradient reaches wte
    assert model.target.layout == "NLC" and model.target.num_prefix_tokens == 0
    stem = first_weight_layer(model.backbone, lambda: model.adapter.logits(model.backbone, pixels))
    assert stem is backbone.transformer.wte
    _trains_and_explains(model, (8, 8))

    # the clusters travel with the saved description and with the exported folder, not with
    # the weights, and a cast of the weights leaves them exact
    assert not any("cluster" in key for key in model.state_dict())
    model.half().float()
    assert torch.equal(model.backbone.color_clusters, processor.clusters)
    rebuilt = CGCModel(model.config.to_dict())
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(pixels)["logits"], model(pixels)["logits"], atol=1e-6)
    folder = model.export_backbone(tmp_path / "exported")
    from_folder = CGCModel.from_backbone(str(folder))  # its processor is loaded with it
    from transformers import AutoImageProcessor

    saved = AutoImageProcessor.from_pretrained(str(folder))
    assert torch.equal(saved(raw, return_tensors="pt")["input_ids"], ids)
    # an instance loaded from the folder finds the processor saved beside it
    from_instance = CGCModel.from_backbone(type(backbone).from_pretrained(str(folder)))
    for loaded in (from_folder, from_instance):
        loaded.eval()
        with torch.no_grad():
            assert torch.allclose(loaded(pixels)["logits"], model(pixels)["logits"], atol=1e-6)


def test_imagegpt_explain_matches_pytorch_grad_cam():
    from transformers.models.imagegpt.image_processing_imagegpt import color_quantize_torch

    backbone, processor = _imagegpt()
    model = CGCModel.from_backbone(backbone, image_processor=processor, cam_method="gradcam")
    model.eval()

    class FromPixels(nn.Module):  # the processor's own quantisation, then the classifier
        def __init__(self) -> None:
            super().__init__()
            self.model = backbone

        def forward(self, x: Tensor) -> Tensor:
            ids = color_quantize_torch(x.permute(0, 2, 3, 1).reshape(-1, 3), processor.clusters)
            return self.model(input_ids=ids.reshape(x.shape[0], -1)).logits

    x = torch.rand(2, 3, 8, 8, generator=_gen()) * 2 - 1
    layer = backbone.get_submodule(model.target.name)
    informative = 0
    with GradCAM(
        FromPixels(),
        [layer],
        reshape_transform=lambda t: t.reshape(2, 8, 8, -1).permute(0, 3, 1, 2),
    ) as cam:
        for c in range(NUM_LABELS):
            targets = [ClassifierOutputTarget(c) for _ in range(2)]
            cam(input_tensor=x, targets=targets)
            acts = cam.activations_and_grads.activations[0].numpy()
            grads = cam.activations_and_grads.gradients[0].numpy()
            grid = cam.get_cam_image(x, layer, targets, acts, grads, False)
            ref = torch.from_numpy(scale_cam_image(np.maximum(grid, 0)))  # (2, 8, 8)
            ours = _min_max(model.explain(x, torch.full((2,), c)))
            torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)
            informative += int(((ref.amax((1, 2)) - ref.amin((1, 2))) > 0.5).sum())
    assert informative > 0


def test_an_image_processor_given_sets_the_preprocessing():
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3, size=32)
    model = CGCModel.from_backbone(
        _hf("vit", **_hf_vision(image_size=32, patch_size=8)), image_processor=processor
    )
    assert model.config.data_config["mean"] == [0.5] * 3
    assert model.config.data_config["std"] == [0.25] * 3
    backbone = timm.create_model("resnet18", num_classes=NUM_LABELS, pretrained=False)
    with pytest.raises(ValueError, match="image_processor is for transformers models"):
        CGCModel.from_backbone(backbone, image_processor=processor)


def test_learned_latents_are_not_an_image_grid():
    # Perceiver: 16 learned latents (which would make a 4 x 4 "grid") read the image's tokens
    from transformers import PerceiverConfig, PerceiverForImageClassificationLearned

    torch.manual_seed(0)
    config = PerceiverConfig(num_labels=NUM_LABELS, **HF_PERCEIVER)
    model = CGCModel.from_backbone(PerceiverForImageClassificationLearned(config))
    assert model.target.name == "perceiver.encoder.cross_attention.attention.self.layernorm2"
    _trains_and_explains(model, (32, 32))  # one token per pixel, as the latents read them


class OneSignNet(nn.Module):
    """A CNN whose last map reaches the class score with one sign at every position.

    The last stage outputs ``-softplus(conv(h)) <= 0`` and the classifier's weights are
    non-negative, so ``dscore/dA * A <= 0`` everywhere: that map receives gradient and varies
    between images, yet every heatmap after the ReLU is all zero (a coarse class-token stage at
    random init is like this for most images). The target must be the stage before it.
    """

    def __init__(self, num_classes: int = NUM_LABELS, width: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pretrained_cfg = {
            "architecture": "onesignnet",
            "input_size": (3, 16, 16),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
        }
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.last = nn.Sequential(nn.Conv2d(width, width, 4, stride=4), _NegativeSoftplus())
        self.fc = nn.Linear(width, num_classes)
        with torch.no_grad():
            self.fc.weight.abs_()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.last(self.stem(x))  # (B, width, H / 4, W / 4), <= 0

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x).mean((2, 3)))

    def get_classifier(self) -> nn.Module:
        return self.fc


class _NegativeSoftplus(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return -F.softplus(x)


def test_a_stage_whose_heatmaps_are_all_zero_is_not_the_target():
    torch.manual_seed(0)
    model = CGCModel.from_backbone(OneSignNet())
    assert model.target.name.startswith("stem")  # not "last", which gets gradient too
    _trains_and_explains(model, (16, 16))


@pytest.mark.parametrize(
    ("name", "grid"),
    [
        # PiT at 64 px: stages of 7 x 7, 4 x 4 and 2 x 2 tokens, each with a class token
        ("pit_ti_224", 4),
        # ResNet stem of stride 4, then 8 x 8 patches: a 2 x 2 ViT after a 16 x 16 map
        ("vit_tiny_r_s16_p8_224", 16),
    ],
)
def test_a_coarse_last_stage_with_constant_heatmaps_falls_back_a_stage(name, grid):
    # at 64 px the last stage is 2 x 2 and at random init its heatmaps are mostly all zero
    torch.manual_seed(0)
    model = CGCModel.from_backbone(timm.create_model(name, num_classes=NUM_LABELS, img_size=64))
    calibrate_like_training(model)
    _trains_and_explains(model, (grid, grid))

"""Target-layer resolution: overrides, errors that say what to do, and the closed-form CAM."""

from __future__ import annotations

import weakref

import pytest
import timm
import torch
from conftest import HF_TINY, TIMM_TINY, TinySpec, images, tiny, tiny_hf, tiny_timm
from torch import Tensor

from cgc_hf import CGCModel, TargetLayer, TargetLayerError, probe, resolve_target
from cgc_hf.backbones import target_hints
from cgc_hf.target_layer import to_nchw, token_grid


def _layer_and_grad(
    model: CGCModel, x: Tensor, classes: Tensor, name: str
) -> tuple[Tensor, Tensor]:
    """Output of module ``name`` and d(class score)/d(output), by plain autograd."""
    store: list[Tensor] = []
    handle = model.backbone.get_submodule(name).register_forward_hook(
        lambda _m, _i, out: store.append(out)
    )
    try:
        logits = model(x)["logits"]  # (B, K)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), store[-1])
    return store[-1], grad


def _to_grid(t: Tensor, spec: TinySpec) -> Tensor:
    """(B, C, h, w) from the spec's layout, written independently of cgc_hf.targets."""
    if spec.layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    if spec.layout == "NLC":
        g = spec.grid
        return t[:, spec.prefix :].reshape(t.shape[0], g, g, t.shape[2]).permute(0, 3, 1, 2)
    return t


def test_override_by_module_name():
    model = tiny_timm("resnet", target_layer="layer3")
    assert model.target.name == "layer3"
    assert model.target.linear_head is None  # layer4 runs between layer3 and the head
    model.eval()
    assert model.explain(images(TIMM_TINY["resnet"])).shape == (2, 4, 4)  # stride 16 at 64 px
    assert model.set_target_layer(None).name == "layer4"  # back to the automatic choice
    assert model.config.target_layer is None and model.config.target["name"] == "layer4"

    hf = tiny_hf("vit", target_layer="vit.layers.0.layernorm_before")
    assert (hf.target.name, hf.target.num_prefix_tokens) == ("vit.layers.0.layernorm_before", 1)


def test_unknown_name_raises_with_close_matches():
    with pytest.raises(TargetLayerError) as err:
        tiny_timm("resnet", target_layer="layer5")
    message = str(err.value)
    assert "'layer5'" in message and "Close matches" in message and "'layer4'" in message
    assert isinstance(err.value, ValueError)


def test_non_spatial_layer_raises():
    with pytest.raises(TargetLayerError, match="not a spatial map"):
        tiny_timm("resnet", target_layer="fc")


@pytest.mark.parametrize(
    ("arch", "block", "norm"),
    [
        (("timm", "vit_token"), "blocks.1", "blocks.1.norm1"),
        (("transformers", "vit"), "vit.layers.1", "vit.layers.1.layernorm_before"),
    ],
    ids=["timm-vit", "hf-vit"],
)
def test_class_token_vit_last_block_output_raises_naming_the_norm(arch, block, norm):
    model, spec = tiny(arch)
    assert model.target.name == norm  # the automatic choice (not an attention projection)
    model.eval()
    x, classes = images(spec), torch.tensor([0, 1])
    # The premise, measured: only the class token of the last block's output reaches the head.
    out, grad = _layer_and_grad(model, x, classes, block)
    assert float(grad[:, spec.prefix :].abs().max()) == 0.0
    assert float(grad[:, 0].abs().max()) > 0
    _, grad_norm = _layer_and_grad(model, x, classes, norm)
    assert float(grad_norm[:, spec.prefix :].abs().max()) > 0

    with pytest.raises(TargetLayerError) as err:
        model.set_target_layer(block)
    assert "zero gradient" in str(err.value) and f"target_layer={norm!r}" in str(err.value)
    assert model.target.name == norm  # a failed override leaves the model as it was


@pytest.mark.parametrize(
    ("arch", "head"),
    [
        (("timm", "resnet"), "fc"),
        (("timm", "swin"), "head.fc"),
        (("timm", "mixer"), "head"),
        (("transformers", "resnet"), "classifier.1"),
        (("transformers", "swin"), "classifier"),
    ],
    ids=["timm-resnet", "timm-swin-nhwc", "timm-mixer-tokens", "hf-resnet", "hf-swin"],
)
@pytest.mark.parametrize("method", ["grad_x_act", "gradcam"])
def test_linear_head_closed_form_equals_autograd(arch, head, method):
    model, spec = tiny(arch, cam_method=method)
    assert model.target.linear_head == head
    model.eval()
    x, classes = images(spec, seed=3), torch.tensor([2, 0])
    acts, grads = _layer_and_grad(model, x, classes, model.target.name)
    a, g = _to_grid(acts, spec), _to_grid(grads, spec)  # (B, C, h, w) each
    if method == "gradcam":
        g = g.mean((2, 3), keepdim=True)
    reference = torch.relu((g * a).sum(1))  # (B, h, w), Grad-CAM from its definition
    heatmaps = model.explain(x, classes)  # closed form: no autograd call
    assert float(reference.max()) > 0
    torch.testing.assert_close(heatmaps, reference, rtol=1e-4, atol=1e-6 * float(reference.max()))


@pytest.mark.parametrize(
    "arch",
    [
        ("timm", "convnext"),
        ("timm", "vit_token"),
        ("timm", "vit_avg"),
        ("timm", "vgg"),
        ("transformers", "convnext"),
        ("transformers", "vit"),
        ("transformers", "dinov2"),
    ],
    ids=lambda a: f"{a[0]}-{a[1]}",
)
def test_linear_head_not_set_for_other_heads(arch):
    model, _ = tiny(arch)  # norm after pooling, class-token head, MLP head, cls+mean concat
    assert model.target.linear_head is None


def test_zero_initialised_classifier_still_resolves_and_stays_zero():
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=3, **TIMM_TINY["resnet"].kwargs)
    torch.nn.init.zeros_(net.fc.weight)  # as timm does for MLP-Mixer heads
    target = resolve_target(net, net, torch.randn(2, 3, 64, 64))
    assert (target.name, target.linear_head) == ("layer4", "fc")
    assert not bool(net.fc.weight.any())  # the probe's temporary weights were removed


def test_probe_keeps_mode_and_batchnorm_statistics():
    import timm

    net = timm.create_model("resnet18", num_classes=3, **TIMM_TINY["resnet"].kwargs).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    resolve_target(net, net, torch.randn(2, 3, 64, 64))
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_register_tokens_found_without_hint():
    """4 registers + class token + 4x4 patches = 21 tokens; 21 - 1 = 20 = 4x5 must not win."""
    from transformers import AutoModelForImageClassification, Dinov2WithRegistersConfig

    config = Dinov2WithRegistersConfig(num_labels=3, num_register_tokens=4, **HF_TINY["vit"].kwargs)
    model = CGCModel.from_backbone(AutoModelForImageClassification.from_config(config))
    assert (model.target.layout, model.target.num_prefix_tokens) == ("NLC", 5)
    assert model.explain(torch.randn(2, 3, 32, 32)).shape == (2, 4, 4)


def test_token_layout_conversion_on_non_square_input():
    assert token_grid(12, (48, 64)) == (3, 4)
    target = TargetLayer("x", "NLC", num_prefix_tokens=2)
    tokens = torch.arange(2 * 14 * 5, dtype=torch.float32).view(2, 14, 5)  # (B, 2 + 3*4, C)
    grid = to_nchw(tokens, target, (48, 64))  # (B, C, 3, 4)
    assert grid.shape == (2, 5, 3, 4)
    # token 2 + r * 4 + c sits at row r, column c (row-major patches)
    assert torch.equal(grid[1, :, 2, 1], tokens[1, 2 + 2 * 4 + 1])
    assert TargetLayer.from_dict(target.to_dict()) == target


def test_timm_wrapper_hints_and_register_tokens():
    from transformers import AutoModelForImageClassification, TimmWrapperConfig

    config = TimmWrapperConfig(
        architecture=TIMM_TINY["vit_registers"].name,
        model_args=dict(TIMM_TINY["vit_registers"].kwargs),
        num_labels=3,
    )
    backbone = AutoModelForImageClassification.from_config(config)
    assert target_hints(backbone) == (None, 5)  # read from the wrapped timm model
    assert target_hints(tiny_timm("swin").backbone) == ("NHWC", None)
    model = CGCModel.from_backbone(backbone)
    assert (model.target.name, model.target.num_prefix_tokens) == ("timm_model.blocks.1.norm1", 5)
    assert model.explain(torch.randn(2, 3, 28, 28)).shape == (2, 4, 4)


class _TokenLabellingNet(torch.nn.Module):
    """Patch tokens -> norm; logits = mean-token head + max over a per-token classifier."""

    def __init__(self, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, width, 4, stride=4)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, classes)
        self.aux_head = torch.nn.Linear(width, classes)  # (B, N, K): class scores per token

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.norm(self.patch(x).flatten(2).transpose(1, 2))  # (B, N, C)
        return self.head(tokens.mean(1)) + self.aux_head(tokens).amax(1)  # (B, K)


def test_per_token_classifier_is_not_taken_for_features():
    torch.manual_seed(0)
    net = _TokenLabellingNet()
    target = resolve_target(net, net, torch.randn(2, 3, 16, 16))
    assert (target.name, target.layout) == ("norm", "NLC")


def _pit() -> CGCModel:
    """PiT at 64 px: its 2 x 2 last stage's heatmaps are constant, the stage before is chosen."""
    torch.manual_seed(0)
    return CGCModel.from_backbone(timm.create_model("pit_ti_224", num_classes=3, img_size=64))


PROBED = {
    "timm-vit_token": lambda: tiny(("timm", "vit_token"))[0],
    "timm-resnet": lambda: tiny(("timm", "resnet"))[0],
    "timm-levit": lambda: tiny(("timm", "levit"))[0],
    "hf-swin": lambda: tiny(("transformers", "swin"))[0],
    "hf-perceiver": lambda: tiny(("transformers", "perceiver"))[0],  # learned latents
    "timm-pit": _pit,  # the earlier-stage fallback
}


@pytest.mark.parametrize("key", PROBED)
@pytest.mark.parametrize("knob", ["GRAD_BYTES", "images_per_pass"])
def test_a_probe_split_into_small_parts_chooses_the_same_target(key, knob, monkeypatch):
    """The probe bounds what it holds at once: candidate gradients in backward passes of at
    most 1 GiB, and large images a few per forward pass (a ViT at 768 px holds 8.6 GB an
    image). One candidate per backward pass, or one image per forward pass, must choose what
    one pass over everything does."""
    reference = PROBED[key]().target
    calls = []
    if knob == "GRAD_BYTES":
        groups = probe.groups

        def counted(*args):
            for group in groups(*args):
                calls.append(len(group))
                yield group

        monkeypatch.setattr(probe, "GRAD_BYTES", 1)  # one candidate per backward pass
        monkeypatch.setattr(probe, "groups", counted)
    else:
        maps = probe.probe_maps
        earlier: list[weakref.ref] = []  # an output of each earlier pass

        def one_image(score, described, size):
            calls.append(described[0][0].tensor.shape[0])
            # each pass's graph is gone before the next pass's is differentiated
            assert all(ref() is None for ref in earlier)
            earlier.append(weakref.ref(described[0][0].tensor))
            return maps(score, described, size)

        monkeypatch.setattr(probe, "images_per_pass", lambda size: 1)
        monkeypatch.setattr(probe, "probe_maps", one_image)
    assert PROBED[key]().target == reference
    assert len(calls) > 1 and set(calls) == {1}

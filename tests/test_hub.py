"""Hub round trip: save_pretrained / from_pretrained / push_to_hub / export_backbone / card."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from conftest import FakeHfApi, fake_snapshot
from transformers import (
    AutoModelForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import cgc_hf.hub as hub
from cgc_hf import CGCModel, CheckpointError, model_card
from cgc_hf.testing import HF_SWIN, HF_VIT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

LABELS = {0: "cat", 1: "dog", 2: "bird"}
SIZE = 32
TOKEN = "hf_SECRETtoken0123456789abcdef"


def timm_resnet() -> CGCModel:
    return CGCModel.from_backbone(
        "resnet18", id2label=LABELS, pretrained=False, model_kwargs={"layers": (1, 1, 1, 1)}
    )


def timm_vit() -> CGCModel:  # class-token ViT: explained at blocks[-1].norm1, prefix dropped
    kwargs = {"img_size": SIZE, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    return CGCModel.from_backbone(
        "vit_tiny_patch16_224", id2label=LABELS, pretrained=False, model_kwargs=kwargs
    )


def timm_swin() -> CGCModel:  # NHWC features
    kwargs = {
        "img_size": SIZE,
        "patch_size": 4,
        "window_size": 4,
        "depths": (1, 1),
        "num_heads": (1, 2),
        "embed_dim": 16,
    }
    return CGCModel.from_backbone(
        "swin_tiny_patch4_window7_224", id2label=LABELS, pretrained=False, model_kwargs=kwargs
    )


def hf_vit() -> CGCModel:
    config = ViTConfig(**dict(HF_VIT, image_size=SIZE), num_labels=3, id2label=LABELS)
    return CGCModel.from_backbone(ViTForImageClassification(config))


def hf_swin() -> CGCModel:
    fields = dict(HF_SWIN, image_size=SIZE, window_size=4)
    config = SwinConfig(**fields, num_labels=3, id2label=LABELS)
    return CGCModel.from_backbone(SwinForImageClassification(config))


BUILDERS = {
    "timm-resnet": timm_resnet,
    "timm-vit": timm_vit,
    "timm-swin": timm_swin,
    "hf-vit": hf_vit,
    "hf-swin": hf_swin,
}


def trained_like(model: CGCModel, seed: int = 0) -> CGCModel:
    """Move every weight and buffer away from its initial value, as fine-tuning would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.mul_(1.25).add_(0.05 * torch.randn(t.shape, generator=gen))
    return model.eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def logits(model: CGCModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)["logits"]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connection or Hub download fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hub, "snapshot_download", refuse)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[CGCModel, Path]:
    model = trained_like(timm_resnet())
    folder = model.save_pretrained(tmp_path_factory.mktemp("saved") / "model")
    return model, folder


# ---------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", list(BUILDERS))
def test_round_trip_gives_same_logits_and_heatmaps(name: str, tmp_path: Path, no_network) -> None:
    model = trained_like(BUILDERS[name]())
    model.save_pretrained(tmp_path / "m")
    loaded = CGCModel.from_pretrained(tmp_path / "m")

    assert not loaded.training  # documented: loaded for inference
    assert loaded.config.to_dict() == json.loads(model.config.to_json())
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    x = images()
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert torch.equal(loaded.explain(x), model.explain(x))
    classes = torch.tensor([2, 0])
    assert torch.equal(loaded.explain(x, classes), model.explain(x, classes))


def test_config_json_describes_everything_to_rebuild(saved) -> None:
    model, folder = saved
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["cgc_hf_format_version"] == hub.FORMAT_VERSION
    assert cfg["library"] == "timm" and cfg["architecture"] == "resnet18"
    assert cfg["backbone_config"]["model_kwargs"]["layers"] == [1, 1, 1, 1]
    assert cfg["id2label"] == {"0": "cat", "1": "dog", "2": "bird"}
    assert cfg["label2id"] == {"cat": 0, "dog": 1, "bird": 2}
    assert cfg["target"]["name"] == "layer4"
    assert cfg["data_config"]["input_size"] == [3, 224, 224]
    assert cfg["cgc_lambda"] == 0.5 and cfg["temperature"] == 0.5
    with safetensors.safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(model.state_dict())


def test_rebuilding_never_downloads_backbone_weights(saved, monkeypatch, no_network) -> None:
    _, folder = saved
    real = timm.create_model
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("pretrained"))
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    CGCModel.from_pretrained(folder)
    assert calls == [False]


# ---------------------------------------------------------------------------------- saving
def test_timm_instance_with_hidden_constructor_args_round_trips(tmp_path: Path) -> None:
    # timm records the constructor arguments on the model, so an instance built with
    # non-default ones (here two-block stages) rebuilds exactly without the user naming them.
    backbone = timm.create_model("resnet18", num_classes=3, layers=(1, 1, 1, 1))
    model = trained_like(CGCModel.from_backbone(backbone)).eval()
    model.save_pretrained(tmp_path / "m")
    x = images()
    assert torch.equal(logits(CGCModel.from_pretrained(tmp_path / "m"), x), logits(model, x))


def test_timm_instance_with_unsaveable_constructor_args_is_refused(tmp_path: Path) -> None:
    # A layer class cannot go into JSON, and the state dict would not reveal the difference
    # (same keys and shapes), so saving refuses instead of writing a model that reloads wrong.
    backbone = timm.create_model("resnet18", num_classes=3, act_layer=torch.nn.LeakyReLU)
    model = CGCModel.from_backbone(backbone)
    with pytest.raises(CheckpointError, match=r"\['act_layer'\].*model_kwargs="):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_never_writes_a_folder_that_cannot_be_loaded(tmp_path: Path) -> None:
    """A backbone from a timm 'local-dir:' export: either it round-trips or saving refuses."""
    export = trained_like(timm_vit()).export_backbone(tmp_path / "plain")
    model = CGCModel.from_backbone(f"local-dir:{export}").eval()
    try:
        model.save_pretrained(tmp_path / "m")
    except CheckpointError as err:
        assert "model_kwargs=" in str(err) and not (tmp_path / "m").exists()
        return
    x = images()
    assert torch.equal(logits(CGCModel.from_pretrained(tmp_path / "m"), x), logits(model, x))


def test_timm_instance_with_default_args_round_trips(tmp_path: Path) -> None:
    model = trained_like(CGCModel.from_backbone(timm.create_model("test_resnet", num_classes=3)))
    model.save_pretrained(tmp_path / "m")
    loaded = CGCModel.from_pretrained(tmp_path / "m")
    x = images()
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_failed_save_leaves_no_half_written_folder(saved, tmp_path, monkeypatch) -> None:
    model, _ = saved

    def fail(module, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hub.safetensors.torch, "save_model", fail)
    with pytest.raises(CheckpointError, match="disk full"):
        model.save_pretrained(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one

    monkeypatch.undo()
    earlier = model.save_pretrained(tmp_path / "earlier")
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    monkeypatch.setattr(hub.safetensors.torch, "save_model", fail)
    with pytest.raises(CheckpointError):
        model.save_pretrained(earlier)
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["earlier"]


def test_save_replaces_an_earlier_save_but_not_other_folders(saved, tmp_path) -> None:
    model, _ = saved
    folder = tmp_path / "m"
    timm_vit().save_pretrained(folder)
    model.save_pretrained(folder)  # replaces the earlier save whole
    assert CGCModel.from_pretrained(folder).config.architecture == "resnet18"

    other = tmp_path / "run"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="notes.txt"):
        model.save_pretrained(other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------------------------- loading
def test_missing_and_unexpected_keys_are_listed(saved, tmp_path, caplog) -> None:
    model, folder = saved
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    state = safetensors.torch.load_file(str(bad / "model.safetensors"))
    del state["backbone.fc.bias"]
    state["backbone.extra.weight"] = torch.zeros(2)
    safetensors.torch.save_file(state, str(bad / "model.safetensors"))

    with pytest.raises(CheckpointError, match="backbone.fc.bias") as err:
        CGCModel.from_pretrained(bad)
    assert "backbone.extra.weight" in str(err.value)

    with caplog.at_level(logging.WARNING, logger="cgc_hf"):
        loaded = CGCModel.from_pretrained(bad, strict=False)
    assert "backbone.fc.bias" in caplog.text
    assert torch.equal(loaded.backbone.fc.weight, model.backbone.fc.weight)


def test_shape_mismatch_is_a_checkpoint_error(saved, tmp_path) -> None:
    _, folder = saved
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    state = safetensors.torch.load_file(str(bad / "model.safetensors"))
    state["backbone.fc.weight"] = torch.zeros(5, 512)
    safetensors.torch.save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"backbone.fc.weight: saved \(5, 512\)"):
        CGCModel.from_pretrained(bad, strict=False)  # shapes must match even when not strict


def test_num_labels_mismatch_is_a_clear_error(saved) -> None:
    _, folder = saved
    with pytest.raises(CheckpointError, match="num_labels=5 was requested.*num_labels=3"):
        CGCModel.from_pretrained(folder, num_labels=5)
    assert CGCModel.from_pretrained(folder, num_labels=3).num_labels == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_weights_are_a_checkpoint_error(saved, tmp_path, damage: str) -> None:
    _, folder = saved
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 50, "empty": b""}
    weights.write_bytes(damaged[damage])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        CGCModel.from_pretrained(bad)


def test_pickle_weights_need_allow_pickle_and_load_weights_only(saved, tmp_path, monkeypatch):
    model, folder = saved
    pick = tmp_path / "pickled"
    pick.mkdir()
    shutil.copy(folder / "config.json", pick)
    torch.save(model.state_dict(), pick / "pytorch_model.bin")

    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        CGCModel.from_pretrained(pick)

    real_load, seen = torch.load, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = CGCModel.from_pretrained(pick, allow_pickle=True)
    assert seen == [True]
    x = images()
    assert torch.equal(logits(loaded, x), logits(model, x))


class _RunsCode:
    def __reduce__(self):
        return (os.makedirs, ("/tmp/cgc_hf_pickle_ran_code",))


def test_malicious_pickle_is_not_executed(saved, tmp_path) -> None:
    _, folder = saved
    pick = tmp_path / "evil"
    pick.mkdir()
    shutil.copy(folder / "config.json", pick)
    (pick / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _RunsCode()}, protocol=2))
    marker = Path("/tmp/cgc_hf_pickle_ran_code")
    shutil.rmtree(marker, ignore_errors=True)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        CGCModel.from_pretrained(pick, allow_pickle=True)
    assert not marker.exists()


def test_plain_export_or_newer_format_is_refused(saved, tmp_path) -> None:
    model, folder = saved
    export = model.export_backbone(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="not a cgc_hf config.*from_backbone"):
        CGCModel.from_pretrained(export)

    newer = tmp_path / "newer"
    shutil.copytree(folder, newer)
    cfg = json.loads((newer / "config.json").read_text())
    cfg["cgc_hf_format_version"] = hub.FORMAT_VERSION + 1
    (newer / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="Upgrade cgc_hf"):
        CGCModel.from_pretrained(newer)


def test_missing_path_is_neither_folder_nor_repo_id(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="neither an existing local folder nor a Hub repo"):
        CGCModel.from_pretrained(str(tmp_path / "no" / "such" / "model"))


# ---------------------------------------------------------------------------------- Hub cache
def test_load_from_hub_cache_offline(saved, tmp_path, monkeypatch, caplog) -> None:
    model, folder = saved
    cache = tmp_path / "hf-cache"
    fake_snapshot(cache, "org/cgc-resnet", folder)
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("network access"))
    x = images()

    caplog.set_level(logging.DEBUG)
    loaded = CGCModel.from_pretrained(
        "org/cgc-resnet", cache_dir=cache, local_files_only=True, token=TOKEN
    )
    assert torch.equal(logits(loaded, x), logits(model, x))
    by_commit = CGCModel.from_pretrained(
        "org/cgc-resnet", cache_dir=cache, revision="a" * 40, local_files_only=True
    )
    assert torch.equal(logits(by_commit, x), logits(model, x))
    assert TOKEN not in caplog.text

    with pytest.raises(CheckpointError, match="not in the local cache; local_files_only"):
        CGCModel.from_pretrained("org/missing", cache_dir=cache, local_files_only=True)


def test_hf_hub_offline_env_is_honoured(saved, tmp_path, monkeypatch) -> None:
    model, folder = saved
    cache = tmp_path / "hf-cache"
    fake_snapshot(cache, "org/cgc-resnet", folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    real = hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs["local_files_only"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", spy)
    loaded = CGCModel.from_pretrained("org/cgc-resnet", cache_dir=cache)  # local_files_only unset
    assert calls == [True]
    assert torch.equal(logits(loaded, images()), logits(model, images()))
    with pytest.raises(CheckpointError, match="not in the local cache.*HF_HUB_OFFLINE=1"):
        CGCModel.from_pretrained("org/missing", cache_dir=cache)


# ---------------------------------------------------------------------------------- push
def test_push_to_hub_uploads_the_saved_folder(saved, tmp_path, monkeypatch, caplog) -> None:
    model, _ = saved
    FakeHfApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    figure = tmp_path / "heatmaps.png"
    figure.write_bytes(b"\x89PNG fake image")
    caplog.set_level(logging.DEBUG)

    url = model.push_to_hub(
        "org/cgc",
        private=True,
        token=TOKEN,
        commit_message="first model",
        create_pr=True,
        metrics={"accuracy": 0.75},
        dataset="cub",
        figure=figure,
    )

    (api,) = FakeHfApi.instances
    assert url == "https://huggingface.co/org/cgc/commit/123"
    assert api.token == TOKEN  # the token reaches the client...
    (create_name, create), (upload_name, upload) = api.calls
    assert create_name == "create_repo" and upload_name == "upload_folder"
    assert create["repo_id"] == "org/cgc" and create["private"] is True
    assert create["exist_ok"] is True
    assert upload["repo_id"] == "org/cgc" and upload["commit_message"] == "first model"
    assert upload["create_pr"] is True
    assert set(api.files) == {"config.json", "model.safetensors", "README.md", "heatmaps.png"}
    assert all(TOKEN.encode() not in data for data in api.files.values())  # ...never a file
    assert TOKEN not in caplog.text  # ...nor a log line
    readme = api.files["README.md"].decode()
    assert 'CGCModel.from_pretrained("org/cgc")' in readme and "(heatmaps.png)" in readme

    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, data in api.files.items():
        (pushed / name).write_bytes(data)
    x = images()
    assert torch.equal(logits(CGCModel.from_pretrained(pushed), x), logits(model, x))


# ---------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["timm-resnet", "timm-vit", "timm-swin"])
def test_timm_export_loads_with_plain_timm(name: str, tmp_path: Path) -> None:
    model = trained_like(BUILDERS[name]())
    folder = model.export_backbone(tmp_path / "plain")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == model.config.architecture and cfg["num_classes"] == 3
    assert cfg["label_names"] == ["cat", "dog", "bird"]

    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = images()
    with torch.no_grad():
        # plain timm keeps fused attention, CGC turns it off: equal up to float rounding
        torch.testing.assert_close(plain(x), logits(model, x), rtol=1e-5, atol=1e-5)
    assert plain.pretrained_cfg["label_names"] == ["cat", "dog", "bird"]


@pytest.mark.parametrize("name", ["hf-vit", "hf-swin"])
def test_transformers_export_loads_with_auto_class(name: str, tmp_path: Path) -> None:
    model = trained_like(BUILDERS[name]())
    folder = model.export_backbone(tmp_path / "plain")
    plain = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(plain) is type(model.backbone)
    assert plain.config.id2label == LABELS
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=x).logits, logits(model, x))


def test_export_after_loading_matches_and_replaces_earlier_export(saved, tmp_path) -> None:
    model, folder = saved
    loaded = CGCModel.from_pretrained(folder)
    out = tmp_path / "plain"
    timm_vit().export_backbone(out)
    loaded.export_backbone(out)  # an earlier export is replaced whole
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(plain(x), logits(model, x))


# ---------------------------------------------------------------------------------- card
def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_front_matter_and_sections(saved) -> None:
    model, _ = saved
    text = model_card(
        model.config,
        base_model="timm/resnet18.a1_in1k",
        dataset="bentrevett/caltech-ucsd-birds-200-2011",
        label_setting="10 labels per class",
        metrics={"eval_accuracy": 0.8125, "content_heatmap": 61.5},
        repo_id="org/cgc",
    )
    meta = front_matter(text)
    assert meta["library_name"] == "cgc_hf"
    assert meta["pipeline_tag"] == "image-classification"
    assert meta["tags"] == ["cgc", "grad-cam", "explainability", "image-classification", "timm"]
    assert meta["base_model"] == "timm/resnet18.a1_in1k"
    assert meta["datasets"] == ["bentrevett/caltech-ucsd-birds-200-2011"]
    results = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for r in results for m in r["metrics"]} == {
        "accuracy": 0.8125,
        "content_heatmap": 61.5,
    }
    assert "| Top-1 accuracy (%) | 0.8125 |" in text
    assert "| Content Heatmap (%) | 61.5 |" in text
    assert "| label setting | 10 labels per class |" in text
    assert "| `cgc_lambda` | 0.5 |" in text and "| `temperature` | 0.5 |" in text
    assert 'CGCModel.from_pretrained("org/cgc")' in text
    assert 'timm.create_model("local-dir:' in text
    for cite in ("Pillai, Vipin", "Koohpayegani", "Ouligian", "Fong", "Pirsiavash", "2110.00527"):
        assert cite in text
    assert "Consistent Explanations by Contrastive Learning" in text and "CVPR" in text


def test_model_card_for_transformers_shows_its_plain_loader() -> None:
    model = hf_vit()
    meta_text = model_card(model.config, metrics={})
    assert front_matter(meta_text)["tags"][-1] == "transformers"
    assert 'AutoModelForImageClassification.from_pretrained("exported")' in meta_text
    assert "No evaluation results" in meta_text


def test_save_pretrained_writes_card_and_copies_figure(saved, tmp_path) -> None:
    model, _ = saved
    figure = tmp_path / "cam_grid.png"
    figure.write_bytes(b"\x89PNG fake image")
    folder = model.save_pretrained(
        tmp_path / "m",
        metrics={"accuracy": 0.5},
        base_model="timm/resnet18.a1_in1k",
        dataset="cub",
        label_setting="1% labels",
        figure=figure,
    )
    assert (folder / "cam_grid.png").read_bytes() == figure.read_bytes()
    text = (folder / "README.md").read_text()
    assert "![Grad-CAM heatmaps of the fine-tuned model](cam_grid.png)" in text
    assert front_matter(text)["base_model"] == "timm/resnet18.a1_in1k"
    assert "1% labels" in text


# ---------------------------------------------------------------------------------- users' habits
def test_transformers_export_runs_in_the_image_classification_pipeline(tmp_path: Path) -> None:
    from PIL import Image
    from transformers import pipeline

    from cgc_hf import build_transform

    model = trained_like(hf_vit())
    folder = model.export_backbone(tmp_path / "plain")
    assert (folder / "preprocessor_config.json").is_file()
    classify = pipeline("image-classification", model=str(folder), device="cpu")
    rng = torch.Generator().manual_seed(3)
    image = Image.fromarray(
        torch.randint(0, 256, (50, 40, 3), generator=rng, dtype=torch.uint8).numpy()
    )
    top = classify(image, top_k=3)
    x = build_transform(model.config.data_config, train=False)(image)[None]
    probs = logits(model, x).softmax(1)[0]
    assert {r["label"]: round(r["score"], 2) for r in top} == {
        LABELS[k]: round(float(probs[k]), 2) for k in range(3)
    }


def _pretrained_resnet(tmp_path: Path, pretrained: bool) -> CGCModel:
    # timm loads "pretrained" weights from a local file (no download), as a Hub cache would
    weights = tmp_path / "weights.safetensors"
    source = timm.create_model("resnet18", num_classes=3, layers=(1, 1, 1, 1))
    safetensors.torch.save_file(source.state_dict(), str(weights))
    return CGCModel.from_backbone(
        "resnet18",
        num_labels=3,
        pretrained=pretrained,
        model_kwargs={"layers": (1, 1, 1, 1), "pretrained_cfg_overlay": {"file": str(weights)}},
    )


def test_card_base_model_and_license_come_from_the_pretrained_weights(tmp_path: Path) -> None:
    model = _pretrained_resnet(tmp_path, pretrained=True)
    assert model.config.base_model == model.backbone.pretrained_cfg["hf_hub_id"]
    meta = front_matter(
        (model.save_pretrained(tmp_path / "a", dataset="cub") / "README.md").read_text()
    )
    assert meta["base_model"] == "timm/resnet18.a1_in1k"  # a Hub page, not the bare name
    assert meta["license"] == "apache-2.0"
    assert "datasets" not in meta  # "cub" is a short name, not a Hub dataset id

    scratch = _pretrained_resnet(tmp_path, pretrained=False)
    meta = front_matter((scratch.save_pretrained(tmp_path / "b") / "README.md").read_text())
    assert "base_model" not in meta and "license" not in meta  # random init: nothing to credit


def test_transformers_style_save_and_load_arguments(saved, tmp_path: Path, caplog) -> None:
    model, folder = saved
    x = images()
    loaded = CGCModel.from_pretrained(folder, map_location="cpu")
    assert torch.equal(logits(loaded, x), logits(model, x))
    with pytest.raises(ValueError, match="map_location"):
        CGCModel.from_pretrained(folder, device="cuda:0", map_location="cpu")

    other = tmp_path / "not-main"
    assert model.save_pretrained(other, is_main_process=False) == other
    assert not other.exists()  # only the main process writes
    with caplog.at_level(logging.WARNING):
        out = model.save_pretrained(tmp_path / "m", safe_serialization=False)
    assert "safe_serialization=False" in caplog.text
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()


def test_push_to_hub_branch_is_created_and_committed_to(saved, monkeypatch) -> None:
    model, _ = saved

    class BranchApi(FakeHfApi):
        def create_branch(self, **kwargs):
            self.calls.append(("create_branch", kwargs))

    FakeHfApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", BranchApi)
    model.push_to_hub("org/cgc", branch="dev")
    (api,) = FakeHfApi.instances
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][1]["branch"] == "dev" and api.calls[2][1]["revision"] == "dev"
    with pytest.raises(ValueError, match="revision='main' and branch='dev'"):
        model.push_to_hub("org/cgc", branch="dev", revision="main")

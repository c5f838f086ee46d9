"""recipes/finetune.py --push_to_hub against a stand-in for the Hub client."""

from __future__ import annotations

import json

from conftest import FakeHfApi, load_recipe

from cgc_hf import CGCModel, hub

SECRET = "hf_StandInTokenNeverWritten42"


def test_push_to_hub_uploads_the_final_model_and_prints_its_url(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    FakeHfApi.instances.clear()
    out = tmp_path / "run"
    load_recipe("finetune").main(
        [
            "--model", "test_resnet", "--image_size", "32",
            "--synthetic_kwargs", '{"num_classes": 3, "train_size": 24, "eval_size": 6}',
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "6",
            "--figure_images", "0", "--max_train_steps", "1", "--output_dir", str(out),
            "--push_to_hub", "--hub_model_id", "user/tiny-cgc", "--hub_private_repo",
            "--hub_token", SECRET,
        ]
    )  # fmt: skip
    (api,) = FakeHfApi.instances
    assert api.token == SECRET  # the token reaches the client...
    (create,) = [kw for name, kw in api.calls if name == "create_repo"]
    assert create["repo_id"] == "user/tiny-cgc" and create["private"] is True
    assert {"model.safetensors", "config.json", "README.md"} <= set(api.files)
    for name, data in api.files.items():  # ...and nothing else
        assert SECRET.encode() not in data, name
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    card = api.files["README.md"].decode()
    assert "library_name: cgc_hf" in card
    assert "Top-1 accuracy" in card  # the run's evaluation table travels with the model
    assert (
        "pushed to the Hub: https://huggingface.co/user/tiny-cgc/commit/123"
        in capsys.readouterr().out
    )
    # What was uploaded loads back as the model the run saved.
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, data in api.files.items():
        (pushed / name).write_bytes(data)
    local = CGCModel.from_pretrained(out / "model")
    remote = CGCModel.from_pretrained(pushed)
    assert json.loads(api.files["config.json"])["num_labels"] == 3
    for (k, a), (_, b) in zip(local.state_dict().items(), remote.state_dict().items()):
        assert a.equal(b), k

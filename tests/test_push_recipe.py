"""recipes/finetune.py --push_to_hub against a stand-in for the Hub client."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from cgc_hf import CGCModel, hub

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_StandInTokenNeverWritten42"


class RecordingHfApi:
    """Records the repository calls and a copy of every uploaded file."""

    instances: list[RecordingHfApi] = []

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}
        RecordingHfApi.instances.append(self)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return type("RepoUrl", (str,), {"repo_id": kwargs["repo_id"]})(
            "https://hf.co/" + kwargs["repo_id"]
        )

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        self.files = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()}
        return "https://huggingface.co/user/tiny-cgc/commit/abc"


def _recipe():
    spec = importlib.util.spec_from_file_location(
        "finetune_recipe", ROOT / "recipes" / "finetune.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_push_to_hub_uploads_the_final_model_and_prints_its_url(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)
    RecordingHfApi.instances.clear()
    out = tmp_path / "run"
    _recipe().main(
        [
            "--model", "test_resnet", "--image_size", "32",
            "--synthetic_kwargs", '{"num_classes": 3, "train_size": 24, "eval_size": 6}',
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "6",
            "--figure_images", "0", "--max_train_steps", "1", "--output_dir", str(out),
            "--push_to_hub", "--hub_model_id", "user/tiny-cgc", "--hub_private_repo",
            "--hub_token", SECRET,
        ]
    )  # fmt: skip
    (api,) = RecordingHfApi.instances
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
        "pushed to the Hub: https://huggingface.co/user/tiny-cgc/commit/abc"
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

"""Checkpoints: verified before use, the newest intact one is used, a good one has finite weights,
and a real full disk names the checkpoint that is still intact."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from conftest import Stop, reset_accelerate, tiny_trainer

from cgc_hf import CGCError, CGCTrainer, CheckpointError
from cgc_hf.training import COMPLETE, complete_checkpoints

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def trainer(out, model=None, stop_at=None, **kw) -> CGCTrainer:
    return tiny_trainer(out, model, stop_at, **kw)


def weights(t: CGCTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.accelerator.unwrap_model(t.model).state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    t = trainer(tmp_path_factory.mktemp("ref") / "run")
    t.train()
    want = weights(t)
    reset_accelerate()
    return want


def interrupted(out) -> None:
    with pytest.raises(Stop):
        trainer(out, stop_at=5).train()
    assert [p.name for p in complete_checkpoints(out)] == ["step_2", "step_4"]


def damage(path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "delete":
        path.unlink()
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("model.safetensors", "truncate"),
        ("optimizer.bin", "truncate"),
        ("scheduler.bin", "truncate"),
        ("random_states_0.pkl", "truncate"),
        ("random_states_0.pkl", "delete"),
        ("model.safetensors", "flip"),
    ],
)
def test_damaged_latest_falls_back_to_the_newest_intact_one(tmp_path, reference, caplog, name, how):
    """Issue 13.4: the resumed run ends as the uninterrupted one, from the older checkpoint."""
    out = tmp_path / "run"
    interrupted(out)
    damage(out / "checkpoints" / "step_4" / name, how)
    t = trainer(out, resume_from_checkpoint="latest")
    t.train()
    assert f"checkpoint {out / 'checkpoints' / 'step_4'} is damaged ({name}" in caplog.text
    assert f"resuming from {out / 'checkpoints' / 'step_2'}" in caplog.text
    got = weights(t)
    for key, value in reference.items():
        assert torch.equal(got[key], value), key


def test_a_foreign_rng_state_is_damage_not_info(tmp_path, caplog):
    out = tmp_path / "run"
    interrupted(out)
    ckpt = out / "checkpoints"
    shutil.copyfile(
        ckpt / "step_2" / "random_states_0.pkl", ckpt / "step_4" / "random_states_0.pkl"
    )
    with pytest.raises(CheckpointError) as err:
        trainer(out, resume_from_checkpoint=str(ckpt / "step_4")).train()
    assert "random_states_0.pkl is not the file that was written" in str(err.value)
    assert "'latest'" in str(err.value)


def test_a_damaged_marker_and_every_checkpoint_damaged(tmp_path):
    out = tmp_path / "run"
    interrupted(out)
    ckpt = out / "checkpoints"
    (ckpt / "step_4" / COMPLETE).write_text('{"global_step": 4, "files": {')  # truncated JSON
    damage(ckpt / "step_2" / "optimizer.bin", "truncate")
    with pytest.raises(CheckpointError) as err:
        trainer(out, resume_from_checkpoint="latest").train()
    message = str(err.value)
    assert "every checkpoint" in message and "step_4" in message and "\n" not in message


def test_the_last_good_checkpoint_has_finite_weights(tmp_path):
    """Issue 13.5: a checkpoint of NaN weights is never named as the good one."""
    out = tmp_path / "run"
    t = trainer(out, max_train_steps=10, checkpointing_steps=1, max_nonfinite_steps=2)
    model = t.accelerator.unwrap_model(t.model)

    def step_end():
        if t.state.global_step == 1:  # after checkpoint 1, the weights go bad
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    t._step_end = step_end
    with pytest.raises(CGCError) as err:
        t.train()
    assert f"The last good checkpoint is {out / 'checkpoints' / 'step_1'}." in str(err.value)
    marker = json.loads((out / "checkpoints" / "step_2" / COMPLETE).read_text())
    assert marker["weights_finite"] is False


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs (a few checkpoints of the tiny model), where the machine can mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'no mount'})")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk) -> None:
    """Leave no free byte on ``disk``."""
    with open(disk / "ballast", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    try:
        with open(disk / "ballast2", "wb") as f:
            while True:
                f.write(b"\0")
                f.flush()
    except OSError:
        pass


@pytest.mark.parametrize("when", ["checkpoint", "final model"])
def test_a_real_full_disk_names_the_intact_checkpoint(small_disk, reference, when):
    """Issue 13.8: torch's RuntimeError / SafetensorError of a full disk become the message."""
    out = small_disk / "run"
    t = trainer(out)
    at = 2 if when == "checkpoint" else 6

    def step_end():
        if t.state.global_step == at:
            fill(small_disk)

    t._step_end = step_end
    with pytest.raises(CheckpointError) as err:
        t.train()
    message = str(err.value)
    intact = out / "checkpoints" / f"step_{at}"  # the disk filled up after this one
    assert str(intact) in message and "latest" in message
    assert "\n" not in message
    (small_disk / "ballast").unlink()
    (small_disk / "ballast2").unlink(missing_ok=True)
    resumed = trainer(out, resume_from_checkpoint="latest")
    resumed.train()
    got = weights(resumed)
    for key, value in reference.items():
        assert torch.equal(got[key], value), key

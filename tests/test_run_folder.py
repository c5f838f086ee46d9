"""The run folder: a run deletes only what a run of ours wrote, and holds a lock while it runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import tiny_trainer

from cgc_hf import CGCTrainer, CGCValueError

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def trainer(out, **kw) -> CGCTrainer:
    return tiny_trainer(
        out, unlabeled=False, **{"max_train_steps": 2, "checkpointing_steps": 1, **kw}
    )


def test_overwrite_refuses_a_folder_no_run_of_ours_wrote(tmp_path):
    """Issue 13.1: `mkdir -p X/checkpoints X/src; echo keep > X/src/notes.txt` survives."""
    out = tmp_path / "X"
    (out / "checkpoints").mkdir(parents=True)
    (out / "src").mkdir()
    (out / "src" / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(CGCValueError, match=r"\['checkpoints'\], which no cgc_hf run wrote"):
            trainer(out, overwrite_output_dir=overwrite)
    assert (out / "src" / "notes.txt").read_text() == "keep"
    assert (out / "checkpoints").is_dir()


def test_overwrite_removes_our_files_and_keeps_the_rest(tmp_path, caplog):
    out = tmp_path / "run"
    trainer(out, figure_images=2).train()
    (out / "notes.txt").write_text("mine")
    (out / "figures" / "my_plot.png").write_bytes(b"png")
    (out / "checkpoints" / "README").write_text("mine too")
    assert (out / "model").is_dir() and (out / "figures" / "step_2.png").exists()
    trainer(out, overwrite_output_dir=True)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == [
        ".cgc_run.json",
        ".cgc_run.lock",
        "checkpoints",
        "checkpoints/README",
        "figures",
        "figures/my_plot.png",
        "notes.txt",
    ]
    assert "kept 3 entries no run writes" in caplog.text


def test_a_run_that_stopped_before_any_checkpoint_is_simply_rerun(tmp_path):
    """Issue 13.11: a data error leaves a folder; the rerun is not refused as unfinished."""
    out = tmp_path / "run"
    first = trainer(out)

    def fail():
        raise ValueError("a bad image")

    first.save_checkpoint = fail  # it dies at its first checkpoint
    with pytest.raises(ValueError):
        first.train()
    assert (out / "args.json").exists()
    metrics = trainer(out).train()
    assert metrics["train_steps"] == 2


@pytest.mark.parametrize("make", ["file", "inside_a_file"])
def test_output_dir_that_cannot_be_a_folder_is_one_line(tmp_path, make):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if make == "file" else tmp_path / "f" / "run"
    with pytest.raises(CGCValueError) as err:
        trainer(out)
    assert "output_dir=" in str(err.value) and "\n" not in str(err.value)


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_in_the_same_folder_stops_and_kill_9_frees_the_lock(tmp_path):
    """Issue 13.7: an OS-level lock; a killed holder leaves no stale lock."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out / ".cgc_run.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            CGCValueError, match=f"in use by another run \\(process {holder.pid}\\)"
        ):
            trainer(out)
    finally:
        os.kill(holder.pid, 9)
        holder.wait()
    time.sleep(0.1)
    assert trainer(out).train()["train_steps"] == 2


def test_the_lock_is_held_while_training(tmp_path):
    out = tmp_path / "run"
    first = trainer(out)
    seen = []

    def step_end():
        if first.state.global_step == 1:
            with pytest.raises(CGCValueError, match="in use by another run"):
                trainer(out, resume_from_checkpoint="latest")
            seen.append(True)

    first._step_end = step_end
    first.train()
    assert seen == [True]


def test_tracker_config_holds_every_method_option_as_a_scalar():
    from cgc_hf import METHOD_FIELDS, CGCConfig
    from cgc_hf.training.run_folder import tracker_config

    config = CGCConfig(separate_views=True, crop_scale=(0.2, 1.0), target_layer=None).to_dict()
    flat = tracker_config({"training_arguments": {"seed": 3}, "cgc_config": config})
    assert set(METHOD_FIELDS) <= set(flat)
    assert flat["separate_views"] is True and flat["crop_scale"] == "[0.2, 1.0]"
    assert flat["seed"] == 3 and flat["target_layer"] == "None"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())

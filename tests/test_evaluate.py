"""Tests of recipes/evaluate.py: the comparison table, the JSON files against an accuracy loop
written independently of the recipe, the figure, seeding, multi-process gathering, and errors.

Two tiny random-init ResNets are saved with ``save_pretrained``; the recipe runs on a small
generated dataset, as a subprocess (as a user runs it) or in-process through ``main(argv)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_recipe

from cgc_hf import METRICS, CGCModel, build_transform, column_names, folder_name, make_synthetic

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "evaluate.py"
SYNTH = {"num_classes": 4, "train_size": 8, "eval_size": 14, "image_size": 64}
NUM_IMAGES = 11  # --max_eval_samples: fewer than the split, not a multiple of the batch
BATCH = 4
SEED = 3
TINY_RESNET = dict(layers=[1, 1, 1, 1], stem_width=16, channels=(16, 32, 48, 64))
Z95 = 1.959963984540054


recipe = load_recipe("evaluate")


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _args(models: list[Path], out: Path, *extra: str) -> list[str]:
    first, *rest = models
    compare = ["--compare", *map(str, rest)] if rest else []
    return [
        "--model", str(first), *compare,
        "--dataset", "synthetic",
        "--synthetic_kwargs", json.dumps(SYNTH),
        "--split", "test",
        "--max_eval_samples", str(NUM_IMAGES),
        "--per_device_eval_batch_size", str(BATCH),
        "--seed", str(SEED),
        "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> list[Path]:
    """Two different tiny models, saved as finetune.py would, in folders 'cgc' and 'baseline'."""
    root = tmp_path_factory.mktemp("models")
    paths = []
    for seed, name in ((0, "cgc"), (1, "baseline")):
        torch.manual_seed(seed)
        model = CGCModel.from_backbone(
            "resnet18", num_labels=4, pretrained=False, model_kwargs=TINY_RESNET
        )
        model.config.data_config["input_size"] = [3, 64, 64]  # as finetune.py --image_size 64
        model.save_pretrained(root / name)
        paths.append(root / name)
    return paths


@pytest.fixture(scope="module")
def recipe_run(saved_models, tmp_path_factory):
    """One subprocess run with every metric on: returns (completed process, output folder)."""
    out = tmp_path_factory.mktemp("eval")
    cmd = [
        sys.executable,
        str(RECIPE),
        *_args(saved_models, out, "--insertion_steps", "2", "--figure_images", "3"),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def reference_correct(model_dir: Path) -> list[float]:
    """1.0 / 0.0 per image: argmax of the logits == label, one image at a time.

    Written from the definition, apart from the recipe: the split comes straight from
    make_synthetic (not load_splits), the image through the eval transform of the model's
    data config, the logits from the plain backbone.
    """
    model = CGCModel.from_pretrained(model_dir).eval()
    rows = make_synthetic(seed=SEED, **SYNTH)["test"]
    transform = build_transform(model.config.data_config, train=False)
    out = []
    # --max_eval_samples as in finetune.py (and transformers' example): a seeded random subset
    # of the split, in dataset order.
    subset = sorted(np.random.default_rng(SEED).permutation(len(rows))[:NUM_IMAGES].tolist())
    for i in subset:
        row = rows[i]
        x = transform(row["image"].convert("RGB"))[None]  # (1, 3, 64, 64)
        with torch.no_grad():
            logits = model.backbone(x)  # (1, 4)
        out.append(float(int(logits.argmax(1)) == int(row["label"])))
    return out


def _metrics(out: Path, name: str) -> dict:
    return json.loads((out / name / "metrics.json").read_text())


# ---------------------------------------------------------------------------------- the run
@pytest.mark.slow
def test_table_printed_with_one_column_per_model(recipe_run, saved_models):
    proc, _ = recipe_run
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split()[:3] == ["metric", "cgc", "baseline"]  # basenames, in order
    labels = [m.title for m in METRICS]
    assert labels == [
        "Top-1 accuracy (%)",
        "Heatmap consistency (cosine)",
        "Content Heatmap (%)",
        "Pointing game (%)",
        "All-zero heatmaps (images)",
        "Insertion AUC",
        "Deletion AUC",
    ]
    for label in labels:
        assert any(line.startswith(label) for line in lines), (label, proc.stdout)
    # The printed accuracy cells are the independent accuracies (percent, 2 decimals).
    acc_line = next(line for line in lines if line.startswith("Top-1 accuracy (%)"))
    cells = acc_line[len("Top-1 accuracy (%)") :].split("±")
    printed = [float(cells[0]), float(cells[1].split()[1])]
    expected = [100 * statistics.fmean(reference_correct(p)) for p in saved_models]
    assert printed == [round(e, 2) for e in expected]
    assert f"{NUM_IMAGES} images" in proc.stdout


@pytest.mark.slow
def test_json_accuracy_matches_independent_loop(recipe_run, saved_models):
    _, out = recipe_run
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["num_images"] == NUM_IMAGES
    assert list(comparison["models"]) == ["cgc", "baseline"]
    refs = {name: reference_correct(p) for name, p in zip(("cgc", "baseline"), saved_models)}
    for name, ref in refs.items():
        m = _metrics(out, name)
        assert m["per_image"]["accuracy"] == ref  # image by image, in dataset order
        acc = m["metrics"]["accuracy"]
        assert acc["n"] == NUM_IMAGES
        assert acc["mean"] == pytest.approx(100 * statistics.fmean(ref), abs=1e-9)
        assert acc["std"] == pytest.approx(100 * statistics.stdev(ref), abs=1e-9)
        assert acc["ci95"] == pytest.approx(Z95 * acc["std"] / math.sqrt(NUM_IMAGES), abs=1e-9)
        assert comparison["models"][name]["metrics"]["accuracy"] == acc
        assert comparison["models"][name]["source"] == str(dict(zip(refs, saved_models))[name])
    diff = [b - a for a, b in zip(refs["cgc"], refs["baseline"])]
    paired = comparison["differences"]["baseline"]["accuracy"]
    assert comparison["differences_vs"] == "cgc"
    assert paired["mean"] == pytest.approx(100 * statistics.fmean(diff), abs=1e-9)
    assert paired["ci95"] == pytest.approx(
        Z95 * 100 * statistics.stdev(diff) / math.sqrt(NUM_IMAGES), abs=1e-9
    )


@pytest.mark.slow
def test_explanation_metrics_for_a_dataset_with_masks(recipe_run):
    _, out = recipe_run
    for name in ("cgc", "baseline"):
        m = _metrics(out, name)
        per = m["per_image"]
        expected = {
            "accuracy",
            "consistency",
            "content_heatmap",
            "pointing_game",
            "zero_heatmaps",
            "insertion",
            "deletion",
        }
        assert set(per) == expected and set(m["metrics"]) == expected
        assert all(len(v) == NUM_IMAGES for v in per.values())
        assert all(-1e-6 <= c <= 1 + 1e-6 for c in per["consistency"])
        assert all(0 <= c <= 100 + 1e-4 for c in per["content_heatmap"])
        assert all(0 <= a <= 1 for a in per["insertion"] + per["deletion"])
        # Zero heatmaps are counted, never dropped: they score 0 and stay in n.
        zero = per["zero_heatmaps"]
        assert m["metrics"]["zero_heatmaps"] == {"count": sum(zero), "n": NUM_IMAGES}
        for z, ch, pg in zip(zero, per["content_heatmap"], per["pointing_game"]):
            if z:
                assert ch == 0 and pg == 0
        assert m["metrics"]["content_heatmap"]["n"] == NUM_IMAGES
        assert m["metrics"]["pointing_game"]["mean"] == pytest.approx(
            100 * statistics.fmean(per["pointing_game"])
        )


@pytest.mark.slow
def test_comparison_figure_holds_every_model(recipe_run):
    from PIL import Image

    _, out = recipe_run
    path = out / "comparison.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # heatmap_grid: (0.5 + N * 1.6) x (rows * 1.6) inches at 100 dpi; rows = input + (pred,
    # true) per model. 3 images, 2 models -> 530 x 800 pixels.
    with Image.open(path) as image:
        assert image.size == (530, 800)


@pytest.mark.slow
def test_consistency_is_seeded(recipe_run, saved_models, tmp_path):
    """Same seed, in-process this time: the same transforms, so the same per-image values."""
    _, out = recipe_run
    assert recipe.main(_args(saved_models, tmp_path, "--figure_images", "0")) == 0
    for name in ("cgc", "baseline"):
        first = _metrics(out, name)["per_image"]["consistency"]
        again = _metrics(tmp_path, name)["per_image"]["consistency"]
        assert again == pytest.approx(first, abs=1e-6)
    assert not (tmp_path / "comparison.png").exists()  # --figure_images 0


@pytest.mark.slow
def test_two_processes_count_each_image_once(recipe_run, saved_models, tmp_path):
    """torchrun with 2 CPU processes: gather_for_metrics must drop the padding rows.

    11 images in batches of 4 -> 3 batches; the second process gets a padded extra one.
    """
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(), ACCELERATE_USE_CPU="1")  # Accelerate: gloo processes on the CPU
    cmd = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(RECIPE),
        *_args(saved_models, tmp_path, "--figure_images", "0"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Top-1 accuracy (%)") == 1  # only the main process prints
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert comparison["num_processes"] == 2
    _, single = recipe_run
    for name in ("cgc", "baseline"):
        per, ref = _metrics(tmp_path, name)["per_image"], _metrics(single, name)["per_image"]
        assert per["accuracy"] == ref["accuracy"]  # same images, same order, no duplicates
        # Per-image seeds: the transforms do not depend on the number of processes, not even
        # in the last, partial batch, which Accelerate pads to 4 rows.
        assert per["consistency"] == pytest.approx(ref["consistency"], abs=1e-4)


def test_dataset_without_masks_skips_mask_metrics(saved_models, tmp_path, capsys):
    """A save_to_disk folder without box or mask columns: accuracy and consistency only."""
    data = make_synthetic(seed=SEED, **SYNTH).remove_columns(["mask", "bbox"])
    data.save_to_disk(str(tmp_path / "data"))
    argv = _args(saved_models[:1], tmp_path / "out", "--figure_images", "0")
    argv[argv.index("--dataset") + 1] = str(tmp_path / "data")
    assert recipe.main(argv) == 0
    table = capsys.readouterr().out
    assert "Top-1 accuracy (%)" in table and "Content Heatmap" not in table
    m = _metrics(tmp_path / "out", "cgc")
    assert set(m["metrics"]) == {"accuracy", "consistency"}
    assert m["per_image"]["accuracy"] == reference_correct(saved_models[0])


# ---------------------------------------------------------------------------------- errors
@pytest.mark.slow
def test_missing_model_dir_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "no-such-run" / "model"
    cmd = [sys.executable, str(RECIPE), "--model", str(missing), "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(missing) in lines[0] and "no such directory" in lines[0]
    assert not (tmp_path / "comparison.json").exists()


def _run_in_process(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = recipe.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_num_labels_mismatch_is_an_error(saved_models, tmp_path, capsys):
    argv = _args(saved_models[:1], tmp_path)
    argv[argv.index("--synthetic_kwargs") + 1] = json.dumps({**SYNTH, "num_classes": 3})
    code, err = _run_in_process(argv, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "num_labels=4" in err[0] and "3 classes" in err[0]


def test_unknown_dataset_is_an_error(saved_models, tmp_path, capsys):
    argv = _args(saved_models[:1], tmp_path)
    argv[argv.index("--dataset") + 1] = "birdz"
    code, err = _run_in_process(argv, capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "'birdz'" in err[0]


def test_run_folder_instead_of_model_folder_is_named(saved_models, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_models[0], run_dir / "model")  # finetune.py's layout
    code, err = _run_in_process(["--model", str(run_dir), "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and str(run_dir / "model") in err[0]


def test_names_must_match_the_models(saved_models, tmp_path, capsys):
    argv = _args(saved_models, tmp_path, "--names", "only-one")
    code, err = _run_in_process(argv, capsys)
    assert code == 2 and "--names got 1 names for 2 models" in err[0]


# ---------------------------------------------------------------------------------- helpers
def test_column_names_default_to_unique_folder_names():
    assert column_names(["runs/cgc", "other/baseline/"], None) == ["cgc", "baseline"]
    # finetune.py saves every run as <output_dir>/model: the parent tells them apart.
    assert column_names(["x/cgc-run/model", "x/base-run/model"], None) == [
        "cgc-run/model",
        "base-run/model",
    ]
    assert column_names(["a/m", "a/m"], None) == ["a/m", "a/m#2"]
    assert column_names(["a/m", "b/m"], ["CGC", "baseline"]) == ["CGC", "baseline"]
    assert folder_name("cgc-run/model") == "cgc-run_model"


# ---------------------------------------------------------------------------------- auditing
def test_audits_an_off_the_shelf_classifier(saved_models, tmp_path, capsys):
    """A plain transformers classifier beside a CGC one: same images, same crops, paired."""
    from conftest import tiny_hf_backbone

    tiny_hf_backbone("resnet", num_labels=4).save_pretrained(tmp_path / "hf-resnet")
    argv = _args(
        [saved_models[0], tmp_path / "hf-resnet"], tmp_path / "out", "--figure_images", "2"
    )
    assert recipe.main(argv) == 0
    # Its own data config (its size and normalisation): its heatmaps get a figure of their own.
    assert (tmp_path / "out" / "comparison.png").is_file()
    assert (tmp_path / "out" / "hf-resnet" / "explanations.png").is_file()
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert list(comparison["models"]) == ["cgc", "hf-resnet"]
    plain = _metrics(tmp_path / "out", "hf-resnet")
    assert set(plain["metrics"]) == {
        "accuracy", "consistency", "content_heatmap", "pointing_game", "zero_heatmaps"
    }  # fmt: skip
    assert all(len(v) == NUM_IMAGES for v in plain["per_image"].values())
    assert comparison["differences"]["hf-resnet"]["consistency"]["n"] == NUM_IMAGES
    assert "hf-resnet - cgc" in capsys.readouterr().out


def test_other_classes_need_ignore_labels(saved_models, tmp_path, capsys):
    torch.manual_seed(2)
    other = CGCModel.from_backbone(
        "resnet18", num_labels=3, pretrained=False, model_kwargs=TINY_RESNET
    )
    other.export_backbone(tmp_path / "timm-3")  # timm's own format, 3 classes
    argv = _args([tmp_path / "timm-3"], tmp_path / "out", "--figure_images", "0")
    code, err = _run_in_process(argv, capsys)
    assert code == 2 and "num_labels=3" in err[0] and "--ignore_labels" in err[0]
    assert recipe.main([*argv, "--ignore_labels"]) == 0
    m = _metrics(tmp_path / "out", "timm-3")
    # No accuracy against labels the model does not know; its own predictions are explained.
    assert "accuracy" not in m["metrics"] and m["metrics"]["content_heatmap"]["n"] == NUM_IMAGES


def test_model_folder_not_written_yet_is_not_a_hub_download(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no cgc-output here: finetune.py has not run yet
    code, err = _run_in_process(["--model", "cgc-output/model"], capsys)
    assert code == 2 and len(err) == 1
    assert "'cgc-output/model': no such directory" in err[0] and "hf download" not in err[0]

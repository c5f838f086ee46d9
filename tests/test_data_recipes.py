"""The data flags of issue 17 through both recipes: an image folder with a folder of masks gets
Content Heatmap and the pointing game in finetune.py's metrics and in evaluate.py's comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT, run_script
from PIL import Image

FINETUNE = ROOT / "recipes" / "finetune.py"
EVALUATE = ROOT / "recipes" / "evaluate.py"
SIZE = 32


def _folder_with_masks(root):
    """images/<split>/<class>/<name>.png with a bright square; trimaps/<name>.png marking it."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c, cls in enumerate(("disc", "ring", "bar")):
            for i in range(n):
                name = f"{cls}_{split}_{i}"
                x0, y0 = rng.integers(2, 14, 2)
                img = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
                img[y0 : y0 + 16, x0 : x0 + 16] = (200, 60 * c, 255 - 60 * c)
                trimap = np.full((SIZE, SIZE), 2, np.uint8)
                trimap[y0 : y0 + 16, x0 : x0 + 16] = 1
                trimap[y0, x0 : x0 + 16] = 3
                folder = root / "images" / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(folder / f"{name}.png")
                (root / "trimaps").mkdir(exist_ok=True)
                Image.fromarray(trimap).save(root / "trimaps" / f"{name}.png")


@pytest.mark.slow
def test_image_folder_with_mask_dir_through_both_recipes(tmp_path):
    _folder_with_masks(tmp_path)
    data = ["--dataset", str(tmp_path / "images"), "--mask_dir", str(tmp_path / "trimaps"),
            "--mask_foreground_values", "1", "3"]  # fmt: skip
    out = tmp_path / "run"
    proc = run_script(
        FINETUNE, *data, "--model", "test_resnet", "--no_pretrained", "--image_size", "32",
        "--per_device_train_batch_size", "6", "--per_device_eval_batch_size", "9",
        "--max_train_steps", "1", "--figure_images", "0", "--output_dir", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics.get("final", metrics)
    assert 0 <= final["eval_content_heatmap"] <= 100 and 0 <= final["eval_pointing_game"] <= 100
    proc = run_script(
        EVALUATE, "--model", str(out / "model"), *data, "--figure_images", "0",
        "--output_dir", str(tmp_path / "eval"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    comparison = json.loads((tmp_path / "eval" / "comparison.json").read_text())
    summary = next(iter(comparison["models"].values()))["metrics"]
    assert summary["content_heatmap"]["n"] == 9 and summary["pointing_game"]["n"] == 9
    # A typo in the mask folder is one error line, not a traceback.
    proc = run_script(EVALUATE, "--model", str(out / "model"), *data[:2], "--mask_dir",
                      str(tmp_path / "trimap"), "--output_dir", str(tmp_path / "e2"))  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: mask_dir")
    assert "Traceback" not in proc.stderr

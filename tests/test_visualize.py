"""Overlays land where the heatmap is hot; figures are valid PNGs of the promised size."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cgc_hf import CGCModel
from cgc_hf.errors import CGCValueError
from cgc_hf.metrics import zero_heatmaps
from cgc_hf.visualize import denormalize, explanation_figure, heatmap_grid, overlay

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_overlay_shape_dtype_and_hot_region():
    image = torch.full((3, 32, 48), 0.5)
    heatmap = torch.zeros(4, 6)
    heatmap[0, 5] = 1.0  # top-right cell: image rows 0-7, columns 40-47
    out = overlay(image, heatmap, alpha=0.6)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    # jet maps the peak to red and zero to blue: the reddest pixel sits in the hot cell.
    redness = out[..., 0].astype(int) - out[..., 2].astype(int)  # (H, W)
    r, c = np.unravel_index(redness.argmax(), redness.shape)
    assert r < 8 and c >= 40
    assert redness[24:, :24].max() < 0  # far from the peak the overlay is blue


def test_overlay_blend_endpoints():
    import matplotlib

    image = torch.rand(3, 8, 8)
    heatmap = torch.rand(2, 2)
    np.testing.assert_array_equal(
        overlay(image, heatmap, alpha=0.0), np.rint(image.permute(1, 2, 0).numpy() * 255)
    )
    full = overlay(image, torch.ones(2, 2), alpha=1.0, cmap="viridis")
    top = np.rint(np.array(matplotlib.colormaps["viridis"](1.0)[:3]) * 255)
    np.testing.assert_array_equal(full, np.broadcast_to(top, (8, 8, 3)))
    with pytest.raises(CGCValueError, match="viridis"):
        overlay(image, heatmap, cmap="viridiss")


def test_denormalize_inverts_normalisation():
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    images = torch.rand(2, 3, 5, 5)
    normalised = (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(denormalize(normalised, mean, std), images)
    torch.testing.assert_close(denormalize(normalised[0], mean, std), images[0])
    with pytest.raises(CGCValueError, match="len\\(mean\\)"):
        denormalize(torch.rand(1, 4, 5, 5), mean, std)


def _png_size(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_heatmap_grid_writes_png_of_expected_size(tmp_path):
    images = torch.rand(3, 3, 32, 32)
    rows = {"A (pred)": torch.rand(3, 4, 4), "B (pred)": torch.rand(3, 2, 2)}
    path = tmp_path / "sub" / "grid.png"
    fig = heatmap_grid(
        images, rows, ["a", "b", "c"], path, cell_inches=1.0, label_inches=1.0, dpi=50
    )
    # (1 + 3 * 1.0) x (3 * 1.0) inches at 50 dpi
    assert _png_size(path) == (200, 150)
    assert [ax.get_ylabel() for ax in fig.axes[::3]] == ["input", "A (pred)", "B (pred)"]
    with pytest.raises(CGCValueError, match="rows\\['A \\(pred\\)'\\]"):
        heatmap_grid(images, {"A (pred)": torch.rand(2, 4, 4)})
    with pytest.raises(CGCValueError, match="titles"):
        heatmap_grid(images, rows, ["a"])


def test_explanation_figure_two_models(tmp_path):
    torch.manual_seed(0)
    models = {
        "CGC": CGCModel.from_backbone("resnet18", num_labels=3, pretrained=False).eval(),
        "baseline": CGCModel.from_backbone("resnet18", num_labels=3, pretrained=False).eval(),
    }
    mask = torch.zeros(5, 64, 64)
    mask[:, 16:48, 8:40] = 1
    batch = {
        "pixel_values": torch.randn(5, 3, 64, 64),
        "labels": torch.tensor([0, 1, 2, -100, 1]),
        "mask": mask,
    }
    cfg = models["CGC"].config.data_config
    path = tmp_path / "explain.png"
    fig = explanation_figure(models, batch, cfg, path, max_images=4, cell_inches=1.0, dpi=40)
    # 4 columns + 0.5 in of labels; input + 2 models x (pred, true) rows
    assert _png_size(path) == (round((0.5 + 4) * 40), 5 * 40)
    labels = [ax.get_ylabel() for ax in fig.axes[::4]]
    assert labels == ["input", "CGC (pred)", "baseline (pred)", "CGC (true)", "baseline (true)"]
    assert [ax.get_title() for ax in fig.axes[:4]] == ["true: 0", "true: 1", "true: 2", "unlabeled"]
    assert all(m.training is False for m in models["CGC"].modules())
    x = batch["pixel_values"][:4]
    with torch.no_grad():
        pred = models["CGC"](x)["logits"].argmax(1)
    target = torch.where(batch["labels"][:4] >= 0, batch["labels"][:4], pred)
    zero = zero_heatmaps(models["CGC"].explain(x, target)).tolist()
    captions = [ax.get_title() for ax in fig.axes[12:16]]  # the "CGC (true)" row
    assert captions == ["zero heatmap" if z else "" for z in zero]


def test_missing_matplotlib_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'cgc_hf\[viz\]'"):
        overlay(torch.rand(3, 8, 8), torch.rand(2, 2))


def test_log_figure_gives_each_tracker_its_image_form():
    import matplotlib.pyplot as plt

    from cgc_hf.visualize import figure_to_array, log_figure

    class Tracker:
        def __init__(self, name):
            self.name, self.calls = name, []

        def log_images(self, values, step=None, **kwargs):
            self.calls.append((values, step, kwargs))

    fig = plt.figure(figsize=(2, 1), dpi=50)
    image = figure_to_array(fig)
    assert image.shape == (50, 100, 3) and image.dtype == np.uint8
    trackers = [Tracker(n) for n in ("tensorboard", "wandb", "aim")]
    log_figure(SimpleNamespace(trackers=[*trackers, object()]), "eval/heatmaps", fig, 7)
    (tb,), (wb,), (aim,) = (t.calls for t in trackers)
    assert tb[0]["eval/heatmaps"].shape == (1, 50, 100, 3) and tb[1:] == (
        7,
        {"dataformats": "NHWC"},
    )
    assert len(wb[0]["eval/heatmaps"]) == 1 and wb[1] == 7
    assert aim[0]["eval/heatmaps"].shape == (50, 100, 3)
    log_figure(SimpleNamespace(), "x", fig, 0)  # no trackers: nothing to do
    plt.close(fig)

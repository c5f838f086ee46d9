"""explain_images: image files or PIL images in, predictions, heatmaps and overlays out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_timm
from PIL import Image

from cgc_hf import CGCModel, CGCValueError, build_transform

torch.set_num_threads(1)


def _photo(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def model() -> CGCModel:
    m = tiny_timm("resnet")
    m.config.id2label = {0: "cat", 1: "dog", 2: "bird"}
    return m


def test_image_file_gives_prediction_heatmap_and_overlay(model, tmp_path):
    path = tmp_path / "photo.png"
    _photo(0).save(path)
    model.train()
    (result,) = model.explain_images(path)
    assert model.training  # mode restored

    # the reference: the saved eval transform, the plain classifier, explain() at input size
    x = build_transform(model.config.data_config, train=False)(Image.open(path))[None]
    model.eval()
    with torch.no_grad():
        probs = model(x)["logits"].softmax(1)[0]
    k = int(probs.argmax())
    assert (result.class_index, result.label) == (k, model.config.id2label[k])
    assert result.score == pytest.approx(float(probs[k]), abs=1e-6)
    side = model.config.data_config["input_size"][-1]
    heatmap = model.explain(x, torch.tensor([k]), size=side)[0]
    torch.testing.assert_close(result.heatmap, heatmap)
    assert result.image.shape == result.overlay.shape == (side, side, 3)
    assert result.overlay.dtype == np.uint8 and not np.array_equal(result.overlay, result.image)

    written = result.save_overlay(tmp_path / "overlay.png")
    assert np.array_equal(np.asarray(Image.open(written)), result.overlay)


def test_several_images_and_given_classes(model):
    images = [_photo(1), _photo(2, (50, 90)).convert("L")]  # any size, any mode
    results = model.explain_images(images, classes=[2, 0], batch_size=1)
    assert [r.class_index for r in results] == [2, 0]
    assert [r.label for r in results] == ["bird", "cat"]


def test_bad_inputs_name_the_argument(model, tmp_path):
    with pytest.raises(CGCValueError, match="not an image file"):
        model.explain_images(tmp_path / "missing.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(CGCValueError, match="cannot read"):
        model.explain_images(tmp_path / "notes.txt")
    with pytest.raises(CGCValueError, match="one class per image"):
        model.explain_images([_photo(0)], classes=[0, 1])

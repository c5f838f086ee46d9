"""Inputs that used to go wrong silently or with a traceback: float and NaN pixels, pixel arrays,
missing images and labels, one class, sparse and huge labels."""

from __future__ import annotations

import io
import os
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from cgc_hf.data import (
    CGCDataset,
    DataError,
    DatasetSpec,
    array_to_image,
    build_transform,
    load_splits,
    to_rgb,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IDENTITY_8 = {"input_size": (3, 8, 8), "mean": (0.0,) * 3, "std": (1.0,) * 3, "crop_pct": 1.0}


def _item(value, feature=None):
    feats = {"image": feature or datasets.Image(), "label": datasets.Value("int64")}
    ds = datasets.Dataset.from_dict({"image": [value], "label": [0]}, datasets.Features(feats))
    return CGCDataset(ds, build_transform(IDENTITY_8, train=False), DatasetSpec("px", None))[0]


def _tiff(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    return buf.getvalue()


# ------------------------------------------------------------------------- pixels
def test_float_images_in_0_1_keep_their_intensity():
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)  # a float (mode F) image
    image = Image.fromarray(ramp)
    assert image.mode == "F"
    gray = np.asarray(to_rgb(image))[..., 0]
    assert np.array_equal(gray, np.rint(ramp * 255).astype(np.uint8))
    # The same through a float TIFF file in a dataset: not black.
    x = _item({"bytes": _tiff(ramp), "path": None})["pixel_values"]  # (3, 8, 8) in [0, 1]
    assert torch.allclose(x[0], torch.from_numpy(ramp), atol=1 / 255)
    # Float images already in 0-255 are kept as they are.
    assert to_rgb(Image.fromarray(np.full((2, 2), 77.0, np.float32))).getpixel((0, 0)) == (77,) * 3


def test_pixel_arrays_become_images():
    rgb = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    feature = datasets.Array3D((8, 8, 3), "float32")
    x = _item(rgb, feature)["pixel_values"]
    assert torch.allclose(x, torch.from_numpy(rgb).permute(2, 0, 1), atol=1 / 255)
    chw = np.random.default_rng(1).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    assert np.array_equal(np.asarray(array_to_image(chw)), chw.transpose(1, 2, 0))
    assert array_to_image(np.ones((4, 4), bool)).getpixel((0, 0)) == 255
    with pytest.raises(ValueError, match="shape"):
        array_to_image(np.zeros((2, 8, 8, 3)))
    # An Array3D column is found as the image column, whatever its name.
    feats = datasets.Features({"pixels": feature, "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"pixels": [rgb, rgb], "label": [0, 1]}, feats)
    assert load_splits(ds, eval_split=None, eval_fraction=0.5).spec.image_column == "pixels"


@pytest.mark.parametrize("where", ["tiff", "array"])
def test_nan_pixels_are_an_error_naming_the_row(where):
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    ramp[3, 4] = np.nan
    if where == "tiff":
        value, feature = {"bytes": _tiff(ramp), "path": None}, None
    else:
        value, feature = np.repeat(ramp[..., None], 3, -1), datasets.Array3D((8, 8, 3), "float32")
    with pytest.raises(DataError) as err:
        _item(value, feature)
    msg = str(err.value)
    assert "row 0" in msg and "NaN" in msg and "\n" not in msg


def test_a_missing_image_is_one_clear_error_or_skipped():
    good = {"bytes": _tiff(np.full((8, 8), 0.5, np.float32)), "path": None}
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [good, None, good], "label": [0, 1, 2]}, feats)
    tf = build_transform(IDENTITY_8, train=False)
    with pytest.raises(DataError) as err:
        CGCDataset(ds, tf, DatasetSpec("holes", None))[1]
    assert "row 1" in str(err.value) and "empty (None)" in str(err.value)
    skipping = CGCDataset(ds, tf, DatasetSpec("holes", None), on_bad_image="skip")
    assert int(skipping[1]["labels"]) == 2 and skipping.bad_images == 1


# ------------------------------------------------------------------------- labels
def _labeled(labels, feature=None):
    img = Image.new("RGB", (4, 4))
    feats = datasets.Features(
        {"image": datasets.Image(), "label": feature or datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict({"image": [img] * len(labels), "label": labels}, feats)


def test_null_labels_are_one_clear_error():
    with pytest.raises(DataError) as err:
        load_splits(_labeled([0, None, 1, 1]), eval_split=None)
    msg = str(err.value)
    assert "1 of 4 rows have no label in column 'label' (None), e.g. row 1" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "labels, feature",
    [([3, 3, 3, 3], None), (["bird"] * 4, datasets.Value("string")),
     ([1, 1, 1, 1], datasets.ClassLabel(names=["a", "b"]))],
)  # fmt: skip
def test_a_single_class_is_refused(labels, feature):
    with pytest.raises(DataError, match="a classifier needs at least two"):
        load_splits(_labeled(labels, feature), eval_split=None)
    # An audit that ignores the labels may use a one-class dataset (a folder of birds).
    audit = load_splits(_labeled(labels, feature), eval_split=None, min_classes=1)
    assert len(audit.train) + len(audit.eval) == 4


def test_sparse_integer_labels_are_refused_or_remapped(caplog):
    ds = _labeled([0, 5, 99, 0, 5, 99])
    with pytest.raises(DataError) as err:
        load_splits(ds, eval_split=None)
    msg = str(err.value)
    assert "use 3 of the 100 class indices" in msg and "--remap_labels" in msg
    splits = load_splits(datasets.DatasetDict({"train": ds, "test": _labeled([99, 5])}),
                         remap_labels=True)  # fmt: skip
    assert splits.num_labels == 3 and splits.id2label == {0: "0", 1: "5", 2: "99"}
    assert splits.train["label"][:] == [0, 1, 2, 0, 1, 2] and splits.eval["label"][:] == [2, 1]
    assert "numbered 0..2 in sorted order (remap_labels): 0 -> 0, 5 -> 1, 99 -> 2" in caplog.text


def test_a_huge_label_value_does_not_hang():
    ds = _labeled([0, 1, 10**7, 1])
    start = time.perf_counter()
    with pytest.raises(DataError, match="use 3 of the 10000001 class indices"):
        load_splits(ds, eval_split=None)
    splits = load_splits(datasets.DatasetDict({"train": ds, "test": ds}), remap_labels=True)
    assert splits.id2label[2] == "10000000"
    assert time.perf_counter() - start < 20  # was minutes (a 10^7-name ClassLabel)

"""The generated dataset: reproducible, annotated correctly, and with the stated spurious cue."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cgc_hf.errors import CGCValueError
from cgc_hf.synthetic import CUE_PALETTE, SHAPES, cue_side, make_synthetic


@pytest.fixture(scope="module")
def data():
    # The flat-colour style: its shapes are uniform regions, which the tests below check.
    return make_synthetic(
        num_classes=4, train_size=400, eval_size=200, image_size=64, seed=3, background="clutter"
    )


def _arrays(split):
    images = np.stack([np.asarray(r["image"]) for r in split])  # (N, S, S, 3)
    masks = np.stack([np.asarray(r["mask"]) for r in split]) > 0  # (N, S, S)
    return images, masks


def _cue_from_pixels(image: np.ndarray, cue_size: float = 0.1) -> int | None:
    """Class whose palette colour fills one corner patch, read from the pixels alone."""
    s = image.shape[0]
    side = cue_side(s, cue_size)
    for y0 in (0, s - side):
        for x0 in (0, s - side):
            patch = image[y0 : y0 + side, x0 : x0 + side].reshape(-1, 3)
            if (patch == patch[0]).all():
                for k, colour in enumerate(CUE_PALETTE):
                    if tuple(patch[0]) == colour:
                        return k
    return None


def test_same_seed_same_data_other_seed_other_data():
    a = make_synthetic(train_size=8, eval_size=4, image_size=32, seed=7)
    b = make_synthetic(train_size=8, eval_size=4, image_size=32, seed=7)
    c = make_synthetic(train_size=8, eval_size=4, image_size=32, seed=8)
    for split in ("train", "validation", "test"):
        ia, ma = _arrays(a[split])
        ib, mb = _arrays(b[split])
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
        assert a[split]["label"][:] == b[split]["label"][:]
        assert a[split]["bbox"][:] == b[split]["bbox"][:]
    assert not np.array_equal(_arrays(a["train"])[0], _arrays(c["train"])[0])


def test_columns_sizes_and_balance(data):
    assert set(data) == {"train", "validation", "test"}
    assert len(data["train"]) == 400 and len(data["validation"]) == 200
    assert len(data["test"]) == 200  # test_size defaults to eval_size
    assert data["train"].features["label"].names == list(SHAPES[:4])
    row = data["train"][0]
    assert row["image"].mode == "RGB" and row["image"].size == (64, 64)
    assert row["mask"].mode == "L"
    for split in data.values():
        counts = np.bincount(np.asarray(split["label"][:]), minlength=4)
        assert (counts == len(split) // 4).all()


def test_mask_is_the_uniform_object_and_bbox_bounds_it(data):
    images, masks = _arrays(data["validation"])
    for image, mask, bbox in zip(images, masks, data["validation"]["bbox"][:]):
        assert mask.sum() > 20  # the object is visible
        inside = image[mask].astype(float)  # (n, 3)
        # The object is painted in one colour; the textured background never is.
        assert inside.std(axis=0).max() == 0
        ring = _dilate(mask, 3) & ~_dilate(mask, 1)
        assert image[ring].astype(float).std(axis=0).max() > 3
        ys, xs = np.nonzero(mask)
        assert bbox == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def test_object_is_the_largest_shape_in_its_colour_region(data):
    # Distractors are 30-50 % of the object's radius, so no other uniform region of the
    # image is as large as the object's visible part (unless the object is mostly hidden).
    images, masks = _arrays(data["train"])
    for image, mask in zip(images[:50], masks[:50]):
        colour = image[mask][0]
        same = (image == colour).all(-1)
        assert same[mask].all()
        assert (same & ~mask).sum() < mask.sum()


def test_spurious_cue_matches_label_at_stated_rate_in_train_only(data):
    k = 4
    for split, expected in (("train", 0.8), ("validation", 1 / k), ("test", 1 / k)):
        images, _ = _arrays(data[split])
        labels = np.asarray(data[split]["label"][:])
        cues = np.asarray([_cue_from_pixels(im) for im in images])
        assert (cues != None).all()  # noqa: E711  a patch is in every image
        assert np.array_equal(cues.astype(int), np.asarray(data[split]["cue_class"][:]))
        rate = float((cues.astype(int) == labels).mean())
        sd = np.sqrt(expected * (1 - expected) / len(labels))
        assert abs(rate - expected) < 4 * sd, (split, rate)


def test_spurious_strength_zero_never_matches_in_train():
    d = make_synthetic(num_classes=3, train_size=60, eval_size=6, image_size=32, seed=0,
                       spurious_strength=0.0)  # fmt: skip
    assert not np.any(np.asarray(d["train"]["cue_class"][:]) == np.asarray(d["train"]["label"][:]))


def test_cue_size_sets_the_patch_side():
    d = make_synthetic(train_size=8, eval_size=4, image_size=40, seed=2, cue_size=0.2)
    assert cue_side(40, 0.2) == 8
    images, _ = _arrays(d["validation"])
    cues = [_cue_from_pixels(im, cue_size=0.2) for im in images]
    assert cues == d["validation"]["cue_class"][:]


@pytest.mark.parametrize("scale", [(0.2, 0.2), (0.45, 0.45)])
def test_object_scale_is_the_disc_diameter(scale):
    # A disc is drawn at its nominal radius (the area equalisation leaves it unchanged), so the
    # box of an unhidden disc is the diameter, object_scale * image_size, to a pixel or two.
    size = 64
    d = make_synthetic(num_classes=2, train_size=40, eval_size=2, image_size=size, seed=5,
                       object_scale=scale, num_distractors=(0, 0))  # fmt: skip
    widths = [
        (x1 - x0, y1 - y0)
        for (x0, y0, x1, y1), y in zip(d["train"]["bbox"][:], d["train"]["label"][:])
        if y == 0  # disc
    ]
    assert len(widths) == 20
    # The corner patch may hide part of a disc: the larger side of the box is the diameter.
    assert all(abs(max(w) - scale[0] * size) <= 2 for w in widths), widths


def test_min_contrast_keeps_the_object_off_the_background_colour():
    # clutter=0 and no distractors: the background is one base colour (plus thin lines), read
    # as the median of the pixels outside the object; the object's colour is kept away from it.
    def distances(min_contrast: float) -> np.ndarray:
        d = make_synthetic(num_classes=4, train_size=8, eval_size=120, image_size=48, seed=4,
                           clutter=0.0, num_distractors=(0, 0), background="clutter",
                           min_contrast=min_contrast)  # fmt: skip
        images, masks = _arrays(d["validation"])
        out = []
        for image, mask in zip(images.astype(float), masks):
            background = np.median(image[~mask], axis=0)  # (3,)
            out.append(np.linalg.norm(image[mask][0] - background))
        return np.asarray(out)

    assert (distances(100.0) >= 90).mean() >= 0.95
    assert (distances(0.0) < 90).mean() >= 0.1  # without the knob, camouflage does happen


def test_fast_enough_for_an_offline_default():
    start = time.perf_counter()
    make_synthetic(train_size=800, eval_size=100, image_size=64, seed=1, background="clutter")
    assert time.perf_counter() - start < 20  # ~3 s measured on 2 shared cores


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 1}, {"num_classes": 9}, {"image_size": 8}, {"train_size": 2},
     {"spurious_strength": 1.5}, {"num_distractors": (3, 1)}, {"object_scale": (0.3, 0.7)},
     {"object_scale": (0.4, 0.3)}, {"distractor_scale": (0.5, 1.0)}, {"cue_size": 0.0},
     {"cue_size": 0.3}, {"clutter": -1.0}, {"min_contrast": 500.0}],
)  # fmt: skip
def test_bad_knobs_are_rejected(kwargs):
    with pytest.raises(CGCValueError):
        make_synthetic(**kwargs)


def test_photo_background_crops_real_photographs_and_keeps_the_annotations():
    pytest.importorskip("skimage.data", reason="scikit-image (the pretrained extra) is missing")
    kwargs = dict(num_classes=4, train_size=40, eval_size=40, image_size=64, seed=3)
    a = make_synthetic(background="photo", **kwargs)
    b = make_synthetic(background="photo", **kwargs)
    clutter = make_synthetic(background="clutter", **kwargs)
    images, masks = _arrays(a["validation"])
    assert np.array_equal(images, _arrays(b["validation"])[0])  # reproducible
    assert not np.array_equal(images, _arrays(clutter["validation"])[0])
    assert a["validation"]["label"][:] == clutter["validation"]["label"][:]
    textured = []
    for image, mask, bbox in zip(images, masks, a["validation"]["bbox"][:]):
        assert mask.sum() > 20
        ys, xs = np.nonzero(mask)
        assert bbox == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        textured.append(image[mask].astype(float).std(axis=0).max() > 2)
    # Photo textures inside the objects, not flat colours (a crop of night sky can be flat).
    assert np.mean(textured) >= 0.8
    cues = [_cue_from_pixels(im) for im in _arrays(a["train"])[0]]
    assert cues == a["train"]["cue_class"][:]


def test_unknown_background_is_rejected():
    with pytest.raises(CGCValueError, match="background"):
        make_synthetic(background="noise")

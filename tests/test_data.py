"""Loading, column checks, label casting, label-limited splits, images, transforms, collate."""

from __future__ import annotations

import io
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from cgc_hf.data import (
    DATASETS,
    CGCDataset,
    DataError,
    DatasetSpec,
    box_to_mask,
    build_transform,
    collate,
    load_split,
    load_splits,
    save_split,
    split_labeled,
    to_rgb,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IDENTITY_20 = {"input_size": (3, 20, 20), "mean": (0.0,) * 3, "std": (1.0,) * 3, "crop_pct": 1.0}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="TIFF" if image.mode == "I" else "PNG")  # PNG cannot hold mode I
    return buf.getvalue()


def _labels_ds(labels, names=None):
    names = names or [f"c{i}" for i in range(max(labels) + 1)]
    feats = datasets.Features({"label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"label": list(labels)}, features=feats)


# ------------------------------------------------------------------------- split_labeled
IMBALANCED = [0] * 30 + [1] * 12 + [2] * 5 + [3] * 2


def test_labels_per_class_takes_exactly_k_of_each_class():
    ds = _labels_ds(np.random.default_rng(0).permutation(IMBALANCED).tolist())
    labels = np.asarray(ds["label"][:])
    lab, unl = split_labeled(ds, labels_per_class=2, seed=1)
    assert np.bincount(labels[lab], minlength=4).tolist() == [2, 2, 2, 2]
    assert sorted(lab + unl) == list(range(len(ds))) and not set(lab) & set(unl)
    assert lab == sorted(lab) and unl == sorted(unl)


def test_label_fraction_is_stratified_with_at_least_one_per_class():
    labels = np.random.default_rng(1).permutation(IMBALANCED)
    lab, unl = split_labeled(labels.tolist(), label_fraction=0.1, seed=0)
    # round(0.1 * n_c), at least one: 30 -> 3, 12 -> 1, 5 -> 1 (0.5 rounds to 0), 2 -> 1
    assert np.bincount(labels[lab], minlength=4).tolist() == [3, 1, 1, 1]
    assert sorted(lab + unl) == list(range(labels.size))


def test_split_is_reproducible_for_a_seed_and_changes_with_it():
    labels = [i % 5 for i in range(200)]
    a = split_labeled(labels, labels_per_class=4, seed=3)
    assert a == split_labeled(labels, labels_per_class=4, seed=3)
    assert a != split_labeled(labels, labels_per_class=4, seed=4)
    f = split_labeled(labels, label_fraction=0.25, seed=3)
    assert f == split_labeled(labels, label_fraction=0.25, seed=3)


def test_too_few_rows_in_a_class_names_it():
    ds = _labels_ds(IMBALANCED, names=["albatross", "blackbird", "cardinal", "dove", "eagle"])
    with pytest.raises(DataError, match=r"class 3 \('dove'\) has 2 rows.*labels_per_class=3"):
        split_labeled(ds, labels_per_class=3)
    # a class with no rows at all (4, 'eagle') also cannot give K labels
    with pytest.raises(DataError, match=r"class 4 \('eagle'\) has 0 rows"):
        split_labeled(ds, labels_per_class=1)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"labels_per_class": 2, "label_fraction": 0.5}, {"labels_per_class": 0},
     {"label_fraction": 0.0}, {"label_fraction": 1.5}],
)  # fmt: skip
def test_split_needs_exactly_one_valid_option(kwargs):
    with pytest.raises(DataError):
        split_labeled([0, 1, 0, 1], **kwargs)


def test_save_and_load_split_round_trip(tmp_path):
    lab, unl = split_labeled([0, 1] * 10, labels_per_class=3, seed=0)
    path = tmp_path / "run" / "split.json"
    save_split(path, lab, unl, {"seed": 0, "labels_per_class": 3})
    assert load_split(path) == (lab, unl, {"seed": 0, "labels_per_class": 3})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="bad.json"):
        load_split(tmp_path / "bad.json")


# ------------------------------------------------------------------------- registry entries
BOX = (4, 6, 12, 14)  # x0, y0, x1, y1 of the object in every 20x20 stand-in image


def _expected_object() -> np.ndarray:
    m = np.zeros((20, 20), dtype=bool)
    m[BOX[1] : BOX[3], BOX[0] : BOX[2]] = True
    return m


def _standin(spec: DatasetSpec, n_classes: int = 3, per_split: int = 6):
    """A tiny DatasetDict with the columns and value formats the registry entry declares."""
    obj = _expected_object()
    rows: dict[str, list] = {spec.image_column: [], spec.label_column: []}
    feats = {spec.image_column: datasets.Image()}
    if spec.label_names_column:
        feats[spec.label_column] = datasets.Value("int64")
        feats[spec.label_names_column] = datasets.Value("string")
        rows[spec.label_names_column] = []
    else:
        feats[spec.label_column] = datasets.ClassLabel(names=[f"k{i}" for i in range(n_classes)])
    if spec.mask_column:
        feats[spec.mask_column] = datasets.Image()
        rows[spec.mask_column] = []
    elif spec.box_column:
        rows[spec.box_column] = []
        if spec.name == "aircraft":
            feats[spec.box_column] = {
                k: datasets.Value("int64") for k in ("ymin", "xmin", "ymax", "xmax")
            }
        else:
            feats[spec.box_column] = datasets.Sequence(datasets.Value("float32"), length=4)
    for i in range(per_split):
        rows[spec.image_column].append(Image.new("RGB", (20, 20), (i * 10, 50, 90)))
        rows[spec.label_column].append(i % n_classes)
        if spec.label_names_column:
            rows[spec.label_names_column].append(f"{i % n_classes:03d}.species")
        if spec.mask_column:
            if spec.mask_foreground == (1, 3):  # trimap: 1 object, 3 outline, 2 background
                trimap = np.full((20, 20), 2, np.uint8)
                trimap[obj] = 1
                trimap[BOX[1], BOX[0] : BOX[2]] = 3
                rows[spec.mask_column].append(Image.fromarray(trimap))
            else:
                rows[spec.mask_column].append(Image.fromarray(obj.astype(np.uint8) * 255))
        elif spec.name == "aircraft":
            x0, y0, x1, y1 = BOX
            rows[spec.box_column].append({"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1})
        elif spec.box_column:
            rows[spec.box_column].append(list(map(float, BOX)))
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(feats))
    splits = [spec.train_split] + ([spec.eval_split] if spec.eval_split else [])
    return datasets.DatasetDict({s: ds for s in splits})


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_registry_entry_maps_its_columns(name, tmp_path):
    spec = DATASETS[name]
    assert name == "synthetic" or (spec.hub_id and "/" in spec.hub_id)
    _standin(spec).save_to_disk(str(tmp_path / name))
    splits = load_splits(name, source=str(tmp_path / name))
    assert splits.num_labels == 3 and len(splits.train) == 6 and len(splits.eval) == 6
    if spec.label_names_column:
        assert splits.id2label == {0: "000.species", 1: "001.species", 2: "002.species"}
    else:
        assert splits.id2label == {0: "k0", 1: "k1", 2: "k2"}
    ds = CGCDataset(splits.train, build_transform(IDENTITY_20, train=False), splits.spec)
    item = ds[1]
    assert item["pixel_values"].shape == (3, 20, 20) and int(item["labels"]) == 1
    assert ("mask" in item) == spec.has_object
    if spec.has_object:
        assert torch.equal(item["mask"], torch.from_numpy(_expected_object()).float())


def test_missing_columns_list_the_available_ones_and_name_the_flag():
    img = Image.new("RGB", (8, 8))
    ds = datasets.Dataset.from_dict({"img": [img, img], "target": [0, 1]})
    with pytest.raises(DataError) as err:
        load_splits(ds)  # the image column is found by its type; no label column is obvious
    msg = str(err.value)
    assert "label column 'label'" in msg and "['img', 'target']" in msg
    assert "--label_column_name" in msg
    with pytest.raises(DataError, match=r"image column 'imgs'.*'img'.*--image_column_name"):
        load_splits(ds, image_column="imgs", label_column="target")
    splits = load_splits(ds, label_column="target")
    assert splits.spec.image_column == "img" and splits.num_labels == 2


def test_registry_columns_missing_from_a_local_copy_fail_clearly(tmp_path):
    img = Image.new("RGB", (8, 8))
    dd = datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({"picture": [img], "label": [0]}) for s in ("train", "test")}
    )
    with pytest.raises(DataError, match=r"no image column 'image'.*\['picture', 'label'\]"):
        load_splits("cars", source=dd)


# ------------------------------------------------------------------------- labels
def test_int_labels_are_cast_without_renumbering():
    img = Image.new("RGB", (4, 4))
    # class_encode_column would sort "1" < "10" < "2" and renumber; the values must stay.
    train = datasets.Dataset.from_dict({"image": [img] * 3, "label": [10, 2, 1]})
    test = datasets.Dataset.from_dict({"image": [img] * 2, "label": [0, 2]})
    splits = load_splits(datasets.DatasetDict({"train": train, "test": test}))
    assert isinstance(splits.train.features["label"], datasets.ClassLabel)
    assert splits.train["label"][:] == [10, 2, 1] and splits.eval["label"][:] == [0, 2]
    assert splits.num_labels == 11 and splits.id2label[10] == "10"


def test_string_labels_become_sorted_class_names():
    img = Image.new("RGB", (4, 4))
    train = datasets.Dataset.from_dict({"image": [img] * 3, "label": ["wren", "auk", "jay"]})
    test = datasets.Dataset.from_dict({"image": [img], "label": ["jay"]})
    splits = load_splits(datasets.DatasetDict({"train": train, "test": test}))
    assert splits.id2label == {0: "auk", 1: "jay", 2: "wren"}
    assert splits.train["label"][:] == [2, 0, 1] and splits.eval["label"][:] == [1]


def test_labels_outside_the_class_range_are_rejected():
    img = Image.new("RGB", (4, 4))
    neg = datasets.Dataset.from_dict({"image": [img] * 2, "label": [0, -1]})
    with pytest.raises(DataError, match=r"outside \[0, 1\), e.g. -1 at row 1"):
        load_splits(neg, eval_split=None)
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])}
    )
    train = datasets.Dataset.from_dict({"image": [img], "label": [0]}, features=feats)
    test = datasets.Dataset.from_dict({"image": [img], "label": [0]}, features=feats)
    test = test.cast_column("label", datasets.Value("int64")).map(lambda r: {"label": 4})
    with pytest.raises(DataError, match=r"outside \[0, 1\), e.g. 4 at row 0"):
        load_splits(datasets.DatasetDict({"train": train, "test": test}))


def test_missing_eval_split_holds_out_a_seeded_stratified_slice(tmp_path):
    img = Image.new("RGB", (4, 4))
    labels = [i % 4 for i in range(80)]
    datasets.Dataset.from_dict({"image": [img] * 80, "label": labels}).save_to_disk(
        str(tmp_path / "only_train")
    )
    a = load_splits(str(tmp_path / "only_train"), seed=5)
    b = load_splits(str(tmp_path / "only_train"), seed=5)
    assert len(a.eval) == 8 and len(a.train) == 72
    assert np.bincount(np.asarray(a.eval["label"][:]), minlength=4).tolist() == [2, 2, 2, 2]
    assert a.eval["label"][:] == b.eval["label"][:]
    with pytest.raises(DataError, match="eval_split 'tset'.*'train'"):
        load_splits(str(tmp_path / "only_train"), eval_split="tset")


def test_image_folder_is_loaded_with_class_names_from_directories(tmp_path):
    for split in ("train", "test"):
        for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            d = tmp_path / "folder" / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), colour).save(d / f"{i}.png")
    splits = load_splits(str(tmp_path / "folder"))
    assert splits.id2label == {0: "cat", 1: "dog"}
    assert len(splits.train) == 6 and len(splits.eval) == 6
    row = splits.train[0]
    assert np.asarray(row["image"])[0, 0].tolist() == (
        [200, 0, 0] if row["label"] == 0 else [0, 0, 200]
    )


def test_offline_hub_failure_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_splits("cub")
    msg = str(err.value)
    assert msg.startswith("dataset 'cub' (hub id 'bentrevett/caltech-ucsd-birds-200-2011') could")
    assert "\n" not in msg
    with pytest.raises(DataError, match="'someone/some-images'.*could not be downloaded"):
        load_splits("someone/some-images")
    with pytest.raises(DataError, match="Close matches: 'pets'"):
        load_splits("pest")


# ------------------------------------------------------------------------- images
def test_to_rgb_converts_every_mode_with_the_right_values():
    assert to_rgb(Image.new("L", (3, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))  # fully transparent -> background white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("RGBA", (2, 2), (10, 20, 30, 255))
    assert to_rgb(opaque).getpixel((0, 0)) == (10, 20, 30)
    i16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert i16.mode.startswith("I;16")
    assert [to_rgb(i16).getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (100,) * 3, (255,) * 3]
    i32 = Image.fromarray(np.array([[0, 257 * 40]], dtype=np.int32))
    assert i32.mode == "I" and to_rgb(i32).getpixel((1, 0)) == (40, 40, 40)
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 250, 100, 5] + [0] * 762)
    assert to_rgb(pal).getpixel((0, 0)) == (250, 100, 5)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (1, 1))).mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "I", "P", "LA", "1", "tiny"])
def test_dataset_items_from_any_image_mode(mode):
    if mode == "tiny":
        image = Image.new("RGB", (1, 2), (9, 9, 9))
    elif mode == "I;16":
        image = Image.fromarray(np.full((7, 5), 40000, dtype=np.uint16))
    else:
        image = Image.new(mode, (7, 5))
    ds = datasets.Dataset.from_dict(
        {"image": [_png(image)], "label": [0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    spec = DatasetSpec("modes", None)
    tf = build_transform({"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}, False)
    item = CGCDataset(ds, tf, spec)[0]
    assert item["pixel_values"].shape == (3, 16, 16) and torch.isfinite(item["pixel_values"]).all()


def _broken_dataset():
    good = _png(Image.new("RGB", (6, 6), (0, 255, 0)))
    truncated = _png(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))
    )
    images = [{"bytes": good, "path": None}, {"bytes": b"not an image", "path": None},
              {"bytes": truncated[: len(truncated) // 2], "path": None},
              {"bytes": good, "path": None}]  # fmt: skip
    return datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 2, 3]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )


def test_corrupt_and_truncated_images_raise_with_the_row_index():
    tf = build_transform({"input_size": (3, 6, 6), "mean": (0,) * 3, "std": (1,) * 3}, False)
    ds = CGCDataset(_broken_dataset(), tf, DatasetSpec("broken", None))
    assert int(ds[0]["labels"]) == 0
    with pytest.raises(DataError, match="row 1 "):
        ds[1]
    with pytest.raises(DataError, match="row 2 "):
        ds[2]


def test_corrupt_images_are_skipped_and_counted():
    tf = build_transform({"input_size": (3, 6, 6), "mean": (0,) * 3, "std": (1,) * 3}, False)
    ds = CGCDataset(_broken_dataset(), tf, DatasetSpec("broken", None), on_bad_image="skip")
    item = ds[1]  # rows 1 and 2 are unreadable: the substitute is row 3
    assert int(item["labels"]) == 3 and ds.bad_images == 2
    assert torch.allclose(item["pixel_values"][1], torch.ones(6, 6))  # the green image
    with pytest.raises(DataError, match="on_bad_image"):
        CGCDataset(_broken_dataset(), tf, DatasetSpec("broken", None), on_bad_image="ignore")


def test_unlabeled_rows_get_ignore_index_and_collate_stacks():
    dd = load_splits("synthetic", synthetic_kwargs={"train_size": 8, "eval_size": 4,
                                                    "image_size": 32})  # fmt: skip
    tf = build_transform({"input_size": (3, 24, 24), "mean": (0.5,) * 3, "std": (0.2,) * 3}, True)
    ds = CGCDataset(dd.train, tf, dd.spec, unlabeled=True)
    batch = collate([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 24, 24) and batch["mask"].shape == (3, 24, 24)
    assert batch["labels"].tolist() == [-100] * 3 and batch["labels"].dtype == torch.int64
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(DataError, match="keys"):
        collate([{"pixel_values": torch.zeros(1)}, {"labels": torch.zeros(1)}])


# ------------------------------------------------------------------------- geometry
def test_box_rasterisation_in_every_format():
    expected = np.zeros((4, 6), dtype=bool)
    expected[1:3, 2:5] = True  # columns 2..4, rows 1..2
    assert np.array_equal(box_to_mask([2, 1, 5, 3], 6, 4), expected)
    assert np.array_equal(box_to_mask([2, 1, 3, 2], 6, 4, "xywh"), expected)
    assert np.array_equal(box_to_mask([0.25, 2 / 6, 0.75, 5 / 6], 6, 4, "yxyx_norm"), expected)
    assert np.array_equal(box_to_mask({"xmin": 2, "ymin": 1, "xmax": 5, "ymax": 3}, 6, 4), expected)
    union = box_to_mask([[2, 1, 5, 2], [2, 2, 5, 3]], 6, 4)
    assert np.array_equal(union, expected)
    assert box_to_mask([-5, -5, 100, 100], 6, 4).all()  # clipped to the image


def _half_image(width: int = 48, height: int = 40):
    """Left half white, right half black; the mask marks the white half."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = 255
    mask = np.zeros((height, width), bool)
    mask[:, : width // 2] = True
    return Image.fromarray(arr), mask


@pytest.mark.parametrize("train", [True, False])
def test_mask_moves_exactly_with_the_image(train):
    from torchvision import tv_tensors

    image, mask = _half_image()
    cfg = {"input_size": (3, 24, 24), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875}
    tf = build_transform(cfg, train=train)
    white_on_right = 0
    for seed in range(40):
        torch.manual_seed(seed)
        x, m = tf(image, tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))[None]))
        v = x[0] * 0.5 + 0.5  # (24, 24) back to [0, 1]
        # Pixels the interpolated edge does not reach are exactly black or white.
        clear = (v < 0.01) | (v > 0.99)
        assert clear.float().mean() > 0.6
        assert torch.equal(v[clear] > 0.5, m[0][clear].bool())
        white_on_right += int(v[:, -1].mean() > v[:, 0].mean())
    if train:
        assert 5 < white_on_right < 35  # flips happen, both ways
    else:
        assert white_on_right == 0


def test_transforms_use_the_models_own_size_mean_and_std():
    grey = Image.new("RGB", (50, 30), (51, 102, 204))
    cfg = {"input_size": (3, 24, 32), "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.25, 0.2),
           "interpolation": "bicubic", "crop_pct": 0.9}  # fmt: skip
    for train in (True, False):
        x = build_transform(cfg, train)(grey)
        assert x.shape == (3, 24, 32)
        expected = (
            torch.tensor([51, 102, 204]) / 255 - torch.tensor([0.1, 0.2, 0.3])
        ) / torch.tensor([0.5, 0.25, 0.2])
        assert torch.allclose(x.mean((1, 2)), expected, atol=1e-4)
    with pytest.raises(DataError, match="mean"):
        build_transform({"input_size": (3, 8, 8), "std": (1, 1, 1)}, False)


def test_eval_resizes_by_crop_pct_then_center_crops():
    # 64x64 image, input 32, crop_pct 0.5 -> resize to 64 (no-op), center crop 32:
    # the output is exactly the central 32x32 block of the input.
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    cfg = {"input_size": (3, 32, 32), "mean": (0,) * 3, "std": (1,) * 3, "crop_pct": 0.5}
    x = build_transform(cfg, train=False)(Image.fromarray(arr))
    assert torch.allclose(x, torch.from_numpy(arr[16:48, 16:48]).permute(2, 0, 1) / 255)

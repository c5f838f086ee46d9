"""Object masks and boxes from the user's own data: columns, box formats, mask values, mask folders.

Each dataset is built locally and run through load_splits -> CGCDataset -> collate; Content
Heatmap and the pointing game are then computed with cgc_hf.metrics on heatmaps whose values are
known, and compared with the value counted by hand.
"""

from __future__ import annotations

import logging
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from cgc_hf import DataArguments, content_heatmap, pointing_game
from cgc_hf.data import CGCDataset, DataError, build_transform, collate, load_splits

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = 20
IDENTITY = {"input_size": (3, SIZE, SIZE), "mean": (0.0,) * 3, "std": (1.0,) * 3, "crop_pct": 1.0}
X0, Y0, X1, Y1 = 4, 6, 12, 14  # the object: columns 4..11, rows 6..13 of every 20x20 image


def _object() -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    m[Y0:Y1, X0:X1] = True
    return m


def _heatmaps() -> torch.Tensor:
    """Two heatmaps: the left half at 1, plus a peak of 5 inside the object (first) or not."""
    h = torch.zeros(2, SIZE, SIZE)
    h[:, :, :10] = 1.0
    h[0, 8, 5] = 5.0  # inside the object
    h[1, 1, 1] = 5.0  # outside
    return h


# By hand: the left half holds 200 pixels of weight 1, 48 of them (rows 6..13, columns 4..9)
# in the object; each peak adds 4. Inside: 48 + 4 (first) or 48 (second), of a total of 204.
EXPECTED_CH = [100 * 52 / 204, 100 * 48 / 204]
EXPECTED_PG = [1.0, 0.0]


def _check_metrics(splits, spec=None) -> None:
    ds = CGCDataset(splits.eval, build_transform(IDENTITY, train=False), spec or splits.spec)
    batch = collate([ds[0], ds[1]])
    assert torch.equal(batch["mask"][0], torch.from_numpy(_object()).float())
    ch = content_heatmap(_heatmaps(), batch["mask"])
    assert torch.allclose(ch, torch.tensor(EXPECTED_CH), atol=1e-4)
    assert pointing_game(_heatmaps(), batch["mask"]).tolist() == EXPECTED_PG


def _dataset(extra: dict, features: dict, n: int = 4) -> datasets.DatasetDict:
    rows = {"image": [Image.new("RGB", (SIZE, SIZE), (i * 30, 90, 20)) for i in range(n)],
            "label": [i % 2 for i in range(n)], **{k: v * n for k, v in extra.items()}}  # fmt: skip
    feats = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"]), **features}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(feats))
    return datasets.DatasetDict({"train": ds, "test": ds})


def _mask_image(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8))


# ------------------------------------------------------------------------- mask and box columns
def test_mask_column_of_a_saved_dataset_is_found_and_logged(tmp_path, caplog):
    mask = _mask_image(_object() * 255)
    box = [float(v) for v in (0, 0, 3, 3)]  # a wrong box: the mask must win
    dd = _dataset({"mask": [mask], "bbox": [box]}, {"mask": datasets.Image(),
                  "bbox": datasets.Sequence(datasets.Value("float32"), length=4)})  # fmt: skip
    dd.save_to_disk(str(tmp_path / "mine"))
    with caplog.at_level(logging.INFO, logger="cgc_hf"):
        splits = load_splits(str(tmp_path / "mine"))
    assert splits.spec.mask_column == "mask" and splits.spec.box_column == "bbox"
    assert "found the mask column 'mask'" in caplog.text
    assert "object = nonzero values" in caplog.text
    _check_metrics(splits)


def test_named_columns_are_checked_with_close_matches():
    dd = _dataset({"segmentation": [_mask_image(_object())]}, {"segmentation": datasets.Image()})
    with pytest.raises(DataError) as err:
        load_splits(dd, mask_column="segmentaton")
    msg = str(err.value)
    assert "no mask column 'segmentaton'" in msg and "Close matches: 'segmentation'" in msg
    assert "--mask_column_name" in msg and "\n" not in msg
    with pytest.raises(DataError, match=r"no box column 'bbox'.*--box_column_name"):
        load_splits(dd, box_column="bbox")
    _check_metrics(load_splits(dd, mask_column="segmentation"))


def test_two_mask_like_columns_are_not_guessed(caplog):
    m = _mask_image(_object())
    dd = _dataset({"mask_a": [m], "mask_b": [m]}, {"mask_a": datasets.Image(),
                                                   "mask_b": datasets.Image()})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="cgc_hf"):
        splits = load_splits(dd)
    assert splits.spec.mask_column is None and splits.spec.image_column == "image"
    assert "several columns could be the mask" in caplog.text
    assert "--mask_column_name" in caplog.text
    _check_metrics(load_splits(dd, mask_column="mask_b"))


W, H = X1 - X0, Y1 - Y0
BOXES = [
    ("xyxy", [X0, Y0, X1, Y1]),
    ("xywh", [X0, Y0, W, H]),
    ("xyxy_norm", [X0 / SIZE, Y0 / SIZE, X1 / SIZE, Y1 / SIZE]),
    ("xywh_norm", [X0 / SIZE, Y0 / SIZE, W / SIZE, H / SIZE]),
    ("yxyx_norm", [Y0 / SIZE, X0 / SIZE, Y1 / SIZE, X1 / SIZE]),
    (None, {"xmin": X0, "ymin": Y0, "xmax": X1, "ymax": Y1}),
    (None, {"x": X0, "y": Y0, "width": W, "height": H}),
    ("xyxy_norm", {"left": X0 / SIZE, "top": Y0 / SIZE, "right": X1 / SIZE, "bottom": Y1 / SIZE}),
    ("xywh", [[X0, Y0, W, 4], [X0, Y0 + 4, W, 4]]),  # two boxes, united
    ("xywh", {"bbox": [[X0, Y0, W, 4], [X0, Y0 + 4, W, 4]], "category": [3, 3]}),  # objects
]


BOX_IDS = [f"{i}-{f}" for i, (f, _) in enumerate(BOXES)]


@pytest.mark.parametrize("box_format, box", BOXES, ids=BOX_IDS)
def test_box_column_in_each_format(box_format, box):
    if isinstance(box, dict) and "bbox" in box:
        feature = {"bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                   "category": datasets.Sequence(datasets.Value("int64"))}  # fmt: skip
    elif isinstance(box, dict):
        feature = {k: datasets.Value("float32") for k in box}
    elif isinstance(box[0], list):
        feature = datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4))
    else:
        feature = datasets.Sequence(datasets.Value("float32"), length=4)
    dd = _dataset({"region": [box]}, {"region": feature})
    splits = load_splits(dd, box_column="region", box_format=box_format)
    assert splits.spec.box_column == "region" and splits.spec.mask_column is None
    _check_metrics(splits)


def test_a_box_column_named_like_a_box_is_found(caplog):
    dd = _dataset({"bounding_box": [{"xmin": X0, "ymin": Y0, "xmax": X1, "ymax": Y1}]},
                  {"bounding_box": {k: datasets.Value("int32")
                                    for k in ("xmin", "ymin", "xmax", "ymax")}})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="cgc_hf"):
        splits = load_splits(dd)
    assert splits.spec.box_column == "bounding_box" and "found the box column" in caplog.text
    _check_metrics(splits)


@pytest.mark.parametrize(
    "box, box_format, message",
    [
        ([0.2, 0.3, 0.6, 0.7], "xyxy", "look like fractions.*--box_format xyxy_norm"),
        ([10, 12, 4, 4], "xyxy", "far corner lies before.*--box_format xywh"),
        ([4, 6, 12, 14], "xyxy_norm", "values above 1"),
    ],
)
def test_boxes_that_contradict_the_format_are_refused(box, box_format, message):
    dd = _dataset({"bbox": [box]}, {"bbox": datasets.Sequence(datasets.Value("float32"))})
    with pytest.raises(DataError, match=message):
        load_splits(dd, box_format=box_format)


# ------------------------------------------------------------------------- mask values
def _soft() -> np.ndarray:
    """A soft 0-255 mask: the object at 200-255, a halo of 60-127 around it, background 0-40."""
    rng = np.random.default_rng(0)
    soft = rng.integers(0, 41, (SIZE, SIZE))
    halo = np.zeros((SIZE, SIZE), bool)
    halo[Y0 - 2 : Y1 + 2, X0 - 2 : X1 + 2] = True
    soft[halo] = rng.integers(60, 128, int(halo.sum()))
    soft[_object()] = rng.integers(200, 256, int(_object().sum()))
    return soft


@pytest.mark.parametrize(
    "kind, values, options",
    [
        ("binary 0/1", _object().astype(np.uint8), {}),
        ("binary 0/255", _object() * 255, {}),
        ("soft 0-255, > 127", _soft(), {}),
        (
            "label-index, nonzero",
            np.where(_object(), np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 3 + 1, 0),
            {},
        ),  # fmt: skip
        ("trimap 1/2/3", np.where(_object(), 1, 2), {"mask_foreground": (1, 3)}),
        ("soft, threshold 0.5", _soft(), {"mask_threshold": 0.5}),
    ],
)
def test_mask_values_of_each_kind(kind, values, options, caplog):
    if kind.startswith("trimap"):
        values = values.copy()
        values[Y0, X0:X1] = 3  # the outline counts as object
    dd = _dataset({"mask": [_mask_image(values)]}, {"mask": datasets.Image()})
    with caplog.at_level(logging.INFO, logger="cgc_hf"):
        splits = load_splits(dd, **options)
    if kind.startswith("soft") and not options:
        assert splits.spec.mask_threshold == 0.5 and "above 0.5 of the full scale" in caplog.text
    _check_metrics(splits)


def test_a_mask_without_background_value_is_not_guessed():
    trimap = np.where(_object(), 1, 2)
    trimap[0, 0] = 3
    dd = _dataset({"mask": [_mask_image(trimap)]}, {"mask": datasets.Image()})
    with pytest.raises(DataError, match=r"values \[1, 2, 3\] and no 0.*--mask_foreground_values"):
        load_splits(dd)


def test_a_mask_of_another_size_moves_with_the_image():
    # The image is 48x40, white on its left half; the mask marks that half at 24x20.
    arr = np.zeros((40, 48, 3), np.uint8)
    arr[:, :24] = 255
    small = np.zeros((20, 24), np.uint8)
    small[:, :12] = 255
    rows = {"image": [Image.fromarray(arr)] * 2, "label": [0, 1]}
    rows["mask"] = [Image.fromarray(small)] * 2
    feats = {"image": datasets.Image(), "label": datasets.Value("int64"), "mask": datasets.Image()}
    splits = load_splits(datasets.Dataset.from_dict(rows, features=datasets.Features(feats)),
                         eval_split=None, eval_fraction=0.5)  # fmt: skip
    cfg = {"input_size": (3, 24, 24), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875}
    for train in (True, False):
        ds = CGCDataset(splits.train, build_transform(cfg, train=train), splits.spec)
        for seed in range(20):
            torch.manual_seed(seed)
            item = ds[0]
            v = item["pixel_values"][0] * 0.5 + 0.5  # (24, 24) back to [0, 1]
            clear = (v < 0.01) | (v > 0.99)  # away from the interpolated edge
            assert clear.float().mean() > 0.6
            assert torch.equal(v[clear] > 0.5, item["mask"][clear].bool())


# ------------------------------------------------------------------------- mask folder
def _image_folder(root, layout: str):
    """class_name/stem.png images under root/images, masks as PNG under root/masks."""
    for split in ("train", "test"):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(2):
                stem = f"{cls}_{split}_{i}"
                d = root / "images" / split / cls
                d.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (SIZE, SIZE), (c * 200, i * 100, 50)).save(d / f"{stem}.png")
                trimap = np.where(_object(), 1, 2).astype(np.uint8)
                trimap[Y0, X0:X1] = 3
                m = root / "masks" / (split + "/" + cls if layout == "mirrored" else "")
                m.mkdir(parents=True, exist_ok=True)
                Image.fromarray(trimap).save(m / f"{stem}.png")


@pytest.mark.parametrize("layout", ["flat", "mirrored"])
def test_an_image_folder_with_a_mask_folder(tmp_path, layout):
    _image_folder(tmp_path, layout)
    args = DataArguments(dataset_name=str(tmp_path / "images"), mask_dir=str(tmp_path / "masks"),
                         mask_foreground_values=(1, 3))  # fmt: skip
    splits = args.load_splits()
    assert splits.spec.mask_column == "mask" and splits.id2label == {0: "cat", 1: "dog"}
    _check_metrics(splits)


def test_a_mask_folder_missing_a_mask_says_which(tmp_path):
    _image_folder(tmp_path, "flat")
    (tmp_path / "masks" / "dog_test_1.png").unlink()
    with pytest.raises(DataError, match=r"no mask for 1 of 4 images of split 'test'.*dog_test_1"):
        load_splits(str(tmp_path / "images"), mask_dir=str(tmp_path / "masks"),
                    mask_foreground=(1, 3))  # fmt: skip
    with pytest.raises(DataError, match="mask_dir '.*nowhere' is not a directory"):
        load_splits(str(tmp_path / "images"), mask_dir=str(tmp_path / "nowhere"))


def test_a_saved_image_folder_finds_its_masks_by_file_name(tmp_path):
    # save_to_disk keeps only the images' file names: the masks are matched by those.
    _image_folder(tmp_path, "flat")
    datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "images")).save_to_disk(
        str(tmp_path / "saved")
    )
    splits = load_splits(str(tmp_path / "saved"), mask_dir=str(tmp_path / "masks"),
                         mask_foreground=(1, 3))  # fmt: skip
    _check_metrics(splits)

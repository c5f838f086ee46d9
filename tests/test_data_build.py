"""build_datasets: the labeled / unlabeled / eval datasets of a run, as the recipe used them."""

from __future__ import annotations

import io
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from cgc_hf import DataArguments, build_datasets
from cgc_hf.data import IGNORE_INDEX, DataError, collate, load_splits, split_labeled

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = {"input_size": (3, 24, 24), "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 1.0}
SYNTHETIC = {"train_size": 24, "eval_size": 8, "image_size": 32}


@pytest.fixture(scope="module")
def splits():
    return load_splits("synthetic", seed=3, synthetic_kwargs=SYNTHETIC)


def test_labels_per_class_splits_the_training_rows_as_split_labeled(splits):
    data = build_datasets(splits, CONFIG, labels_per_class=2, seed=3)
    lab, unl = split_labeled(splits.train, labels_per_class=2, seed=3)
    assert (data.labeled_idx, data.unlabeled_idx) == (lab, unl)
    assert len(data.labeled) == len(lab) and len(data.unlabeled) == len(unl)
    assert len(data.eval) == len(splits.eval)
    assert data.label_setting == f"{len(lab)} of {len(splits.train)} training labels"
    # Unlabeled rows carry IGNORE_INDEX; labeled rows their own label, in row order.
    assert int(data.unlabeled[0]["labels"]) == IGNORE_INDEX
    assert int(data.labeled[1]["labels"]) == splits.train[lab[1]]["label"]
    item = data.labeled[0]
    assert item["pixel_values"].shape == (3, 24, 24) and item["mask"].shape == (24, 24)


def test_all_labels_and_no_unlabeled_data(splits):
    data = build_datasets(splits, CONFIG)
    assert data.labeled_idx == list(range(len(splits.train))) and data.unlabeled is None
    assert data.label_setting == "all training labels"
    # "none" drops the rows a label budget left over: the fully-supervised setting.
    none = build_datasets(splits, CONFIG, labels_per_class=2, unlabeled="none")
    assert none.unlabeled is None and none.unlabeled_idx == []
    assert len(none.labeled) == 2 * splits.num_labels


def test_train_transform_is_random_and_eval_transform_is_not(splits):
    data = build_datasets(splits, CONFIG)
    torch.manual_seed(0)
    a, b = data.labeled[0]["pixel_values"], data.labeled[0]["pixel_values"]
    assert not torch.equal(a, b)
    assert torch.equal(data.eval[0]["pixel_values"], data.eval[0]["pixel_values"])
    # crop_scale (1, 1) with ratio (1, 1) on a square image is the whole image, maybe flipped.
    whole = build_datasets(splits, CONFIG, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    x = whole.labeled[0]["pixel_values"]
    ref = whole.eval.transform(Image.fromarray(np.asarray(splits.train[0]["image"])))
    assert torch.allclose(x, ref, atol=1e-5) or torch.allclose(x, ref.flip(-1), atol=1e-5)
    with pytest.raises(DataError, match="scale"):
        build_datasets(splits, CONFIG, crop_scale=(0.5, 2.0))


def test_a_flat_folder_of_images_is_an_unlabeled_pool(splits, tmp_path):
    # No class subfolders, so no label column: unlabeled data needs none.
    folder = tmp_path / "pool"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")
    data = build_datasets(splits, CONFIG, unlabeled=str(tmp_path / "pool"), seed=3)
    assert len(data.unlabeled) == 5 and data.unlabeled_idx == []
    assert int(data.unlabeled[0]["labels"]) == IGNORE_INDEX
    assert data.unlabeled[0]["pixel_values"].shape == (3, 24, 24)


def test_the_labeled_dataset_as_its_own_unlabeled_pool_keeps_the_eval_slice_out(tmp_path):
    folder = tmp_path / "only_train"
    rows = {"image": [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(40)],
            "label": [i % 2 for i in range(40)]}  # fmt: skip
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    splits = load_splits(str(folder), seed=1)  # no eval split: a held-out slice
    data = build_datasets(splits, CONFIG, unlabeled=str(folder), seed=1)
    assert len(data.unlabeled) == len(splits.train) == 40 - len(splits.eval)


def _with_broken_rows(n: int = 12, broken: tuple[int, ...] = (2, 3, 7)):
    images = [{"bytes": _png(Image.new("RGB", (16, 16), (i * 20, 0, 0))), "path": None}
              for i in range(n)]  # fmt: skip
    for i in broken:
        images[i] = {"bytes": b"not an image", "path": None}
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, feats)
    return load_splits(datasets.DatasetDict({"train": ds, "test": ds}))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_are_counted_across_the_datasets():
    data = build_datasets(_with_broken_rows(), CONFIG, on_bad_image="skip")
    assert data.bad_images == 0
    for ds in (data.labeled, data.eval):
        for i in range(len(ds)):
            ds[i]
    assert data.labeled.bad_rows == [2, 3, 7] and data.bad_images == 6


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_are_counted_with_dataloader_workers(workers):
    data = build_datasets(_with_broken_rows(), CONFIG, on_bad_image="skip")
    loader = torch.utils.data.DataLoader(
        data.eval, batch_size=4, num_workers=workers, collate_fn=collate
    )
    labels = torch.cat([batch["labels"] for batch in loader])
    # Rows 2 and 3 are replaced by row 4, row 7 by row 8: every row yields an item.
    assert labels.tolist() == [0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1]
    assert data.eval.bad_rows == [2, 3, 7] and data.bad_images == 3


def test_data_arguments_read_yaml_values_by_type_and_check_them():
    args = DataArguments(
        mask_foreground_values=["1", "3"],
        remap_labels="no",
        labels_per_class="5",
        unlabeled_dataset="none",
        mask_threshold="0.5",
    )
    assert args.mask_foreground_values == (1, 3) and args.remap_labels is False
    assert args.labels_per_class == 5 and args.mask_threshold == 0.5
    assert args.unlabeled_dataset == "none"  # the word, not None: it means "no unlabeled data"
    for bad, match in [({"box_format": "xyxy_pixels"}, "box_format must be one of xyxy"),
                       ({"labels_per_class": 2, "label_fraction": 0.5}, "not both"),
                       ({"mask_threshold": 1.5}, r"mask_threshold must be a number in \[0, 1\)"),
                       ({"mask_dir": "m", "mask_column_name": "mask"}, "give one")]:  # fmt: skip
        with pytest.raises(DataError, match=match):
            DataArguments(**bad)


def test_data_arguments_build_the_run_datasets(splits):
    args = DataArguments(synthetic_kwargs=SYNTHETIC, labels_per_class=2, unlabeled_dataset="none")
    loaded = args.load_splits(seed=3)
    assert loaded.train["label"][:] == splits.train["label"][:]
    data = args.build_datasets(loaded, CONFIG, seed=3)
    assert data.unlabeled is None and len(data.labeled) == 2 * loaded.num_labels
    rest = DataArguments(synthetic_kwargs=SYNTHETIC, labels_per_class=2)
    assert len(rest.build_datasets(loaded, CONFIG, seed=3).unlabeled) == len(loaded.train) - 8


def test_transformers_example_data_flags(tmp_path):
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(folder / f"{i}.png")
    args = DataArguments(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"),
                         max_train_samples=5, max_eval_samples=3)  # fmt: skip
    splits = args.load_splits(seed=0)
    assert splits.id2label == {0: "cat", 1: "dog"} and splits.spec.name == str(tmp_path / "train")
    assert len(splits.train) == 5 and len(splits.eval) == 3
    again = args.load_splits(seed=0)
    assert again.train["label"][:] == splits.train["label"][:]  # seeded subset
    held = DataArguments(train_dir=str(tmp_path / "train"), train_val_split=0.5).load_splits()
    assert len(held.train) == 6 and len(held.eval) == 6  # half of each class held out
    with pytest.raises(DataError, match="not both"):
        DataArguments(dataset_name="cub", train_dir=str(tmp_path / "train"))
    with pytest.raises(DataError, match="train_val_split must be in"):
        DataArguments(train_val_split=1.5)

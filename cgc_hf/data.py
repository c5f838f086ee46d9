"""Datasets for CGC fine-tuning: named Hub datasets, image folders, saved datasets, label-limited
splits, transforms taken from the model's own data config, and a collate function.

Every dataset is reduced to three facts, a :class:`DatasetSpec`: which column holds the image,
which the class, and which (if any) a box or mask of the object, the ground truth that the
Content Heatmap metric needs. Columns are checked when the data is loaded, never assumed.

Example:
    >>> splits = load_splits("synthetic", synthetic_kwargs={"train_size": 80, "eval_size": 20})
    >>> labeled, unlabeled = split_labeled(splits.train, labels_per_class=5, seed=0)
    >>> tf = build_transform(model.config.data_config, train=True)
    >>> ds = CGCDataset(splits.train.select(labeled), tf, splits.spec)
    >>> batch = collate([ds[0], ds[1]])  # pixel_values (2, 3, H, W), labels (2,), mask (2, H, W)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import DataError, close_matches
from .synthetic import make_synthetic

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of an unlabeled row (Hugging Face convention, as in modeling.py)
BOX_FORMATS = ("xyxy", "xywh", "yxyx_norm")
BAD_IMAGE_POLICIES = ("raise", "skip")
_EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and which columns carry the image, the class and the object.

    Args:
        name: short name (registry key, path or Hub id).
        hub_id: Hugging Face Hub dataset id (parquet; ``datasets`` >= 4 runs no loading scripts).
        image_column: column of images.
        label_column: column of classes (``ClassLabel``, integer or string).
        box_column: column of object boxes, or None.
        mask_column: column of object masks (images), or None. Preferred over the box.
        train_split: split used for training.
        eval_split: split used for evaluation; None holds out a seeded slice of ``train_split``.
        notes: provenance and caveats.
        box_format: ``"xyxy"`` / ``"xywh"`` in pixels, or ``"yxyx_norm"`` (TFDS order, in [0, 1]);
            boxes stored as dicts with ``xmin, ymin, xmax, ymax`` keys are read by key.
        mask_foreground: mask values that mean "object" (e.g. trimap codes); None: nonzero for
            0/1 masks, above 127 for 0-255 masks.
        label_names_column: column with the class name of each row, used to name integer labels.
    """

    name: str
    hub_id: str | None
    image_column: str = "image"
    label_column: str = "label"
    box_column: str | None = None
    mask_column: str | None = None
    train_split: str = "train"
    eval_split: str | None = "test"
    notes: str = ""
    box_format: str = "xyxy"
    mask_foreground: tuple[int, ...] | None = None
    label_names_column: str | None = None

    def __post_init__(self) -> None:
        if self.box_format not in BOX_FORMATS:
            raise DataError(
                f"box_format must be one of {BOX_FORMATS}; got {self.box_format!r} "
                f"(dataset {self.name!r})."
            )

    @property
    def has_object(self) -> bool:
        """Whether the rows carry a box or mask of the object (needed by Content Heatmap)."""
        return self.box_column is not None or self.mask_column is not None


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "synthetic",
            None,
            box_column="bbox",
            mask_column="mask",
            eval_split="validation",
            notes="Generated offline by cgc_hf.synthetic.make_synthetic: shapes on clutter with "
            "distractors and a train-only spurious corner cue; splits train/validation/test.",
        ),
        DatasetSpec(
            "cub",
            "bentrevett/caltech-ucsd-birds-200-2011",
            box_column="bbox",
            notes="CUB-200-2011, 200 species, 5994 train / 5794 test; bbox is [x0, y0, x1, y1] "
            "pixels (some boxes reach x1 > w - x0, so it is not x, y, w, h).",
        ),
        DatasetSpec(
            "cub_masks",
            "dpdl-benchmark/caltech_birds2011",
            mask_column="segmentation_mask",
            label_names_column="label_name",
            notes="CUB-200-2011 with segmentation masks (soft 0-255, object > 127); integer "
            "label named by label_name.",
        ),
        DatasetSpec(
            "cars",
            "tanganke/stanford_cars",
            notes="Stanford Cars, 196 classes, 8144 train / 8041 test; no boxes in this mirror.",
        ),
        DatasetSpec(
            "aircraft",
            "HuggingFaceM4/FGVC-Aircraft",
            label_column="variant",
            box_column="bbox",
            notes="FGVC-Aircraft, 100 variants (the standard task); train/validation/test. bbox is "
            "a struct of xmin, ymin, xmax, ymax pixels. Other mirrors' columns are unverified: "
            "pass --label_column_name family for the 70-family task.",
        ),
        DatasetSpec(
            "flowers102",
            "dpdl-benchmark/oxford_flowers102",
            notes="Oxford Flowers-102 (train/validation/test); integer labels are named by index.",
        ),
        DatasetSpec(
            "dogs",
            "maurice-fp/stanford-dogs",
            notes="Stanford Dogs, 120 breeds; this mirror's box column is unverified, so none is "
            "declared.",
        ),
        DatasetSpec(
            "pets",
            "dpdl-benchmark/oxford_iiit_pet",
            mask_column="segmentation_mask",
            mask_foreground=(1, 3),
            notes="Oxford-IIIT Pet, 37 breeds, 3680 train / 3669 test; the mask is the trimap "
            "(1 pet, 2 background, 3 outline); pet and outline count as the object.",
        ),
    )
}
"""Named datasets. Column facts come from the dataset cards and are re-checked at load time."""


@dataclass
class Splits:
    """The loaded train and eval splits with the resolved columns and class names."""

    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset
    spec: DatasetSpec
    num_labels: int
    id2label: dict[int, str]


# ---------------------------------------------------------------------------------- loading
def load_splits(
    dataset: Any = "synthetic",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    eval_split: str | None = None,
    seed: int = 0,
    synthetic_kwargs: dict[str, Any] | None = None,
    source: Any = None,
    eval_fraction: float = 0.1,
) -> Splits:
    """Load a dataset's train and eval splits, check its columns, and make labels ``ClassLabel``.

    Args:
        dataset: a :data:`DATASETS` name, a Hub dataset id, a local image folder
            (``class_name/image.jpg``), a ``save_to_disk`` directory, or a ``datasets.Dataset`` /
            ``DatasetDict`` object.
        image_column: override of the image column (``--image_column_name``).
        label_column: override of the label column (``--label_column_name``).
        eval_split: split to evaluate on (default: the spec's; a missing one is replaced by a
            seeded, stratified ``eval_fraction`` of the training split).
        seed: seed of the synthetic data and of a held-out eval slice.
        synthetic_kwargs: keyword arguments of :func:`make_synthetic`.
        source: for a registry name, read its columns from this local copy (a ``save_to_disk``
            directory or a ``DatasetDict``) instead of the Hub, e.g. on a machine offline.
        eval_fraction: share of each class held out when there is no eval split.

    Returns:
        :class:`Splits`; ``spec`` names the columns actually used.

    Raises:
        DataError: the dataset cannot be found or downloaded, a split or column is missing, or
            a label is outside ``[0, num_labels)``.
    """
    spec, dd = _resolve(dataset, source, seed, synthetic_kwargs or {})
    spec = dataclasses.replace(
        spec,
        image_column=image_column or spec.image_column,
        label_column=label_column or spec.label_column,
    )
    splits = list(dd)
    if spec.train_split not in dd:
        raise DataError(
            f"dataset {spec.name!r} has no split {spec.train_split!r} to train on; it has {splits}."
        )
    wanted_eval = eval_split if eval_split is not None else spec.eval_split
    if eval_split is not None and eval_split not in dd:
        raise DataError(
            f"eval_split {eval_split!r} is not a split of dataset {spec.name!r}; it has "
            f"{splits}.{close_matches(eval_split, splits)}"
        )
    if wanted_eval is not None and wanted_eval not in dd:
        logger.warning(
            "dataset %r has no split %r (it has %s); holding out %.0f%% of %r for evaluation.",
            spec.name, wanted_eval, splits, 100 * eval_fraction, spec.train_split,
        )  # fmt: skip
        wanted_eval = None
    train = dd[spec.train_split]
    spec = _check_columns(train, spec, spec.train_split)
    if wanted_eval is not None:
        evald = dd[wanted_eval]
        _check_columns(evald, spec, wanted_eval)
    else:
        evald = None
    train, evald, names = _cast_labels(train, evald, spec)
    if evald is None:
        rest, held = _holdout(_labels(train, spec.label_column), eval_fraction, seed)
        train, evald = train.select(rest), train.select(held)
    spec = dataclasses.replace(spec, eval_split=wanted_eval)
    id2label = dict(enumerate(names))
    logger.info(
        "dataset %r: %d train / %d eval rows, %d classes, object annotation: %s",
        spec.name, len(train), len(evald), len(names), spec.mask_column or spec.box_column,
    )  # fmt: skip
    return Splits(train=train, eval=evald, spec=spec, num_labels=len(names), id2label=id2label)


def _resolve(dataset: Any, source: Any, seed: int, synthetic_kwargs: dict[str, Any]):
    """Return (spec, DatasetDict) for any accepted form of ``dataset``."""
    import datasets

    if isinstance(dataset, (datasets.Dataset, datasets.DatasetDict)):
        dd = _as_dict(dataset)
        return _generic_spec("<in-memory dataset>", None, dd), dd
    if not isinstance(dataset, (str, os.PathLike)):
        raise DataError(
            f"dataset must be a registry name, Hub id, directory or datasets object; got "
            f"{type(dataset).__name__}."
        )
    name = os.fspath(dataset)
    if name in DATASETS:
        spec = DATASETS[name]
        if source is not None:
            return spec, _load_local(source)
        if name == "synthetic":
            kwargs = {"seed": seed, **synthetic_kwargs}
            return spec, make_synthetic(**kwargs)
        return spec, _load_hub(spec.hub_id, name)
    if os.path.isdir(name):
        dd = _load_local(name)
        return _generic_spec(name, None, dd), dd
    if os.path.exists(name):
        raise DataError(
            f"dataset {name!r} is a file; pass a directory (an image folder or a save_to_disk "
            "output), a registry name or a Hub id."
        )
    if "/" not in name:
        raise DataError(
            f"dataset {name!r} is not a registry name ({sorted(DATASETS)}), an existing "
            f"directory, or a Hub id of the form 'owner/name'.{close_matches(name, DATASETS)}"
        )
    dd = _load_hub(name, name)
    return _generic_spec(name, name, dd), dd


def _as_dict(obj: Any):
    import datasets

    if isinstance(obj, datasets.Dataset):
        return datasets.DatasetDict({"train": obj})
    return obj


def _load_local(path: Any):
    """A save_to_disk directory, an image folder, or an in-memory datasets object."""
    import datasets

    if isinstance(path, (datasets.Dataset, datasets.DatasetDict)):
        return _as_dict(path)
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"source {str(path)!r} is not a directory.")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _as_dict(datasets.load_from_disk(str(path)))
    try:
        dd = datasets.load_dataset("imagefolder", data_dir=str(path))
    except (OSError, ValueError) as err:
        raise DataError(
            f"directory {str(path)!r} is neither a save_to_disk output nor a readable image folder "
            f"(class_name/image.jpg): {_first_line(err)}"
        ) from err
    return _as_dict(dd)


def _load_hub(hub_id: str | None, name: str):
    import datasets

    try:
        return _as_dict(datasets.load_dataset(hub_id))
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError are OSErrors
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise DataError(
            f"dataset {name!r} (hub id {hub_id!r}) could not be downloaded{offline}: "
            f"{_first_line(err)}. Download it where the Hub is reachable and pass the "
            "save_to_disk copy (load_splits(name, source=DIR)), or use dataset='synthetic'."
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _generic_spec(name: str, hub_id: str | None, dd: Any) -> DatasetSpec:
    """Guess the columns of a dataset outside the registry from its features."""
    import datasets

    first = next(iter(dd.values()))
    feats = first.features
    images = [c for c, f in feats.items() if isinstance(f, datasets.Image)]
    classes = [c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)]
    label = classes[0] if len(classes) == 1 else ("labels" if "labels" in feats else "label")
    splits = list(dd)
    train = "train" if "train" in dd else splits[0]
    evals = [s for s in _EVAL_SPLIT_NAMES if s in dd and s != train]
    return DatasetSpec(
        name=name,
        hub_id=hub_id,
        image_column=images[0] if images else "image",
        label_column=label,
        train_split=train,
        eval_split=evals[0] if evals else None,
    )


def _check_columns(ds: Any, spec: DatasetSpec, split: str) -> DatasetSpec:
    """Raise for a missing image / label column; drop a declared box or mask that is absent."""
    cols = list(ds.column_names)
    for role, col, flag in (
        ("image", spec.image_column, "--image_column_name"),
        ("label", spec.label_column, "--label_column_name"),
    ):
        if col not in cols:
            raise DataError(
                f"dataset {spec.name!r} (split {split!r}) has no {role} column {col!r}; its "
                f"columns are {cols}.{close_matches(col, cols)} Name the right one with {flag} "
                f"(load_splits({role}_column=...))."
            )
    for field_name in ("box_column", "mask_column"):
        col = getattr(spec, field_name)
        if col is not None and col not in cols:
            logger.warning(
                "dataset %r (split %r) has no %s %r (columns: %s); Content Heatmap will not be "
                "computed from it.", spec.name, split, field_name, col, cols,
            )  # fmt: skip
            spec = dataclasses.replace(spec, **{field_name: None})
    return spec


def _labels(ds: Any, column: str) -> np.ndarray:
    """The label column as an array, honouring the dataset's index mapping (select/shuffle)."""
    return np.asarray(ds.with_format("numpy")[column][:])


def _cast_labels(train: Any, evald: Any | None, spec: DatasetSpec):
    """Make the label column a ``ClassLabel`` with the same names in both splits."""
    import datasets

    col = spec.label_column
    parts = [d for d in (train, evald) if d is not None]
    feats = [d.features[col] for d in parts]
    class_feats = [f for f in feats if isinstance(f, datasets.ClassLabel)]
    if len(class_feats) == 2 and class_feats[0].names != class_feats[1].names:
        raise DataError(
            f"dataset {spec.name!r}: the train and eval splits name their classes differently "
            f"in column {col!r} ({len(class_feats[0].names)} vs {len(class_feats[1].names)} names)."
        )
    if class_feats:
        names = list(class_feats[0].names)
    elif all(_is_int(f) for f in feats):
        values = np.concatenate([_labels(d, col) for d in parts])
        count = int(values.max()) + 1 if values.size else 0
        names = [str(i) for i in range(count)]
        if spec.label_names_column is not None and spec.label_names_column in train.column_names:
            # Name each integer by the first row that carries it (dict keeps the first).
            pairs = zip(_labels(train, col).tolist(), train[spec.label_names_column][:])
            named: dict[int, str] = {}
            for value, label_name in pairs:
                named.setdefault(int(value), str(label_name))
            names = [named.get(i, str(i)) for i in range(count)]
    elif all(_is_str(f) for f in feats):
        names = sorted({str(v) for d in parts for v in d[col][:]})
    else:
        raise DataError(
            f"label column {col!r} of dataset {spec.name!r} has type {feats[0]}; it needs integer, "
            "string or ClassLabel values (one class per image). Choose another with "
            "--label_column_name."
        )
    if not names:
        raise DataError(f"dataset {spec.name!r} has no labels in column {col!r}.")
    target = datasets.ClassLabel(names=names)
    out = []
    for d, f in zip(parts, feats):
        if _is_str(f) or not isinstance(f, datasets.ClassLabel) or f.names != names:
            # cast_column with ClassLabel(names=...) keeps integer values as they are; it never
            # renumbers them (class_encode_column would, lexicographically).
            d = d.cast_column(col, target)
        _check_range(d, col, len(names), spec.name)
        out.append(d)
    return out[0], (out[1] if evald is not None else None), names


def _is_int(feature: Any) -> bool:
    dtype = getattr(feature, "dtype", "")
    return isinstance(dtype, str) and dtype.startswith(("int", "uint"))


def _is_str(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _check_range(ds: Any, col: str, num_labels: int, name: str) -> None:
    values = _labels(ds, col)
    bad = np.nonzero((values < 0) | (values >= num_labels))[0]
    if bad.size:
        raise DataError(
            f"dataset {name!r}: {bad.size} labels in column {col!r} are outside [0, "
            f"{num_labels}), e.g. {int(values[bad[0]])} at row {int(bad[0])}. Drop those rows "
            "(or use them as the unlabeled pool) before training."
        )


def _holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified hold-out: about ``fraction`` of each class, never its last example."""
    if not 0 < fraction < 1:
        raise DataError(f"eval_fraction must be in (0, 1); got {fraction!r}.")
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        held.extend(idx[: min(int(round(fraction * idx.size)), idx.size - 1)].tolist())
    held_set = set(held)
    return [i for i in range(labels.size) if i not in held_set], sorted(held)


# ------------------------------------------------------------------------- label-limited splits
def split_labeled(
    dataset: Any,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    seed: int = 0,
    *,
    label_column: str = "label",
) -> tuple[list[int], list[int]]:
    """Choose which rows keep their label; the rest form the unlabeled pool.

    Exactly one of ``labels_per_class`` (exactly K rows of every class) or ``label_fraction``
    (``round(p * n_c)`` rows of each class c, at least one) must be given. The choice depends
    only on the labels and ``seed``.

    Args:
        dataset: a ``datasets.Dataset`` (labels read from ``label_column``) or a sequence of
            integer labels.
        labels_per_class: K labeled rows per class.
        label_fraction: share p in (0, 1] of each class that stays labeled.
        seed: seed of the choice.
        label_column: label column of a ``datasets.Dataset`` (``Splits.spec.label_column``).

    Returns:
        ``(labeled_idx, unlabeled_idx)``, sorted, disjoint, together every row.

    Raises:
        DataError: both or neither option given, or a class has fewer than K rows.
    """
    if (labels_per_class is None) == (label_fraction is None):
        raise DataError(
            "split_labeled needs exactly one of labels_per_class or label_fraction; got "
            f"labels_per_class={labels_per_class!r}, label_fraction={label_fraction!r}."
        )
    labels, names = _labels_and_names(dataset, label_column)
    classes = range(len(names)) if names is not None else np.unique(labels).tolist()
    if labels_per_class is not None and not (
        isinstance(labels_per_class, int) and labels_per_class >= 1
    ):
        raise DataError(f"labels_per_class must be an integer >= 1; got {labels_per_class!r}.")
    if label_fraction is not None and not 0 < label_fraction <= 1:
        raise DataError(f"label_fraction must be in (0, 1]; got {label_fraction!r}.")
    rng = np.random.default_rng(seed)
    labeled: list[int] = []
    for c in classes:
        idx = np.nonzero(labels == c)[0]
        name = f"{c} ({names[c]!r})" if names is not None else str(c)
        if labels_per_class is not None:
            if idx.size < labels_per_class:
                raise DataError(
                    f"class {name} has {idx.size} rows, fewer than labels_per_class="
                    f"{labels_per_class}; lower it or use label_fraction."
                )
            take = labels_per_class
        else:
            if idx.size == 0:
                continue
            take = min(idx.size, max(1, int(round(label_fraction * idx.size))))
        labeled.extend(rng.permutation(idx)[:take].tolist())
    labeled.sort()
    chosen = set(labeled)
    return labeled, [i for i in range(labels.size) if i not in chosen]


def _labels_and_names(dataset: Any, column: str) -> tuple[np.ndarray, list[str] | None]:
    import datasets

    if isinstance(dataset, datasets.Dataset):
        if column not in dataset.column_names:
            raise DataError(
                f"label_column {column!r} is not a column of the dataset; its columns are "
                f"{dataset.column_names}.{close_matches(column, dataset.column_names)}"
            )
        feat = dataset.features[column]
        names = list(feat.names) if isinstance(feat, datasets.ClassLabel) else None
        return _labels(dataset, column).astype(np.int64), names
    return np.asarray(list(dataset), dtype=np.int64), None


def save_split(
    path: str | os.PathLike,
    labeled_idx: Sequence[int],
    unlabeled_idx: Sequence[int],
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a labeled / unlabeled split as JSON, so a run can record and reuse it."""
    payload = {
        "labeled_idx": [int(i) for i in labeled_idx],
        "unlabeled_idx": [int(i) for i in unlabeled_idx],
        "meta": dict(meta or {}),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload))


def load_split(path: str | os.PathLike) -> tuple[list[int], list[int], dict[str, Any]]:
    """Read what :func:`save_split` wrote: ``(labeled_idx, unlabeled_idx, meta)``."""
    try:
        payload = json.loads(Path(path).read_text())
        return list(payload["labeled_idx"]), list(payload["unlabeled_idx"]), payload["meta"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"cannot read a split from {str(path)!r}: {_first_line(err)}") from err


# ---------------------------------------------------------------------------------- images
def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Grayscale is replicated, 16-bit and 32-bit integer or float images are scaled to 0-255
    (16-bit by 1/257; wider ranges by their own min and max), palette images go through their
    palette, and transparency is composited onto white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)  # (H, W)
        if mode.startswith("I;16") or (arr.min() >= 0 and arr.max() <= 65535 and arr.max() > 255):
            arr = arr / 257.0
        elif arr.min() < 0 or arr.max() > 255:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _foreground(mask: Image.Image, values: tuple[int, ...] | None) -> np.ndarray:
    """Boolean (H, W) object mask from a mask image."""
    if mask.mode in ("RGB", "RGBA", "LA", "P") and values is None:
        mask = mask.convert("L")
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if values is not None:
        return np.isin(arr, np.asarray(values))
    return arr > (0 if arr.max(initial=0) <= 1 else 127)


def box_to_mask(box: Any, width: int, height: int, box_format: str = "xyxy") -> np.ndarray:
    """Rasterise a box (or a list of boxes, united) into a boolean ``(height, width)`` mask.

    A pixel is inside when its centre is: ``x0 <= x + 0.5 < x1`` (pixel-edge coordinates).
    """
    out = np.zeros((height, width), dtype=bool)
    boxes = box if _is_box_list(box) else [box]
    for b in boxes:
        x0, y0, x1, y1 = _box_xyxy(b, width, height, box_format)
        c0, c1 = max(0, math.ceil(x0 - 0.5)), min(width, math.ceil(x1 - 0.5))
        r0, r1 = max(0, math.ceil(y0 - 0.5)), min(height, math.ceil(y1 - 0.5))
        out[r0:r1, c0:c1] = True
    return out


def _is_box_list(box: Any) -> bool:
    return (
        isinstance(box, (list, tuple))
        and len(box) > 0
        and isinstance(box[0], (list, tuple, dict, np.ndarray))
    )


def _box_xyxy(box: Any, width: int, height: int, fmt: str) -> tuple[float, ...]:
    if isinstance(box, dict):
        return tuple(float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
    vals = [float(v) for v in box]
    if len(vals) != 4:
        raise DataError(f"a box needs 4 numbers; got {box!r}.")
    if fmt == "xywh":
        x, y, w, h = vals
        return x, y, x + w, y + h
    if fmt == "yxyx_norm":
        y0, x0, y1, x1 = vals
        return x0 * width, y0 * height, x1 * width, y1 * height
    return tuple(vals)


# ---------------------------------------------------------------------------------- transforms
def build_transform(
    data_config: dict[str, Any],
    train: bool,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
):
    """Image (+ mask) transform from the model's own data config.

    Train: random resized crop to ``input_size`` and horizontal flip (standard fine-tuning
    augmentation). Eval: resize to ``input_size / crop_pct`` (shorter side for square inputs)
    and center crop. Then scale to [0, 1] and normalise with the config's mean and std.
    Geometry is applied identically to a ``tv_tensors.Mask`` passed alongside (nearest
    interpolation); normalisation is not.

    Args:
        data_config: ``CGCModel.config.data_config``: ``input_size`` (3, H, W), ``mean``,
            ``std``; optional ``interpolation`` (default bilinear), ``crop_pct`` (default 1),
            ``crop_mode`` (``"center"`` or ``"squash"``).
        train: training (random) or evaluation (deterministic) transform.
        scale: area range of the random resized crop.
        ratio: aspect-ratio range of the random resized crop.
        hflip: probability of a horizontal flip.

    Returns:
        A ``torchvision.transforms.v2`` transform: ``tf(image)`` or ``tf(image, mask)``.

    Shape:
        image: PIL or (3, h, w) -> (3, H, W) float; mask: (1, h, w) -> (1, H, W), same dtype.
    """
    from torchvision.transforms import v2

    missing = [k for k in ("input_size", "mean", "std") if k not in data_config]
    if missing:
        raise DataError(
            f"data_config lacks {missing}; pass CGCModel.config.data_config (it holds "
            f"input_size, mean, std). Got keys {sorted(data_config)}."
        )
    scale, ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise DataError(
            f"scale (--train_crop_scale) must be two numbers 0 < min <= max <= 1, as fractions "
            f"of the image area, e.g. (0.08, 1.0); got {scale!r}."
        )
    if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
        raise DataError(
            f"ratio must be two numbers 0 < min <= max, e.g. (0.75, 1.333); got {ratio!r}."
        )
    h, w = (int(v) for v in tuple(data_config["input_size"])[-2:])
    mean = [float(v) for v in data_config["mean"]]
    std = [float(v) for v in data_config["std"]]
    interp_name = str(data_config.get("interpolation") or "bilinear")
    try:
        interp = v2.InterpolationMode(interp_name)
    except ValueError:
        # timm's "random" picks bilinear or bicubic per call; bilinear keeps runs reproducible.
        logger.info("interpolation %r is not a single mode; using bilinear.", interp_name)
        interp = v2.InterpolationMode.BILINEAR
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    if train:
        geometry = [
            v2.RandomResizedCrop((h, w), scale=scale, ratio=ratio, interpolation=interp),
            v2.RandomHorizontalFlip(hflip),
        ]
    else:
        scaled = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        square_center = h == w and data_config.get("crop_mode", "center") != "squash"
        geometry = [
            v2.Resize(scaled[0] if square_center else scaled, interpolation=interp),
            v2.CenterCrop((h, w)),
        ]
    return v2.Compose(
        [
            v2.ToImage(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


# ---------------------------------------------------------------------------------- torch side
class CGCDataset(torch.utils.data.Dataset):
    """A Hugging Face dataset as model inputs: normalised image, label, and object mask.

    Items are dicts: ``pixel_values`` float ``(3, H, W)``; ``labels`` int64 scalar (``-100``
    when ``unlabeled``); ``mask`` float ``(H, W)`` in {0, 1}, only when the spec has a box or
    mask column (a box is rasterised at the image's size, then both go through the same
    geometry).

    Args:
        hf_dataset: a ``datasets.Dataset`` with the spec's columns.
        transform: from :func:`build_transform` (any callable ``tf(image, mask)`` /
            ``tf(image)`` that returns tensors works).
        spec: the :class:`DatasetSpec` naming the columns (``Splits.spec``).
        unlabeled: ignore the labels (rows feed the CGC term only).
        on_bad_image: ``"raise"`` a :class:`DataError` naming the row, or ``"skip"``: log it,
            count it in :attr:`bad_images` (distinct rows, each logged once) and return the
            next readable row instead. With DataLoader workers each worker counts its own.

    Example:
        >>> ds = CGCDataset(splits.train, build_transform(data_config, train=True), splits.spec)
        >>> ds[0]["pixel_values"].shape
        torch.Size([3, 224, 224])
    """

    def __init__(
        self,
        hf_dataset: Any,
        transform: Any,
        spec: DatasetSpec,
        unlabeled: bool = False,
        on_bad_image: str = "raise",
    ) -> None:
        import datasets

        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise DataError(
                f"on_bad_image must be one of {BAD_IMAGE_POLICIES}; got {on_bad_image!r}."
            )
        required = [spec.image_column] + ([] if unlabeled else [spec.label_column])
        required += [c for c in (spec.mask_column or spec.box_column,) if c is not None]
        cols = list(hf_dataset.column_names)
        for col in required:
            if col not in cols:
                raise DataError(
                    f"column {col!r} named by the spec of {spec.name!r} is not in the dataset; "
                    f"its columns are {cols}.{close_matches(col, cols)}"
                )
        # Decode images here, not in datasets, so that a broken file is caught per row.
        for col in (spec.image_column, spec.mask_column):
            if col is not None and isinstance(hf_dataset.features[col], datasets.Image):
                hf_dataset = hf_dataset.cast_column(col, datasets.Image(decode=False))
        self.hf_dataset = hf_dataset
        self.transform = transform
        self.spec = spec
        self.unlabeled = unlabeled
        self.on_bad_image = on_bad_image
        self.bad_rows: set[int] = set()
        self._decoder = datasets.Image()

    def __len__(self) -> int:
        return len(self.hf_dataset)

    @property
    def bad_images(self) -> int:
        """How many distinct rows were skipped as unreadable so far (``on_bad_image='skip'``)."""
        return len(self.bad_rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        n = len(self)
        for step in range(min(n, 16)):
            row = (index + step) % n
            try:
                return self._item(row)
            except _BadImage as err:
                if self.on_bad_image == "raise":
                    raise DataError(
                        f"row {row} of dataset {self.spec.name!r} has an unreadable image: {err}. "
                        "Pass on_bad_image='skip' (--on_bad_image skip) to substitute the next "
                        "readable row."
                    ) from err
                if row not in self.bad_rows:
                    self.bad_rows.add(row)
                    logger.warning("skipping unreadable image at row %d: %s", row, err)
        raise DataError(
            f"{min(n, 16)} consecutive rows from {index} of dataset {self.spec.name!r} have "
            "unreadable images; the data is likely broken."
        )

    def _decode(self, value: Any, row: int, col: str) -> Image.Image:
        try:
            image = self._decoder.decode_example(value)
            image.load()
            return image
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise _BadImage(f"column {col!r}: {type(err).__name__}: {_first_line(err)}") from err

    def _item(self, row: int) -> dict[str, Tensor]:
        from torchvision import tv_tensors

        spec = self.spec
        record = self.hf_dataset[row]
        image = self._decode(record[spec.image_column], row, spec.image_column)
        try:
            image = to_rgb(image)
        except (OSError, ValueError) as err:
            raise _BadImage(f"{type(err).__name__}: {_first_line(err)}") from err
        width, height = image.size
        obj = None
        if spec.mask_column is not None:
            mask_image = self._decode(record[spec.mask_column], row, spec.mask_column)
            if mask_image.size != image.size:
                mask_image = mask_image.resize(image.size, Image.NEAREST)
            obj = _foreground(mask_image, spec.mask_foreground)  # (h, w) bool
        elif spec.box_column is not None:
            obj = box_to_mask(record[spec.box_column], width, height, spec.box_format)
        transform = self.transform or _default_transform()
        out: dict[str, Tensor] = {}
        if obj is not None:
            mask = tv_tensors.Mask(torch.from_numpy(obj.astype(np.uint8))[None])  # (1, h, w)
            pixel_values, mask = transform(image, mask)
            out["pixel_values"] = torch.as_tensor(pixel_values).as_subclass(Tensor)  # (3, H, W)
            out["mask"] = mask.as_subclass(Tensor)[0].float()  # (H, W)
        else:
            out["pixel_values"] = torch.as_tensor(transform(image)).as_subclass(Tensor)
        label = IGNORE_INDEX if self.unlabeled else int(record[spec.label_column])
        out["labels"] = torch.tensor(label, dtype=torch.int64)
        return out


class _BadImage(Exception):
    """An image that cannot be decoded (internal: turned into DataError or a skip)."""


def _default_transform():
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def collate(rows: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack the items of :class:`CGCDataset` into a batch.

    Shape:
        pixel_values (B, 3, H, W), labels (B,), mask (B, H, W) when present.
    """
    if not rows:
        raise DataError("collate got an empty list of rows.")
    keys = list(rows[0])
    for i, r in enumerate(rows):
        if list(r) != keys:
            raise DataError(f"row {i} has keys {sorted(r)}, row 0 has {sorted(keys)}.")
    return {k: torch.stack([r[k] for r in rows]) for k in keys}

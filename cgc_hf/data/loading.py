"""Loading: any accepted form of a dataset becomes checked train and eval splits.

A registry name, a Hub id, an image folder, a ``save_to_disk`` directory or a ``datasets``
object is resolved to a ``DatasetDict`` and a :class:`DatasetSpec`; the columns are checked and
the labels made a ``ClassLabel`` with the same names in both splits.

Example:
    >>> splits = load_splits("synthetic", synthetic_kwargs={"train_size": 80, "eval_size": 20})
    >>> splits.num_labels, splits.spec.mask_column
    (4, 'mask')
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, close_matches, first_line
from ..synthetic import make_synthetic
from .registry import DATASETS, DatasetSpec
from .splits import holdout, label_array

logger = logging.getLogger(__name__)

_EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


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
        rest, held = holdout(label_array(train, spec.label_column), eval_fraction, seed)
        train, evald = train.select(rest), train.select(held)
    spec = dataclasses.replace(spec, eval_split=wanted_eval)
    id2label = dict(enumerate(names))
    logger.info(
        "dataset %r: %d train / %d eval rows, %d classes, object annotation: %s",
        spec.name, len(train), len(evald), len(names), spec.mask_column or spec.box_column,
    )  # fmt: skip
    return Splits(train=train, eval=evald, spec=spec, num_labels=len(names), id2label=id2label)


def load_unlabeled(
    dataset: Any,
    *,
    image_column: str | None = None,
    seed: int = 0,
    synthetic_kwargs: dict[str, Any] | None = None,
    source: Any = None,
) -> tuple[Any, DatasetSpec]:
    """Load a pool of unlabeled images: the training split of ``dataset``, labels not needed.

    Accepts what :func:`load_splits` accepts, and also a flat folder of images (no class
    subfolders) or a dataset without a label column. Labels that exist are ignored, and so are
    boxes and masks (the CGC term needs neither); every row of the training split is used.

    Returns:
        ``(rows, spec)``: a ``datasets.Dataset`` and the :class:`DatasetSpec` naming its image
        column, for ``CGCDataset(rows, transform, spec, unlabeled=True)``.

    Raises:
        DataError: the dataset cannot be found, or has no image column.
    """
    spec, dd = _resolve(dataset, source, seed, synthetic_kwargs or {})
    spec = dataclasses.replace(
        spec, image_column=image_column or spec.image_column, box_column=None, mask_column=None
    )
    if spec.train_split not in dd:
        raise DataError(
            f"unlabeled dataset {spec.name!r} has no split {spec.train_split!r}; it has {list(dd)}."
        )
    rows = dd[spec.train_split]
    _check_columns(rows, spec, spec.train_split, need_label=False)
    logger.info("unlabeled pool %r: %d images", spec.name, len(rows))
    return rows, spec


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
            f"(class_name/image.jpg): {first_line(err)}"
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
            f"{first_line(err)}. Download it where the Hub is reachable and pass the "
            "save_to_disk copy (load_splits(name, source=DIR)), or use dataset='synthetic'."
        ) from err


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


def _check_columns(ds: Any, spec: DatasetSpec, split: str, need_label: bool = True) -> DatasetSpec:
    """Raise for a missing image / label column; drop a declared box or mask that is absent."""
    cols = list(ds.column_names)
    roles = [("image", spec.image_column, "--image_column_name")]
    if need_label:
        roles.append(("label", spec.label_column, "--label_column_name"))
    for role, col, flag in roles:
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
        values = np.concatenate([label_array(d, col) for d in parts])
        count = int(values.max()) + 1 if values.size else 0
        names = [str(i) for i in range(count)]
        if spec.label_names_column is not None and spec.label_names_column in train.column_names:
            # Name each integer by the first row that carries it (dict keeps the first).
            pairs = zip(label_array(train, col).tolist(), train[spec.label_names_column][:])
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
    values = label_array(ds, col)
    bad = np.nonzero((values < 0) | (values >= num_labels))[0]
    if bad.size:
        raise DataError(
            f"dataset {name!r}: {bad.size} labels in column {col!r} are outside [0, "
            f"{num_labels}), e.g. {int(values[bad[0]])} at row {int(bad[0])}. Drop those rows "
            "(or use them as the unlabeled pool) before training."
        )
